"""Setting routers and thresholds from data, without training.

- `calibrate_thresholds`: post-hoc per-layer thresholds p_j that make each routed layer run a target share
  of the tokens.
- `fit_routers_to_importance`: each router becomes a ridge-regression probe of how much its layer changes
  each token (optionally centred on a target execution rate).
- `random_routers`: token-dependent routers with random directions (benchmarks and tests: latency and the
  cache depend only on how many tokens run, which calibration then fixes).

The first two measure each routed layer on hidden states produced by the layers before it as they are
set at that moment (already calibrated / fitted): `_routed_walk` is that walk, written once.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import torch

from mod_train.mod.layer import dense_layer, router_input
from mod_train.mod.router import logit, rate_quantile, threshold_p


SKIP_MARGIN = 4.0  # logits between an all-or-nothing layer's probe values and its threshold


def _routed_walk(model, batches: Iterable[dict]) -> Iterator[tuple[int, torch.nn.Module, list]]:
    """Run `batches` (dicts with input_ids, optional attention_mask and position_ids) through the stack in
    eval mode, layer by layer. Before each routed layer i runs, yields (i, layer, [(h, meta) per batch]):
    the consumer may set that layer's router or threshold, and the layer then runs with what it set. The
    model's training mode is restored at the end."""
    was_training = model.training
    model.eval()
    try:
        states = [model.mod_embed(b["input_ids"], b.get("attention_mask"), b.get("position_ids")) for b in batches]
        for i in range(model.config.num_hidden_layers):
            layer = model.model.layers[i]
            if hasattr(layer, "router"):
                yield i, layer, states
            states = [(model.mod_layer(i, h, meta)[0], meta) for h, meta in states]
    finally:
        model.train(was_training)


@torch.no_grad()
def calibrate_thresholds(model, batches, target_rate: float, layers: list[int] | None = None,
                         scope: str = "layer") -> dict[int, float]:
    """Post-hoc calibration of the thresholds p_j on held-out `batches` (dicts with input_ids and optional
    attention_mask), written into the model's MoD config (threshold routing) and returned.

    scope 'layer': every routed layer runs `target_rate` of the valid tokens. Layers are calibrated in order
    in a single pass: layer j's gates are measured on hidden states produced with layers < j already at their
    calibrated thresholds.
    scope 'global': one compute budget: all thresholds move by one common shift in logit space, so the mean
    rate over the routed layers is `target_rate` and each layer keeps its own share (the trained allocation of
    a target_scope='global' model). The shift is found by bisection, each step a pass over the batches.
    Off layers (p = 1) stay off and count as rate 0 in the budget. Sinks always run, so each layer's threshold is
    set for the rest of its target. Under rate_hold='window' the target is written to layer_rates ('layer'), or
    every held rate is scaled by one factor ('global')."""
    if not (0.0 < target_rate <= 1.0):
        raise ValueError(f"target_rate {target_rate} must lie in (0, 1]")
    cfg = model.mod_config
    if cfg.routing != "threshold":
        raise ValueError("post-hoc calibration applies to threshold routing; for top-k set capacity instead")
    if scope == "global" and cfg.rate_hold == "window":  # held rates: one common factor, no data needed
        held = {j: cfg.layer_rates[j] for j in model.routed_layers if j in cfg.layer_rates and not cfg.is_off(j)}
        k = target_rate * len(model.routed_layers) / max(sum(held.values()), 1e-12)
        model.set_mod_config(dataclasses.replace(cfg, layer_rates={**cfg.layer_rates,
                                                                   **{j: min(1.0, r * k) for j, r in held.items()}}))
        return dict(model.mod_config.layer_thresholds)
    if scope == "global":
        return _calibrate_global(model, batches, target_rate)
    thresholds = dict(cfg.layer_thresholds)
    for i, layer, states in _routed_walk(model, batches):
        if (layers is not None and i not in layers) or cfg.is_off(i):
            continue
        logits, n_all = [], 0
        for h, meta in states:
            z = layer.router(router_input(layer, h, cfg.router_input))
            logits.append(z[_routable(meta, cfg, z)])
            n_all += int(meta.slots.valid.sum()) if meta.slots.valid is not None else z.numel()
        z = torch.cat(logits).double()
        # sinks always run: the routed tokens make up the rest of the target
        r = min(1.0, max(0.0, (target_rate * n_all - (n_all - z.numel())) / max(z.numel(), 1)))
        # the (1 - target) quantile of the logits (not of the gates, which saturate in fp32), as p in
        # float64; selection compares logits, so p this close to 0 or 1 keeps its meaning
        thresholds[i] = threshold_p(rate_quantile(z, r) if r > 0 else float(z.max()) + SKIP_MARGIN)
        cfg = dataclasses.replace(cfg, layer_thresholds=thresholds,
                                  layer_rates={**cfg.layer_rates, i: r} if cfg.rate_hold == "window" else cfg.layer_rates)
        model.set_mod_config(cfg)
    return thresholds


def _calibrate_global(model, batches, target_rate: float, iters: int = 12) -> dict[int, float]:
    """Bisection on one logit shift of every routed layer's threshold until the mean realised rate over the
    routed layers (routing as set, layers in order) is target_rate on `batches`."""
    base = model.mod_config
    theta = {j: logit(base.threshold_for(j)) for j in model.routed_layers if not base.is_off(j)}

    def mean_rate(shift: float) -> float:
        model.set_mod_config(dataclasses.replace(base, layer_thresholds={
            **base.layer_thresholds, **{j: threshold_p(t + shift) for j, t in theta.items()}}))
        rates = []
        with torch.no_grad():
            for b in batches:
                out = model(**{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "position_ids")})
                rates.append(sum(float(r["rate"]) for r in out.routing.values()) / len(out.routing))
        return sum(rates) / len(rates)

    was_training = model.training
    model.eval()
    lo, hi = -20.0, 20.0  # shift: lower runs more tokens
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_rate(mid) > target_rate else (lo, mid)
    shift = (lo + hi) / 2
    mean_rate(shift)
    model.train(was_training)
    return dict(model.mod_config.layer_thresholds)


@torch.no_grad()
def fit_routers_to_importance(model, batches, ridge: float = 1e-3,
                              rate: float | dict[int, float] | None = None, pooled: bool = False) -> dict[int, float]:
    """Data-driven router initialisation (ours; the paper leaves router init open).

    For each routed layer, in order, the router becomes a ridge-regression probe of how much the layer
    changes each token: y = log(||f(h)|| / ||h||), f = the layer's full (unrouted) update. Tokens the layer
    barely changes get low gates, so a threshold skips them first. The probe output is standardised and
    centred on the configured init logit, so at p = 0.5 nearly every token still runs and the model starts
    close to the original; training and `calibrate_thresholds` then set the rate.

    `rate`: start at this execution rate instead: each probe is centred so that its (1 - rate) quantile on
    these tokens sits at the layer's threshold (layers in order, each measured on hidden states routed by
    the layers before it). Training then begins at the target rate and spends its steps adapting the model
    to the skipping rather than moving router biases (Adam moves a bias by about lr per step: 30 steps at
    1e-3 move it by 0.03, while dense-init gates sit at logit 2.9, far above a p = 0.5 threshold).
    `rate` may also be a rate per routed layer ({layer: rate}, e.g. from prune.allocate_budget); a layer at
    rate 0 is centred SKIP_MARGIN logits below its lowest probe value (it skips every calibration token), at
    rate 1 that far above its highest (it runs every token).
    `pooled` (with a float `rate`): one budget over all routed layers, spent token by token. The probes keep
    their own scale (the predicted log relative update, comparable across layers) and share one centre: every
    (token, layer) pair whose predicted update is among the largest `rate` share of all of them runs, so
    layers that barely change the hidden state run few tokens and important ones most. The routers are
    measured on the hidden states of the model as it is when called (dense init: the dense model's). Layers
    already off when called (p = 1: deleted whole, the hybrid start) count as rate 0 in the budget and take
    no part in the ranking: the other layers share rate * n_routed / n_on of their tokens.
    Sink tokens (MoDConfig.sink_tokens) always run, so they are left out of the fit and of the ranking. With a
    per-layer or pooled `rate`, the allocation is written to MoDConfig.layer_rates (what rate_hold='window'
    holds on any text) and layers allocated rate 0 are turned off (p = 1: static deletion, no K/V in any mode).
    Returns the probe's R^2 per layer. `batches`: dicts with input_ids (optional attention_mask, and
    position_ids restarting at 0 at each packed document)."""
    rates = rate if isinstance(rate, dict) else None
    if rates is None and rate is not None and not 0.0 < rate <= 1.0:
        raise ValueError(f"rate {rate} must lie in (0, 1]")
    if rates is not None and not all(0.0 <= v <= 1.0 for v in rates.values()):
        raise ValueError(f"per-layer rates {rates} must lie in [0, 1]")
    if pooled and not isinstance(rate, float):
        raise ValueError("fit_routers_to_importance(pooled=True) needs one float rate, the budget over all layers")
    cfg = model.mod_config
    off = [i for i in model.routed_layers if cfg.is_off(i)] if pooled else []
    if pooled:
        on = len(model.routed_layers) - len(off)
        share = rate * len(model.routed_layers) / max(on, 1)
        if on == 0 or share > 1.0:
            raise ValueError(f"fit_routers_to_importance: budget {rate} over {len(model.routed_layers)} routed layers "
                             f"cannot be spent in the {on} that are not off (each would run {share:.3f} > 1); "
                             "delete fewer layers or lower the rate")
    fit, probes = {}, []
    for i, layer, states in _routed_walk(model, batches):
        if i in off:
            continue
        xs, ys = [], []
        for h, meta in states:
            upd = dense_layer(layer, i, h, meta, model.config) - h
            y = torch.log(upd.float().norm(dim=-1) / h.float().norm(dim=-1).clamp(min=1e-6))
            x = router_input(layer, h, cfg.router_input)
            keep = _routable(meta, cfg, y)
            xs.append(x.float()[keep].double())
            ys.append(y[keep].double())
        X, y = torch.cat(xs), torch.cat(ys)
        mx, my = X.mean(0), y.mean()
        Xc, yc = X - mx, y - my
        A = Xc.T @ Xc + ridge * Xc.pow(2).sum() / X.shape[1] * torch.eye(X.shape[1], dtype=X.dtype)
        w = torch.linalg.solve(A, Xc.T @ yc)
        pred = Xc @ w
        fit[i] = float(1 - (yc - pred).pow(2).sum() / yc.pow(2).sum().clamp(min=1e-12))
        if pooled:  # centred after every layer's probe is known
            probes.append((i, layer.router, w, mx, my, pred + my))
            continue
        scale = 1.0 / pred.std().clamp(min=1e-6)
        r = layer.router
        r.weight.copy_((w * scale).to(r.weight.dtype)[None])
        r_i = rates.get(i) if rates is not None else rate
        if r_i is None:
            r.bias.fill_(float(cfg.init_logit() - (mx @ w) * scale))
        else:  # standardised probe output, its (1 - rate) quantile moved onto logit(p_j)
            s = (pred * scale).float()
            q = float(s.max()) + SKIP_MARGIN if r_i <= 0 else float(s.min()) - SKIP_MARGIN if r_i >= 1 else \
                rate_quantile(s, r_i)
            r.bias.fill_(float(logit(cfg.threshold_for(i)) - q - (mx @ w) * scale))
    if pooled:
        allpred = torch.cat([p[-1] for p in probes])
        scale = 1.0 / allpred.std().clamp(min=1e-6)
        centre = rate_quantile(allpred.float(), share)
        for i, r, w, mx, my, pred in probes:  # z = scale * (predicted update - centre) + logit(p_i)
            r.weight.copy_((w * scale).to(r.weight.dtype)[None])
            r.bias.fill_(float(scale * (my - mx @ w - centre) + logit(cfg.threshold_for(i))))
        rates = {**{i: 0.0 for i in off}, **{i: float((pred >= centre).double().mean()) for i, *_, pred in probes}}
    elif rates is None and rate is not None:
        rates = {i: float(rate) for i in fit}
    if rates is not None:  # the allocation: held by rate_hold='window'; a layer at rate 0 is off (p = 1)
        off = {i: 1.0 for i, v in rates.items() if v <= 0}
        model.set_mod_config(dataclasses.replace(cfg, layer_rates={**cfg.layer_rates, **rates},
                                                 layer_thresholds={**cfg.layer_thresholds, **off}))
    return fit


def _routable(meta, cfg, like: torch.Tensor) -> torch.Tensor:
    """Bool [B, S]: the tokens a router decides for (valid, not a sink, which always runs)."""
    keep = meta.slots.valid if meta.slots.valid is not None else torch.ones_like(like, dtype=torch.bool)
    if cfg.sink_tokens > 0:
        keep = keep & (meta.slots.pos >= cfg.sink_tokens)
    return keep


@torch.no_grad()
def random_routers(model, seed: int = 0, std: float = 1.0, bias: float = 0.0, batches=None,
                   rate: float | None = None):
    """Token-dependent routers without training: each routed layer's router direction (routed layers in
    order) drawn N(0, std^2 / d) from a torch.Generator seeded with `seed`, its bias set to `bias`. With
    `batches` and `rate`, the per-layer thresholds are then calibrated to that execution rate on those
    batches (`calibrate_thresholds`). Returns the model."""
    if (batches is None) != (rate is None):
        raise ValueError("random_routers: pass both `batches` and `rate` to calibrate, or neither")
    g = torch.Generator().manual_seed(seed)
    for i in model.routed_layers:
        r = model.model.layers[i].router
        r.weight.copy_(torch.randn(r.weight.shape, generator=g) * std / r.weight.shape[1] ** 0.5)
        r.bias.fill_(bias)
    if rate is not None:
        calibrate_thresholds(model, batches, rate)
    return model
