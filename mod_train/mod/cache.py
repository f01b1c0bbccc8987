"""Ragged per-layer KV cache for MoD generation.

Dense layers store every token (padding included, as HF caches do). Routed layers store K/V only for
the tokens that ran the layer, with their original positions, and each sequence of a batch has its
own length there. Storage per layer is [B, Hkv, capacity, D] with per-row lengths; rows are filled
left to right; capacity is exact after a prefill and grows by 1/8 (at least 256 slots) in decoding.

`used` bytes count the stored tokens (what the cache holds); `allocated` bytes include the growth
slack and, in batches, the rows' padding up to the longest row.
"""
from __future__ import annotations

import torch

from mod_train.mod.attention import Slots
from mod_train.mod.router import History


class _LayerKV:
    """One layer's K/V. Host-side bookkeeping keeps decoding free of host syncs: `bound` is an upper bound of the
    longest row (exact when every append kept all its slots in every row: dense layers, `keep` layers, batch 1),
    and `padded` records whether any stored slot may be invalid (then attention takes the validity mask)."""

    def __init__(self):
        self.k = self.v = self.pos = self.valid = self.length = None
        self.bound, self.padded = 0, False

    def append(self, k: torch.Tensor, v: torch.Tensor, s: Slots, counts: torch.Tensor | None):
        """Write n new slots per row (k/v [B, Hkv, n, D]); row b keeps its first counts[b] of them (None: all n)."""
        B, H, n, D = k.shape
        self.release_unfit(B, H, D, k.dtype, k.device)
        valid = s.valid if s.valid is not None else torch.ones_like(s.pos, dtype=torch.bool)
        if counts is not None:
            valid = valid & (torch.arange(n, device=k.device) < counts[:, None])
        if self.k is None and counts is None:  # a fresh prefill: its own K/V, exact capacity, nothing scattered
            self.k, self.v = k.contiguous(), v.to(k.dtype).contiguous()  # one dtype for both, as _grow makes them
            self.pos = s.pos.clone(memory_format=torch.contiguous_format)  # never the caller's tensors: written
            self.valid = valid if valid is not s.valid else valid.clone()  # in place after a reset()
            self.length = torch.full((B,), n, dtype=torch.long, device=k.device)
        else:
            if self.k is None:
                self.length = torch.zeros(B, dtype=torch.long, device=k.device)
                self._grow(B, H, D, n, k)
            if self.bound + n > self.k.shape[2]:
                cap = self.k.shape[2]  # grow by 1/8 (>= 256 slots): bounded slack, O(1) amortised appends
                self._grow(B, H, D, max(self.bound + n, cap + max(256, cap // 8)), k)
            if self.bound == 0:  # every row starts at slot 0 (a fresh or reset layer): plain copies
                self.k[:, :, :n].copy_(k)
                self.v[:, :, :n].copy_(v)
                self.pos[:, :n].copy_(s.pos)
                self.valid[:, :n].copy_(valid)
            else:
                idx = self.length[:, None] + torch.arange(n, device=k.device)  # [B, n]
                i4 = idx[:, None, :, None].expand(B, H, n, D)
                self.k.scatter_(2, i4, k.to(self.k.dtype))
                self.v.scatter_(2, i4, v.to(self.v.dtype))
                self.pos.scatter_(1, idx, s.pos)
                self.valid.scatter_(1, idx, valid)
            self.length += n if counts is None else counts
        self.bound += n
        self.padded |= s.valid is not None or counts is not None

    def release_unfit(self, B, H, D, dtype, device):
        """An empty layer (a reset cache) holding buffers of another shape, dtype or device (the last request's) lets
        them go, to be allocated anew for this one."""
        if self.k is not None and self.bound == 0 and (self.k.shape[:2] != (B, H) or self.k.shape[3] != D
                                                       or self.k.dtype != dtype or self.k.device != device):
            self.k = None

    def reset(self):
        """Empty, keeping the buffers where they are (MoDCache.reset)."""
        if self.k is not None:
            self.length.zero_()
            self.valid.fill_(False)
        self.bound, self.padded = 0, False

    def _grow(self, B, H, D, cap, like):
        old, old_v = self.k, self.v
        self.k = like.new_zeros(B, H, cap, D)
        self.v = like.new_zeros(B, H, cap, D)
        pos = torch.zeros(B, cap, dtype=torch.long, device=like.device)
        valid = torch.zeros(B, cap, dtype=torch.bool, device=like.device)
        if old is not None:
            L = old.shape[2]
            self.k[:, :, :L] = old
            self.v[:, :, :L] = old_v
            pos[:, :L] = self.pos
            valid[:, :L] = self.valid
        self.pos, self.valid = pos, valid

    def view(self):
        """(k, v, Slots) of the filled part: `bound` slots per row, the validity mask where some may be unused."""
        L = self.bound
        s = Slots(self.pos[:, :L], None, self.valid[:, :L] if self.padded else None)
        return self.k[:, :, :L], self.v[:, :, :L], s

    def used_bytes(self) -> int:
        if self.k is None:
            return 0
        per_tok = 2 * self.k.shape[1] * self.k.shape[3] * self.k.element_size()
        return int(self.length.sum()) * per_tok

    def allocated_bytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


class MoDCache:
    """KV cache of a MoD model. Pass it as `cache=` or let `generate()` create it."""

    def __init__(self, num_layers: int, max_length: int | None = None):
        self.layers = [_LayerKV() for _ in range(num_layers)]
        self.routes: dict[int, History] = {}  # rate_hold='window': each routed layer's last logits per row
        self.seen = 0  # tokens processed per row (dense positions, padding included)
        self.max_length = max_length  # tokens per row the generation will reach (generate() sets it): static decode
        self.static = None  # MoDConfig.decode 'static' / 'cuda_graphs': the StaticDecoder, made at its first step
        self._is_user_defined = False

    def reset(self) -> None:
        """Empty the cache for the next request, keeping its buffers in place (HF's StaticCache.reset()): with
        MoDConfig.decode 'cuda_graphs' the graphs captured for it are replayed again, not captured again, when
        the next request has the same batch size and fits the buffers (a request that does not fit grows or
        re-sizes them, and its steps are captured anew). Pass it to generate(cache=...) after reset()."""
        for L in self.layers:
            L.reset()
        self.routes = {}
        self.seen = 0
        if self.static is not None:
            self.static.stale = True

    def __getstate__(self):  # a copy (copy.deepcopy) makes its own static decoder: it holds the model
        return {**self.__dict__, "static": None}

    # -- HF generation interface -------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, *args, **kwargs):  # pragma: no cover - only used by compiled caches
        raise NotImplementedError("MoDCache is dynamic; torch.compile'd static caches are not supported")

    is_compileable = False
    is_croppable = False  # ragged routed layers cannot be cut back by a token count (no assisted decoding)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    def crop(self, max_length: int):
        raise NotImplementedError("MoDCache cannot be cropped: assisted/speculative decoding is not supported")

    def route_history(self, layer: int) -> History | None:
        """The logits that routed `layer` in earlier calls, per row (None before the first)."""
        return self.routes.get(layer)

    def push_route_history(self, layer: int, z: torch.Tensor, valid: torch.Tensor | None, window: int) -> None:
        """Keep the last window - 1 logits of `layer` per row (with their validity): the start of the next
        tokens' windows."""
        z, v = z.detach(), torch.ones_like(z, dtype=torch.bool) if valid is None else valid
        old = self.routes.get(layer)
        if old is not None:
            z, v = torch.cat([old.z, z], 1), torch.cat([old.valid, v], 1)
        start = max(z.shape[1] - (window - 1), 0)
        self.routes[layer] = History(z[:, start:], v[:, start:])

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.static = None  # new buffers: a static decoder is made again
        for j, r in self.routes.items():
            self.routes[j] = History(r.z.index_select(0, beam_idx.to(r.z.device)),
                                     r.valid.index_select(0, beam_idx.to(r.z.device)))
        for L in self.layers:
            if L.k is not None and L.bound == 0:  # nothing stored (a reset cache's buffers of another request)
                L.k = L.v = L.pos = L.valid = L.length = None
            if L.k is not None:
                for name in ("k", "v", "pos", "valid", "length"):
                    setattr(L, name, getattr(L, name).index_select(0, beam_idx.to(L.k.device)))

    # -- used by the model ---------------------------------------------------------------------------
    def update(self, layer: int, k, v, s: Slots, counts: torch.Tensor | None):
        """Append (row b keeps counts[b] of the new slots; None: all), then return all keys/values of the layer
        with their slots."""
        L = self.layers[layer]
        L.append(k, v, s, counts)
        return L.view()

    def is_empty(self, layer: int) -> bool:
        """Nothing stored in the layer (a fresh cache, or one emptied by reset(): its prefill is plain causal)."""
        L = self.layers[layer]
        return L.k is None or L.bound == 0

    # -- reporting -----------------------------------------------------------------------------------
    def layer_bytes(self, allocated: bool = False) -> list[int]:
        """Bytes of K+V per layer: stored tokens, or with `allocated` the reserved buffers."""
        return [L.allocated_bytes() if allocated else L.used_bytes() for L in self.layers]

    def total_bytes(self, allocated: bool = False) -> int:
        return sum(self.layer_bytes(allocated))

    def layer_lengths(self) -> list[list[int]]:
        """Stored tokens per layer and per sequence."""
        return [[] if L.length is None else L.length.tolist() for L in self.layers]


def kv_cache_bytes(cache) -> dict:
    """Bytes of a cache per layer and in total. Works for MoDCache and HF DynamicCache (dense reference)."""
    if isinstance(cache, MoDCache):
        per = cache.layer_bytes()
        return {"per_layer": per, "total": sum(per), "allocated": cache.total_bytes(allocated=True)}
    per = []
    for layer in cache.layers:  # HF DynamicCache
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        per.append(0 if k is None else k.numel() * k.element_size() + v.numel() * v.element_size())
    return {"per_layer": per, "total": sum(per), "allocated": sum(per)}
