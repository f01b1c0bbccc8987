"""Measurements on one model: windowed perplexity, routing statistics, KV bytes and prefill time.

Perplexity of a set of documents at context length L: every document is cut into non-overlapping
windows of L tokens (the last one may be shorter); each window is an independent sequence whose
tokens 1..n-1 are predicted. ppl = exp(sum of token NLLs / number of predicted tokens), i.e. token
weighted over all windows of all documents. Logits are produced in chunks so an 8k window of a 49k
vocabulary never materialises [L, V] at once.

Routing statistics come from the same forward pass: the MoD stack is run piece by piece
(`mod_embed` -> `mod_layer` -> final norm) and every routed layer's router logits and selection are
read from its `RouteTerms`, so the statistics are exactly those of the evaluated forward.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

HIST_BINS = 50
"""Gate histogram bins over [0, 1]."""
NEAR_P = 0.05
"""A gate counts as 'near p' when |g - p| < NEAR_P."""


def is_mod(model) -> bool:
    from mod_train.mod.model import MoDMixin
    return isinstance(model, MoDMixin)


@dataclass
class LayerStats:
    """Token-weighted routing statistics of one routed layer."""

    n: int = 0
    selected: int = 0
    gate_sum: float = 0.0
    near_p: int = 0
    threshold: float = 0.5
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, dtype=np.int64))

    def add(self, gates: torch.Tensor, selected: torch.Tensor, p: float) -> None:
        g = gates.detach().float().reshape(-1)
        self.n += g.numel()
        self.selected += int(selected.sum())
        self.gate_sum += float(g.double().sum())
        self.near_p += int(((g - p).abs() < NEAR_P).sum())
        self.threshold = p
        self.hist += np.histogram(g.numpy(), bins=HIST_BINS, range=(0.0, 1.0))[0]

    @property
    def rate(self) -> float:
        return self.selected / max(self.n, 1)

    @property
    def mean_gate(self) -> float:
        return self.gate_sum / max(self.n, 1)

    @property
    def frac_near_p(self) -> float:
        return self.near_p / max(self.n, 1)


class RoutingStats:
    """Per routed layer LayerStats, plus the selection map of the first window seen (for the plot)."""

    def __init__(self):
        self.layers: dict[int, LayerStats] = {}
        self.sample_map: np.ndarray | None = None  # [routed layers, positions] of 0/1
        self.sample_layers: list[int] = []

    def add(self, terms) -> None:
        rows = []
        for t in terms:
            gates = torch.sigmoid(t.logits)
            self.layers.setdefault(t.layer, LayerStats()).add(gates, t.selected, t.threshold)
            rows.append(t.selected[0].float().numpy())
        if self.sample_map is None and rows:
            self.sample_map = np.stack(rows)
            self.sample_layers = [t.layer for t in terms]

    def mean_rate(self) -> float:
        """Token-weighted execution rate over all routed layers."""
        n = sum(s.n for s in self.layers.values())
        return sum(s.selected for s in self.layers.values()) / max(n, 1)

    def to_dict(self) -> dict:
        return {str(j): {"rate": s.rate, "gate": s.mean_gate, "near_p": s.frac_near_p, "threshold": s.threshold,
                         "tokens": s.n, "hist": s.hist.tolist()} for j, s in sorted(self.layers.items())}


@torch.no_grad()
def final_hidden(model, ids: torch.Tensor, stats: RoutingStats | None = None) -> torch.Tensor:
    """Last hidden states after the final norm, [B, S, d], for a dense HF or a MoD model."""
    if not is_mod(model):
        return model.model(input_ids=ids).last_hidden_state
    h, terms = model.mod_stack(*model.mod_embed(ids))
    if stats is not None:
        stats.add(terms)
    return model.model.norm(h)


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, stats: RoutingStats | None = None, chunk: int = 1024) -> tuple[float, int]:
    """(sum of token NLLs, number of predicted tokens) of one window ids [1, n]: tokens 1..n-1 given the prefix."""
    if ids.shape[1] < 2:
        return 0.0, 0
    h = final_hidden(model, ids, stats)[0, :-1]
    tgt = ids[0, 1:]
    total = 0.0
    for s in range(0, h.shape[0], chunk):
        logits = model.lm_head(h[s:s + chunk]).float()
        lp = torch.log_softmax(logits, dim=-1)
        total -= float(lp.gather(1, tgt[s:s + chunk, None]).double().sum())
    return total, int(tgt.numel())


def windows(ids: list[int] | torch.Tensor, length: int):
    """Non-overlapping windows of `length` tokens (last one shorter; windows under 2 tokens dropped)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    for s in range(0, ids.numel(), length):
        w = ids[s:s + length]
        if w.numel() >= 2:
            yield w[None]


@dataclass
class PPLResult:
    nll: float = 0.0
    tokens: int = 0
    windows: int = 0

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")


def perplexity(model, docs: list[list[int]], length: int, stats: RoutingStats | None = None,
               progress=None) -> PPLResult:
    """Token-weighted perplexity over non-overlapping `length`-token windows of every document."""
    was = model.training
    model.eval()
    res = PPLResult()
    for d in docs:
        for w in windows(d, length):
            nll, n = window_nll(model, w, stats)
            res.nll += nll
            res.tokens += n
            res.windows += 1
            if progress is not None:
                progress.update(w.shape[1])
    model.train(was)
    return res


@torch.no_grad()
def prefill(model, ids: torch.Tensor, repeats: int = 1) -> dict:
    """One prefill of ids [1, n] with a KV cache: bytes stored (per layer, total) and the fastest time."""
    from mod_train.mod.cache import MoDCache, kv_cache_bytes
    was = model.training
    model.eval()
    best, kv = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        if is_mod(model):
            cache = MoDCache(model.config.num_hidden_layers)
            model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        else:
            cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        best = min(best, time.perf_counter() - t0)
        kv = kv_cache_bytes(cache)
    model.train(was)
    return {"seconds": best, "kv_bytes": int(kv["total"]), "kv_per_layer": [int(x) for x in kv["per_layer"]],
            "tokens": int(ids.shape[1])}


def ideal_kv_fraction(model, rate: float) -> float:
    """KV bytes / dense from counting. skipped_kv 'drop': 1 - rho * (1 - r), rho = routed share of layers, r = mean
    execution rate of routed layers. 'keep': every layer stores every token except the off ones (p = 1)."""
    if not is_mod(model):
        return 1.0
    n, cfg = model.config.num_hidden_layers, model.mod_config
    if cfg.skipped_kv == "keep":
        return 1.0 - sum(cfg.is_off(j) for j in model.routed_layers) / n
    return 1.0 - len(model.routed_layers) / n * (1.0 - rate)
