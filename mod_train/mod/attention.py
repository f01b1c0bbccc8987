"""Attention over an arbitrary set of token slots, causal over ORIGINAL positions.

Every attention call in a MoD model (dense or routed layer, with or without cache) is one rule:
query i sees key j iff key j is valid, in the same document, and pos_j <= pos_i (and, with a sliding
window, pos_i - pos_j < window). Gathered tokens keep their original order and position ids, so a
routed layer's selected tokens attend exactly to earlier selected tokens of the same document.

Kernels: SDPA with `is_causal=True` when the keys are exactly the queries of one unpadded document
(the common long-context case, no mask materialised), SDPA with a boolean mask otherwise, and
flash-attn's varlen kernel on CUDA when it is installed (see `varlen_segments`).

A boolean mask of more than MASK_ELEMS elements (batch x queries x keys; a 'keep' layer's prefill at 32k, a
padded batch, packed documents) is never built whole: the queries are taken in blocks, and each block attends
only to the keys up to its last query (`_blocked`). Memory stays bounded and the masked kernel, which skips no
masked block by itself, does about half the work of one whole-mask call, as a causal kernel would.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # GPU extra; absent on CPU machines
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # pragma: no cover - depends on the install
    flash_attn_varlen_func = None


@dataclass
class Slots:
    """Metadata of token slots laid out as [B, L]."""

    pos: torch.Tensor
    """Original position ids [B, L] (RoPE and causality)."""
    doc: torch.Tensor | None = None
    """Document ids [B, L]; None means one document per row."""
    valid: torch.Tensor | None = None
    """Bool [B, L]: real tokens; None means all valid (no padding)."""

    @property
    def simple(self) -> bool:
        """True when rows are unpadded single documents: plain causal attention applies."""
        return self.doc is None and self.valid is None

    def gather(self, idx: torch.Tensor, valid: torch.Tensor | None) -> "Slots":
        return Slots(self.pos.gather(1, idx), None if self.doc is None else self.doc.gather(1, idx), valid)


def build_mask(q: Slots, k: Slots, window: int | None = None) -> torch.Tensor:
    """Boolean [B, 1, Lq, Lk] mask of the rule above. Rows with no visible key (padding queries) see
    every key, so SDPA never produces NaN; their outputs are never used."""
    m = k.pos[:, None, :] <= q.pos[:, :, None]
    if window is not None:
        m &= (q.pos[:, :, None] - k.pos[:, None, :]) < window
    if q.doc is not None or k.doc is not None:
        qd = q.doc if q.doc is not None else torch.zeros_like(q.pos)
        kd = k.doc if k.doc is not None else torch.zeros_like(k.pos)
        m &= kd[:, None, :] == qd[:, :, None]
    if k.valid is not None:
        m &= k.valid[:, None, :]
    m |= ~m.any(-1, keepdim=True)
    return m[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qs: Slots, ks: Slots, scaling: float,
           self_attention: bool, window: int | None = None) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D] -> [B, Lq, H, D].

    `self_attention`: the keys are exactly the query slots (no cache), which allows the mask-free
    causal kernel when the rows are unpadded single documents."""
    if (flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and self_attention):
        return _flash_varlen(q, k, v, qs, scaling, window)
    gqa = q.shape[1] != k.shape[1]
    if self_attention and qs.simple and window is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    elif not self_attention and q.shape[2] == 1 and ks.doc is None and window is None:  # decode: every key is past
        mask = None
        if ks.valid is not None:  # unused slots; a row with none valid (a skipped row's dummy query) sees all
            mask = ks.valid[:, None, None, :]
            mask = mask | ~mask.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    elif q.shape[0] * q.shape[2] * k.shape[2] > MASK_ELEMS and q.shape[2] > _block(q.shape[0], k.shape[2]):
        return _blocked(q, k, v, qs, ks, scaling, self_attention, window, gqa)
    else:
        mask = build_mask(qs, ks, window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


MASK_ELEMS = 1 << 24
"""Largest boolean mask (batch x queries x keys elements) one attention call builds; above it, `_blocked`."""
MIN_BLOCK = 64
"""Fewest queries per block (a large batch at long context takes a larger mask rather than thousands of calls)."""


def _block(B: int, Lk: int) -> int:
    """Queries per block: MASK_ELEMS mask elements, at least MIN_BLOCK queries."""
    return max(MASK_ELEMS // (B * Lk), MIN_BLOCK)


def _slice(s: Slots, a: int, b: int) -> Slots:
    return Slots(s.pos[:, a:b], None if s.doc is None else s.doc[:, a:b], None if s.valid is None else s.valid[:, a:b])


def _blocked(q, k, v, qs: Slots, ks: Slots, scaling, self_attention: bool, window, gqa) -> torch.Tensor:
    """The masked attention in blocks of queries (see the module docstring) -> [B, Lq, H, D].

    Block [a, b) needs the keys up to the last one any of its queries can see. Self-attention: keys are the query
    slots, ordered by position within each document, so key index < b (known on the host). Otherwise (a 'keep'
    layer's selected queries over every token, queries over a cache): the keys up to the last valid one whose
    position is at most the block's largest query position, found on the device and read in one host sync for
    all blocks.
    Valid queries get exactly the whole-mask result; a query that sees no key (padding) sees its block's keys."""
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    c = _block(B, Lk)
    starts = list(range(0, Lq, c))
    stops = [min(a + c, Lq) for a in starts]
    if self_attention:
        ends = stops
    else:
        pad = len(starts) * c - Lq  # [B, blocks]: each block's largest query position
        top = F.pad(qs.pos, (0, pad), value=0).view(B, len(starts), c).amax(-1)
        kp = ks.pos if ks.valid is None else ks.pos.masked_fill(~ks.valid, torch.iinfo(ks.pos.dtype).max)
        after = kp.flip(-1).cummin(-1).values.flip(-1)  # [B, Lk]: smallest valid position at or after each key
        # keys [0, reach) hold every valid key at a position <= top; `after` is non-decreasing: a binary search
        reach = torch.searchsorted(after.contiguous(), top.contiguous(), right=True).amax(0)
        ends = [max(int(e), 1) for e in reach.tolist()]
    out = []
    for a, b, e in zip(starts, stops, ends):
        qb, kb = _slice(qs, a, b), _slice(ks, 0, e)
        mask = build_mask(qb, kb, window)
        out.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, :e], v[:, :, :e], attn_mask=mask,
                                                  scale=scaling, enable_gqa=gqa))
    return torch.cat(out, 2).transpose(1, 2)


def varlen_segments(s: Slots) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flatten [B, L] slots into flash-attn varlen form: (flat indices of valid slots, cu_seqlens, max_len).

    A segment is a maximal run of valid slots of one row and one document; because gathered slots keep
    their order, causal attention inside a segment is causal over original positions."""
    B, L = s.pos.shape
    valid = s.valid if s.valid is not None else torch.ones_like(s.pos, dtype=torch.bool)
    doc = s.doc if s.doc is not None else torch.zeros_like(s.pos)
    row = torch.arange(B, device=s.pos.device)[:, None].expand(B, L)
    flat = valid.reshape(-1).nonzero().squeeze(1)
    key = (row.reshape(-1)[flat], doc.reshape(-1)[flat])
    new = torch.ones_like(flat, dtype=torch.bool)
    if flat.numel() > 1:
        new[1:] = (key[0][1:] != key[0][:-1]) | (key[1][1:] != key[1][:-1])
    starts = new.nonzero().squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return flat, cu, max_len


def _flash_varlen(q, k, v, qs: Slots, scaling, window):  # pragma: no cover - needs CUDA + flash-attn
    B, H, L, D = q.shape
    flat, cu, max_len = varlen_segments(qs)
    qf = q.transpose(1, 2).reshape(B * L, H, D)[flat]
    kf = k.transpose(1, 2).reshape(B * L, k.shape[1], D)[flat]
    vf = v.transpose(1, 2).reshape(B * L, v.shape[1], D)[flat]
    ws = (-1, -1) if window is None else (window - 1, 0)
    o = flash_attn_varlen_func(qf, kf, vf, cu, cu, max_len, max_len, softmax_scale=scaling, causal=True,
                               window_size=ws)
    out = q.new_zeros(B * L, H, D)
    out[flat] = o
    return out.view(B, L, H, D)
