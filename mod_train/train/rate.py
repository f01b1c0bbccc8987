"""The execution-rate schedule, and a controller that realises it at every step by moving the thresholds.

    target(step) = rate_start + (target_rate - rate_start) * min(1, step / rate_warmup_steps)

Every converter with public code starts dense and lowers the rate over training (DLO, SkipGPT, astramind MoD;
../shared/docs/recovery.md). Waiting for the routers to follow such a schedule through the auxiliary loss
alone is slow (Adam moves a bias by about lr per step), so with `rate_control='thresholds'` the thresholds
follow it instead: after each optimizer step, the router logits that step produced give each routed layer's
(1 - target) quantile, which becomes the threshold of the next step.

- target_scope 'layer': each layer's threshold sits at its own quantile (every layer runs `target`).
- target_scope 'global': one common shift delta of all thresholds in logit space, the (1 - target) quantile of
  the pooled (z_j - logit p_j), so the mean rate over the routed layers is `target` and each layer keeps its
  own share (layers below `rate_floor` are lifted to it).

The auxiliary loss's target follows the schedule too, so it never pushes against it. All ranks apply the same
thresholds (the shifts are averaged over ranks). Logits are read through forward hooks on the routers, so the
model's code is untouched.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from mod_train.config import MoDConfig, TrainConfig
from mod_train.mod.router import logit, rate_quantile, threshold_p


def scheduled_rate(tc: TrainConfig, final: float, step: int) -> float:
    """The target execution rate of optimizer step `step` (0-based)."""
    if tc.rate_warmup_steps <= 0:
        return final
    frac = min(1.0, step / tc.rate_warmup_steps)
    return tc.rate_start + (final - tc.rate_start) * frac


def _quantile(z: torch.Tensor, rate: float) -> float:
    """router.rate_quantile on at most 2^20 of the logits (torch.quantile bounds its input); at rate 1 just below
    the minimum, so every token runs after the threshold's round trip through p."""
    if z.numel() > 1 << 20:
        z = z[torch.randperm(z.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 20]]
    return rate_quantile(z.double(), rate) if rate < 1 else float(z.min()) - 1e-6


class RateController:
    """Schedules MoDConfig.target_rate and, with rate_control='thresholds', realises it through the thresholds."""

    def __init__(self, model, tc: TrainConfig):
        self.model, self.tc = model, tc
        self.final = model.mod_config.target_rate
        self.logits: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        if tc.rate_control == "thresholds":
            for j in model.routed_layers:
                self.handles.append(model.model.layers[j].router.register_forward_hook(self._hook(j)))
            if tc.rate_warmup_steps > 0 and tc.rate_start >= 1.0:  # step 0 is the dense model: every token runs
                cfg = model.mod_config
                th = {**cfg.layer_thresholds, **{j: 1e-12 for j in model.routed_layers if not cfg.is_off(j)}}
                model.set_mod_config(dataclasses.replace(cfg, layer_thresholds=th))

    @classmethod
    def maybe(cls, model, tc: TrainConfig):
        """A controller when the run schedules or controls the rate, else None."""
        from mod_train.config import ConfigError
        if tc.rate_warmup_steps == 0 and tc.rate_control == "loss":
            return None
        cfg = getattr(model, "mod_config", None)
        if cfg is None:  # a dense model (a baseline trained the same way): no rate to schedule
            return None
        if cfg.routing != "threshold" or cfg.target_rate is None:
            raise ConfigError("TrainConfig.rate_warmup_steps / rate_control='thresholds' schedule "
                              "MoDConfig.target_rate: use threshold routing and set mod.target_rate, e.g. 0.5")
        return cls(model, tc)

    def _hook(self, j):
        def f(module, args, out):
            if torch.is_grad_enabled():  # the training forward (not evaluation, not the KD teacher)
                self.logits.setdefault(j, []).append(out.detach().float().reshape(-1))
        return f

    def begin(self, step: int) -> None:
        """Before step `step`: the scheduled target for the auxiliary loss (and the thresholds at step 0)."""
        t = scheduled_rate(self.tc, self.final, step)
        cfg = self.model.mod_config
        if cfg.target_rate != t:
            self.model.set_mod_config(dataclasses.replace(cfg, target_rate=t))
        self.logits.clear()

    def end(self, step: int) -> None:
        """After step `step`: thresholds for step + 1 from this step's logits (rate_control='thresholds')."""
        if self.tc.rate_control != "thresholds" or not self.logits:
            return
        cfg: MoDConfig = self.model.mod_config
        t = scheduled_rate(self.tc, self.final, step + 1)
        z = {j: torch.cat(v) for j, v in sorted(self.logits.items())}
        js = [j for j in z if not cfg.is_off(j) and cfg.held_rate(j) is None]  # off layers stay off, held ones hold
        if not js:
            self.logits.clear()
            return
        if cfg.target_scope == "global":  # off and held layers spend their share of the budget as they are
            fixed = sum(cfg.held_rate(j) or 0.0 for j in z if j not in js)
            t = min(1.0, max(1e-6, (t * len(z) - fixed) / len(js)))
            theta = [logit(cfg.threshold_for(j)) for j in js]
            delta = _quantile(torch.cat([z[j] - th for j, th in zip(js, theta)]), t)
            floor = [_quantile(z[j], cfg.rate_floor) if cfg.rate_floor > 0 else math.inf for j in js]
            delta, *floor = _mean_over_ranks([delta, *floor])
            new = {j: min(th + delta, f) for j, th, f in zip(js, theta, floor)}  # a lower threshold runs more
        else:
            new = dict(zip(js, _mean_over_ranks([_quantile(z[j], t) for j in js])))
        th = {**cfg.layer_thresholds, **{j: threshold_p(v, eps=1e-12) for j, v in new.items()}}
        self.model.set_mod_config(dataclasses.replace(cfg, layer_thresholds=th))
        self.logits.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _mean_over_ranks(xs: list[float]) -> list[float]:
    """Element-wise mean over the ranks (one collective), so every rank sets the same thresholds."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(xs)
    from mod_train.train.step import comm_device
    t = torch.tensor(xs, dtype=torch.float64)
    finite = torch.isfinite(t)
    t[~finite] = 0.0
    t = t.to(comm_device())
    dist.all_reduce(t)
    t = t.cpu()
    return [v / dist.get_world_size() if f else math.inf for v, f in zip(t.tolist(), finite.tolist())]
