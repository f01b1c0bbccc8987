"""Decoder-layer computation for MoD models, written over the HF decoder layer's own sub-modules
(input_layernorm, self_attn.{q,k,v,o}_proj [+ q_norm/k_norm], post_attention_layernorm, mlp), so the
weights, their names and their sharding (ZeRO-3 hooks, AutoTP) stay those of the HF model.

Routed layer, gate g per token (MoDification, gate='submodule'):
    a   = Attn(LN1(h))            over selected tokens only
    h'  = h  + g * a
    h'' = h' + g * MLP(LN2(h'))
    skipped token: h'' = h        (no attention, no MLP, no K/V written)
gate='block' (classic MoD):  h'' = h + w * (a + MLP(LN2(h + a)))

`fast`: gather the selected tokens of every row into a [B, n_max] layout (order and position ids
kept), compute, scatter back. `reference`: compute every token with masks, then keep the selected
ones; tests check that both give the same outputs and gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

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


def _qkv(attn, x, cos, sin):
    """Projections of the HF attention module, RoPE at the slots' original positions."""
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def attention(layer, idx: int, x: torch.Tensor, slots: Slots, cos, sin, cache, config,
              counts: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention of the HF layer over slots x [B, L, d] (already layer-normed) -> o_proj output.

    With a cache, the slots' K/V are appended first (row b keeps counts[b] of them) and the queries
    attend to everything the layer has stored."""
    attn = layer.self_attn
    q, k, v = _qkv(attn, x, cos, sin)
    window = _window(layer, config)
    if cache is None:
        out = attend(q, k, v, slots, slots, attn.scaling, True, window)
    else:
        first = cache.is_empty(idx)
        if counts is None:
            counts = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        k, v, kslots = cache.update(idx, k, v, slots, counts)
        out = attend(q, k, v, slots, kslots, attn.scaling, first and kslots.pos.shape[1] == slots.pos.shape[1]
                     and slots.valid is None, window)
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
                      gate_mode: str, config, always_compute: bool = False) -> torch.Tensor:
    """Gather -> compute -> scatter. Rows may select different numbers of tokens. When no token is
    selected the layer is skipped, unless `always_compute` (distributed runs): then one masked slot is
    computed so every rank calls every sub-module and ZeRO-3 / TP collectives never hang."""
    B, S, d = h.shape
    counts = sel.sum(1)
    n = int(counts.max())
    if n == 0 and not always_compute:
        return h
    n = max(n, 1)
    # stable sort puts each row's selected tokens first, in their original order
    idx_sel = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :n]
    slot_ok = torch.arange(n, device=h.device)[None, :] < counts[:, None]
    full = bool(slot_ok.all())
    slots = meta.slots.gather(idx_sel, None if full else slot_ok)
    hs = h.gather(1, idx_sel[..., None].expand(B, n, d))
    ws = w.gather(1, idx_sel)[..., None].to(h.dtype)
    cs = meta.cos.gather(1, idx_sel[..., None].expand(B, n, meta.cos.shape[-1]))
    sn = meta.sin.gather(1, idx_sel[..., None].expand(B, n, meta.sin.shape[-1]))
    a = attention(layer, idx, layer.input_layernorm(hs), slots, cs, sn, meta.cache, config, counts)
    out = _gated(layer, hs, a, ws, gate_mode)
    if not full:  # padding slots point at unselected tokens: write their own value back
        out = torch.where(slot_ok[..., None], out, hs)
    return h.scatter(1, idx_sel[..., None].expand(B, n, d), out)


def routed_layer_reference(layer, idx: int, h: torch.Tensor, meta: StepMeta, sel: torch.Tensor, w: torch.Tensor,
                           gate_mode: str, config) -> torch.Tensor:
    """Every token computed; keys restricted to selected tokens; unselected outputs discarded."""
    if meta.cache is not None:
        raise ValueError("the reference path has no KV cache; use impl='fast' for generation")
    s = meta.slots
    ksl = Slots(s.pos, s.doc, sel if s.valid is None else sel & s.valid)
    attn = layer.self_attn
    q, k, v = _qkv(attn, layer.input_layernorm(h), meta.cos, meta.sin)
    o = attend(q, k, v, s, ksl, attn.scaling, False, _window(layer, config))
    a = attn.o_proj(o.reshape(*h.shape[:-1], -1))
    out = _gated(layer, h, a, w[..., None].to(h.dtype), gate_mode)
    return torch.where(sel[..., None], out, h)
