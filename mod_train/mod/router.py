"""The MoD math in one place: the gate, token selection, the auxiliary losses and routing statistics.

Threshold-p (MoDification): g = sigmoid(w.h + b) in fp32; a token runs the layer iff g >= p. Causal,
so training, prefill and decode use the same rule.

Top-k (classic MoD baseline): per sequence the top ceil(capacity * n_valid) tokens by router logit run
the layer (non-causal). A BCE loss trains sigmoid(r) > 0.5 to predict membership; that predictor makes
the causal decision at evaluation and decode time (MoDConfig.topk_causal_eval).

Auxiliary losses over the routed layers j (F_j: executed fraction of valid tokens, no gradient;
G_j: mean gate over valid tokens):
  layer load (paper):   R = alpha * sum_j F_j * G_j
  target rate (ours):   R = beta * sum_j (F_j - t) * S_j,  S_j = mean sigmoid(z - logit(p_j))
    The coefficient (F_j - t) is the realised rate error: it pushes gates down when a layer runs more
    tokens than the target and up when it runs fewer, and vanishes at the target, so no alpha has to
    be guessed. S_j is a smooth proxy of the rate centred on the layer's threshold (S_j = G_j at
    p = 0.5), so the term moves the tokens near the decision boundary.
  top-k BCE:            w_bce * BCE(sigmoid(z), selected)
The auxiliary terms see z computed from the detached router input, so they move the routers only and
never bend the base model's hidden states towards smaller gates; the LM loss reaches both through g.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mod_train.config import MoDConfig


class Router(nn.Module):
    """Linear(d, 1) with bias, evaluated in fp32 whatever the model dtype (so selections made in
    bf16 training are reproducible, e.g. in activation-checkpoint recomputation)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden_size, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(1, dtype=torch.float32))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, S, d] -> router logits z [B, S] in fp32."""
        return F.linear(h.float(), self.weight.float(), self.bias.float()).squeeze(-1)

    @torch.no_grad()
    def reset(self, cfg: MoDConfig) -> None:
        self.weight.zero_()
        self.bias.fill_(cfg.init_logit())


@dataclass
class RouteTerms:
    """What one routed layer contributes to the loss and the statistics."""

    layer: int
    logits: torch.Tensor  # z [B, S], fp32, with gradient
    selected: torch.Tensor  # bool [B, S]
    valid: torch.Tensor | None  # bool [B, S] or None (all valid)
    threshold: float
    aux_logits: torch.Tensor | None = None  # z from the detached router input: aux losses train routers only

    @property
    def for_aux(self) -> torch.Tensor:
        return self.logits if self.aux_logits is None else self.aux_logits


def logit(p: float) -> float:
    """log(p / (1 - p)); +inf at p = 1 (an off layer: no logit reaches it), -inf at p = 0."""
    if p >= 1.0:
        return math.inf
    if p <= 0.0:
        return -math.inf
    return math.log(p) - math.log1p(-p)


def threshold_p(q: float, eps: float = 1e-15) -> float:
    """The threshold p whose logit is q (the inverse of `logit`, overflow-free), kept in [eps, 1 - eps]."""
    p = 1.0 / (1.0 + math.exp(-q)) if q >= 0 else math.exp(q) / (1.0 + math.exp(q))
    return min(max(p, eps), 1 - eps)


def rate_quantile(z: torch.Tensor, rate: float) -> float:
    """The logit at or above which a share `rate` of the logits z lies: their (1 - rate) quantile (rate 1:
    the minimum). Threshold calibration and the rate-centred router probe both place p_j here."""
    return float(torch.quantile(z, 1.0 - rate)) if rate < 1 else float(z.min())


def sink_mask(pos: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Bool [B, S]: the first `n` tokens of their document (position id < n), which always run; None if n = 0."""
    return None if n <= 0 or pos is None else pos < n


@dataclass
class History:
    """The last logits of a routed layer per row (decode under rate_hold='window'): z [B, H], valid [B, H]."""

    z: torch.Tensor
    valid: torch.Tensor


def select(z: torch.Tensor, valid: torch.Tensor | None, cfg: MoDConfig, layer: int, causal: bool,
           pos: torch.Tensor | None = None, doc: torch.Tensor | None = None,
           history: History | None = None) -> tuple[torch.Tensor, float]:
    """Which tokens run routed layer `layer`: (bool [B, S], p). Padding is never selected.

    p is the layer's gate threshold: its p_j under threshold routing, 0.5 (the causal predictor's) under
    top-k; causal decisions compare the logits with logit(p), and the target-rate loss centres on it.
    `pos` (position ids [B, S]) marks the sink tokens (MoDConfig.sink_tokens), which always run unless the layer
    is off (p_j = 1). Under rate_hold='window' the layer's held rate decides instead of p_j (`held_select`;
    `doc`: packed documents' ids, `history`: the row's earlier logits when decoding)."""
    p = cfg.threshold_for(layer) if cfg.routing == "threshold" else 0.5
    if cfg.routing == "threshold" and cfg.is_off(layer):
        return torch.zeros_like(z, dtype=torch.bool), p
    sink = sink_mask(pos, cfg.sink_tokens)
    held = cfg.held_rate(layer)
    if held is not None:
        sel = held_select(z, valid, doc, held, cfg.rate_window, history)
    elif cfg.routing == "threshold" or causal:
        sel = z >= logit(p)  # == sigmoid(z) >= p, without fp32 saturation ties near g = 1
    else:
        sel = _topk(z, valid if sink is None else (~sink if valid is None else valid & ~sink), cfg.capacity)
    if sink is not None:
        sel = sel | sink
    return (sel if valid is None else sel & valid), p


def held_select(z: torch.Tensor, valid: torch.Tensor | None, doc: torch.Tensor | None, rate: float, window: int,
                history: History | None = None) -> torch.Tensor:
    """Causal per-sequence rate hold: token t runs iff fewer than rate * n_t of the n_t logits in its window (the
    last `window` valid tokens of its document up to and including t) are strictly larger than its own, i.e. its
    threshold is the (1 - rate) quantile of its own recent logits. The realised rate is `rate` on any text (a
    little above it in the first tokens, where windows are short), whatever the logits' scale or offset.
    `history`: earlier logits of the same rows (decode), which count as the start of every window."""
    B, S = z.shape
    v = torch.ones_like(z, dtype=torch.bool) if valid is None else valid
    if history is not None:
        z, v = torch.cat([history.z.to(z.dtype), z], 1), torch.cat([history.valid, v], 1)
        doc = None  # a cache never holds packed documents
    W = min(window, z.shape[1])
    zp = F.pad(z, (W - 1, 0)).unfold(1, W, 1)[:, -S:]  # [B, S, W]: the window of each new token, itself last
    ok = F.pad(v, (W - 1, 0)).unfold(1, W, 1)[:, -S:]
    if doc is not None:
        ok = ok & (F.pad(doc, (W - 1, 0), value=-1).unfold(1, W, 1)[:, -S:] == doc[..., None])
    zt = zp[..., -1:]
    larger = ((zp > zt) & ok).sum(-1)
    n = ok.sum(-1)
    return larger.to(z.dtype) < rate * n.to(z.dtype)


def _topk(z: torch.Tensor, valid: torch.Tensor | None, capacity: float) -> torch.Tensor:
    n_valid = z.new_full((z.shape[0],), z.shape[1]) if valid is None else valid.sum(1).to(z.dtype)
    k = torch.ceil(capacity * n_valid).long()
    scores = z.detach() if valid is None else z.detach().masked_fill(~valid, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(z.shape[1], device=z.device).expand_as(order))
    return rank < k[:, None]


def block_weight(z: torch.Tensor, cfg: MoDConfig) -> torch.Tensor:
    """Multiplier of the routed outputs: the gate g = sigmoid(z) (the paper), the raw logit for paper-exact
    top-k, or with gate_form 'ste' the straight-through 1 + g - stopgrad(g): exactly 1 forward, so an executed
    token keeps its full update, and d/dz of g backward, so the router still learns from the LM loss."""
    if cfg.routing == "topk" and cfg.topk_weight == "logit":
        return z
    g = torch.sigmoid(z)
    if cfg.gate_form == "ste":
        return 1.0 + g - g.detach()
    return g


def _masked_mean(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return x.mean()
    v = valid.to(x.dtype)
    return (x * v).sum() / v.sum().clamp(min=1)


def aux_loss(terms: list[RouteTerms], cfg: MoDConfig, training_topk: bool) -> torch.Tensor:
    """Auxiliary loss of one forward (see module docstring). `training_topk`: selections were made by
    top-k (not by the causal predictor), so the BCE term applies."""
    terms = [t for t in terms if cfg.held_rate(t.layer) is None]  # held layers' rates are fixed by the rule
    if not terms:
        return torch.zeros(())
    total = terms[0].logits.new_zeros(())
    if cfg.routing == "threshold" and cfg.target_rate is not None and cfg.target_scope == "global":
        return _global_rate_loss(terms, cfg)
    for t in terms:
        z = t.for_aux
        gate = torch.sigmoid(z)
        rate = _masked_mean(t.selected.float(), t.valid).detach()
        if cfg.routing == "topk":
            if training_topk and cfg.topk_bce_weight > 0:
                bce = F.binary_cross_entropy_with_logits(z, t.selected.float(), reduction="none")
                total = total + cfg.topk_bce_weight * _masked_mean(bce, t.valid)
        elif cfg.target_rate is not None:
            soft = torch.sigmoid(z - logit(t.threshold))
            total = total + cfg.target_weight * (rate - cfg.target_rate) * _masked_mean(soft, t.valid)
        elif cfg.alpha > 0:
            total = total + cfg.alpha * rate * _masked_mean(gate, t.valid)
    return total


def _global_rate_loss(terms: list[RouteTerms], cfg: MoDConfig) -> torch.Tensor:
    """One compute budget over all routed layers: beta * (F - t) * sum_j S_j, with F the token-weighted mean
    rate over the routed layers (every layer sees the same tokens), so each layer is free to differ; a layer
    below `rate_floor` adds beta * (F_j - floor) * S_j, which pushes it back up."""
    rates = [_masked_mean(t.selected.float(), t.valid).detach() for t in terms]
    soft = [_masked_mean(torch.sigmoid(t.for_aux - logit(t.threshold)), t.valid) for t in terms]
    mean_rate = torch.stack(rates).mean()
    total = cfg.target_weight * (mean_rate - cfg.target_rate) * torch.stack(soft).sum()
    if cfg.rate_floor > 0:
        for r, s in zip(rates, soft):
            total = total + cfg.target_weight * torch.clamp(r - cfg.rate_floor, max=0.0) * s
    return total


def routing_stats(terms: list[RouteTerms]) -> dict[int, dict[str, torch.Tensor]]:
    """Per routed layer: realised execution rate F_j and mean gate G_j over valid tokens (detached)."""
    return {t.layer: {"rate": _masked_mean(t.selected.float(), t.valid).detach(),
                      "gate": _masked_mean(torch.sigmoid(t.logits), t.valid).detach()} for t in terms}
