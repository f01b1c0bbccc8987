"""Decoder-layer computation for MoD models, written over the HF decoder layer's own sub-modules
(input_layernorm, self_attn.{q,k,v,o}_proj [+ q_norm/k_norm], post_attention_layernorm, mlp), so the
weights, their names and their sharding (ZeRO-3 hooks, AutoTP) stay those of the HF model.

Routed layer, gate g per token (MoDification, gate='submodule'):
    a   = Attn(LN1(h))            over selected tokens only
    h'  = h  + g * a
    h'' = h' + g * MLP(LN2(h'))
    skipped token: h'' = h        (no attention, no MLP, no K/V written)
gate='block' (classic MoD):  h'' = h + w * (a + MLP(LN2(h + a)))

skipped_kv='keep': every token's K/V are computed from LN1(h) (and cached), so Attn above runs the selected
tokens' queries over every token's keys; a skipped token's output is still h. What is saved is Q, attention, O
and the MLP of skipped tokens.

`fast`: gather the selected tokens of every row into a [B, n_max] layout (order and position ids
kept), compute, scatter back. `reference`: compute every token with masks, then keep the selected
ones; tests check that both give the same outputs and gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import rotate_half

from mod_train.mod.attention import Slots, attend


@dataclass
class StepMeta:
    """Per-forward metadata shared by all layers."""

    slots: Slots
    """Slots of the input tokens [B, S]."""
    cos: torch.Tensor
    """RoPE cos [B, S, head_dim] at the original positions."""
    sin: torch.Tensor
    cache: object | None = None
    """MoDCache or None."""


def _window(layer, config) -> int | None:
    w = getattr(layer.self_attn, "sliding_window", None)
    if w is None and getattr(config, "model_type", "").endswith("mistral"):
        w = getattr(config, "sliding_window", None)
    return w


def _rope(x, cos, sin):
    """RoPE of x [B, H, L, D] at the slots' positions (cos/sin [B, L, D])."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def _heads(proj, x, head_dim):
    return proj(x).view(*x.shape[:-1], -1, head_dim)


def _q(attn, x, cos, sin):
    """Queries of the HF attention module [B, H, L, D], RoPE at the slots' original positions."""
    q = _heads(attn.q_proj, x, attn.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
        q = attn.q_norm(q)
    return _rope(q.transpose(1, 2), cos, sin)


def _kv(attn, x, cos, sin):
    """Keys (RoPE applied) and values [B, Hkv, L, D]."""
    k, v = _heads(attn.k_proj, x, attn.head_dim), _heads(attn.v_proj, x, attn.head_dim)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    return _rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)


def _qkv(attn, x, cos, sin):
    return (_q(attn, x, cos, sin), *_kv(attn, x, cos, sin))


def _attend_cached(attn, idx, q, k, v, slots: Slots, kslots: Slots, cache, counts, window, self_attention):
    """Attention of queries q (slots `slots`) over keys k/v (slots `kslots`); with a cache, k/v are appended first
    (row b keeps counts[b] of them) and the queries attend to everything the layer has stored."""
    if cache is None:
        return attend(q, k, v, slots, kslots, attn.scaling, self_attention, window)
    first = cache.is_empty(idx)
    k, v, stored = cache.update(idx, k, v, kslots, counts)
    simple = self_attention and first and stored.pos.shape[1] == slots.pos.shape[1] and slots.valid is None
    return attend(q, k, v, slots, stored, attn.scaling, simple, window)


def attention(layer, idx: int, x: torch.Tensor, slots: Slots, cos, sin, cache, config,
              counts: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention of the HF layer over slots x [B, L, d] (already layer-normed) -> o_proj output.

    With a cache, the slots' K/V are appended first (row b keeps counts[b] of them) and the queries
    attend to everything the layer has stored."""
    attn = layer.self_attn
    q, k, v = _qkv(attn, x, cos, sin)
    out = _attend_cached(attn, idx, q, k, v, slots, slots, cache, counts, _window(layer, config), True)
    return attn.o_proj(out.reshape(*x.shape[:-1], -1))


def router_input(layer, h: torch.Tensor, router_input: str) -> torch.Tensor:
    """What the layer's router reads (MoDConfig.router_input): the residual h or its input layernorm."""
    return layer.input_layernorm(h) if router_input == "norm" else h


def dense_layer(layer, idx: int, h: torch.Tensor, meta: StepMeta, config) -> torch.Tensor:
    a = attention(layer, idx, layer.input_layernorm(h), meta.slots, meta.cos, meta.sin, meta.cache, config)
    h = h + a
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _gated(layer, h, a, w, gate_mode):
    """Combine attention output a with the MLP under gate/weight w [.., 1]."""
    if gate_mode == "submodule":
        h1 = h + w * a
        return h1 + w * layer.mlp(layer.post_attention_layernorm(h1))
    h1 = h + a
    return h + w * (a + layer.mlp(layer.post_attention_layernorm(h1)))


def routed_layer_fast(layer, idx: int, h: torch.Tensor, meta: StepMeta, sel: torch.Tensor, w: torch.Tensor,
                      gate_mode: str, config, always_compute: bool = False, keep_kv: bool = False) -> torch.Tensor:
    """Gather -> compute -> scatter. Rows may select different numbers of tokens. When no token is
    selected the layer is skipped (with `keep_kv` and a cache, every token's K/V are still stored), unless
    `always_compute` (distributed runs): then one masked slot is computed so every rank calls every sub-module
    and ZeRO-3 / TP collectives never hang. `keep_kv`: skipped_kv='keep' (see the module docstring)."""
    B, S, d = h.shape
    counts = sel.sum(1)
    n = int(counts.max())  # the one host decision of a routed layer: run it (and for how many slots) or skip it
    if n == 0 and not always_compute:
        if keep_kv and meta.cache is not None:
            k, v = _kv(layer.self_attn, layer.input_layernorm(h), meta.cos, meta.sin)
            meta.cache.update(idx, k, v, meta.slots, None)
        return h
    # every row fills its n slots: known at batch 1 unless no token runs (always_compute's one masked slot); with
    # a cache (decoding) the masked form is taken rather than a second host sync
    full = n > 0 and (B == 1 or (meta.cache is None and bool((counts == n).all())))
    n = max(n, 1)
    # stable sort puts each row's selected tokens first, in their original order
    idx_sel = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :n]
    slot_ok = torch.arange(n, device=h.device)[None, :] < counts[:, None]
    slots = meta.slots.gather(idx_sel, None if full else slot_ok)
    gather_d = idx_sel[..., None].expand(B, n, d)
    hs = h.gather(1, gather_d)
    ws = w.gather(1, idx_sel)[..., None].to(h.dtype)
    cs = meta.cos.gather(1, idx_sel[..., None].expand(B, n, meta.cos.shape[-1]))
    sn = meta.sin.gather(1, idx_sel[..., None].expand(B, n, meta.sin.shape[-1]))
    if keep_kv:  # K/V of every token, queries of the selected ones
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        k, v = _kv(attn, x, meta.cos, meta.sin)
        q = _q(attn, x.gather(1, gather_d), cs, sn)
        o = _attend_cached(attn, idx, q, k, v, slots, meta.slots, meta.cache, None, _window(layer, config), False)
        a = attn.o_proj(o.reshape(B, n, -1))
    else:
        a = attention(layer, idx, layer.input_layernorm(hs), slots, cs, sn, meta.cache, config,
                      None if full else counts)
    out = _gated(layer, hs, a, ws, gate_mode)
    if not full:  # padding slots point at unselected tokens: write their own value back
        out = torch.where(slot_ok[..., None], out, hs)
    return h.scatter(1, gather_d, out)


def routed_layer_reference(layer, idx: int, h: torch.Tensor, meta: StepMeta, sel: torch.Tensor, w: torch.Tensor,
                           gate_mode: str, config, keep_kv: bool = False) -> torch.Tensor:
    """Every token computed; keys restricted to selected tokens (every valid token with `keep_kv`); unselected
    outputs discarded."""
    if meta.cache is not None:
        raise ValueError("the reference path has no KV cache; use impl='fast' for generation")
    s = meta.slots
    ksl = s if keep_kv else Slots(s.pos, s.doc, sel if s.valid is None else sel & s.valid)
    attn = layer.self_attn
    q, k, v = _qkv(attn, layer.input_layernorm(h), meta.cos, meta.sin)
    o = attend(q, k, v, s, ksl, attn.scaling, False, _window(layer, config))
    a = attn.o_proj(o.reshape(*h.shape[:-1], -1))
    out = _gated(layer, h, a, w[..., None].to(h.dtype), gate_mode)
    return torch.where(sel[..., None], out, h)
