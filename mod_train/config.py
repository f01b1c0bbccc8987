"""Dataclass configs. One per component; every field has a one-line doc.

`MoDConfig` is the method's configuration. It is validated on construction so that a bad value
fails before any model is touched, and it round-trips through the HF config (`to_dict`/`from_dict`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Union

LayerSpec = Union[str, list]


class MoDConfigError(ValueError):
    """A MoD setting is invalid; the message names the field and the fix."""


@dataclass
class MoDConfig:
    routing: str = "threshold"
    """'threshold' (MoDification threshold-p) or 'topk' (classic MoD expert-choice baseline)."""
    threshold: float = 0.5
    """p: a token runs a routed layer iff sigmoid gate >= p. Must lie in (0, 1)."""
    layer_thresholds: dict = field(default_factory=dict)
    """Per-layer p overriding `threshold` ({layer_index: p}); written by post-hoc calibration."""
    capacity: float = 0.125
    """Top-k only: fraction of each sequence's valid tokens selected per routed layer, in (0, 1]."""
    layers: LayerSpec = "odd"
    """Routed layers: 'odd' (1,3,..), 'even' (0,2,..), 'all', or an explicit list of indices."""
    dense_first: int = 0
    """Force this many first layers dense whatever `layers` says."""
    dense_last: int = 0
    """Force this many last layers dense whatever `layers` says."""
    router_input: str = "residual"
    """Gate input: 'residual' (the layer input h) or 'norm' (output of the input layernorm)."""
    router_init: str = "dense"
    """'dense' (w=0, b=logit(dense_init_gate): starts close to the original) or 'zero' (g=0.5)."""
    dense_init_gate: float = 0.95
    """Gate value at init for router_init='dense'; must exceed every threshold so all tokens run."""
    gate: str = "auto"
    """Where the gate multiplies: 'submodule' (attn and MLP separately), 'block' (whole block), 'auto'."""
    topk_weight: str = "sigmoid"
    """Top-k block-output weight: 'sigmoid' (bounded, sigmoid(r)) or 'logit' (raw r as in MoD)."""
    topk_causal_eval: bool = True
    """Top-k in eval/generation decides causally with sigmoid(r) >= 0.5 (the BCE-trained predictor)."""
    alpha: float = 0.01
    """Weight of the layer-load loss R = alpha * sum_j F_j * G_j (threshold routing)."""
    target_rate: float | None = None
    """If set, replace R by the calibration loss beta * sum_j (F_j - target) * S_j (see router.py)."""
    target_weight: float = 1.0
    """beta: weight of the target-rate calibration loss."""
    topk_bce_weight: float = 0.01
    """Weight of top-k's BCE loss making sigmoid(r) > 0.5 agree with top-k membership."""
    impl: str = "fast"
    """'fast' (gather selected tokens, compute, scatter) or 'reference' (full compute with masks)."""

    def __post_init__(self):
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self, num_layers: int | None = None) -> None:
        def bad(name, msg):
            raise MoDConfigError(f"MoDConfig.{name}: {msg}")

        choices = {
            "routing": ("threshold", "topk"),
            "router_input": ("residual", "norm"),
            "router_init": ("dense", "zero"),
            "gate": ("auto", "submodule", "block"),
            "topk_weight": ("sigmoid", "logit"),
            "impl": ("fast", "reference"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, f"got {getattr(self, name)!r}; choose one of {', '.join(map(repr, allowed))}")
        if not (0.0 < float(self.threshold) < 1.0):
            bad("threshold", f"p={self.threshold} must lie strictly between 0 and 1 (default 0.5)")
        self.layer_thresholds = {int(k): float(v) for k, v in dict(self.layer_thresholds).items()}
        for k, v in self.layer_thresholds.items():
            if not (0.0 < v < 1.0):
                bad("layer_thresholds", f"layer {k}: p={v} must lie strictly between 0 and 1")
        if not (0.0 < float(self.capacity) <= 1.0):
            bad("capacity", f"{self.capacity} must lie in (0, 1] (MoD's best setting is 0.125)")
        if not (0.0 < self.dense_init_gate < 1.0):
            bad("dense_init_gate", f"{self.dense_init_gate} must lie strictly between 0 and 1")
        if self.router_init == "dense" and self.routing == "threshold":
            if self.dense_init_gate < self.threshold:
                bad("dense_init_gate", f"{self.dense_init_gate} is below threshold {self.threshold}: "
                    "with router_init='dense' every token must run at init; raise dense_init_gate")
        if self.alpha < 0 or self.target_weight < 0 or self.topk_bce_weight < 0:
            bad("alpha", "loss weights (alpha, target_weight, topk_bce_weight) must be >= 0")
        if self.target_rate is not None and not (0.0 < self.target_rate <= 1.0):
            bad("target_rate", f"{self.target_rate} must lie in (0, 1], e.g. 0.125")
        if self.dense_first < 0 or self.dense_last < 0:
            bad("dense_first", "dense_first/dense_last must be >= 0")
        if isinstance(self.layers, str):
            if self.layers not in ("odd", "even", "all"):
                bad("layers", f"unknown layer spec {self.layers!r}; use 'odd', 'even', 'all' or a list of ints")
        elif isinstance(self.layers, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                bad("layers", f"explicit layer list must hold ints, got {self.layers!r}")
            self.layers = sorted(set(int(i) for i in self.layers))
        else:
            bad("layers", f"unknown layer spec {self.layers!r}; use 'odd', 'even', 'all' or a list of ints")
        if num_layers is not None:
            self.routed_layers(num_layers)

    def routed_layers(self, num_layers: int) -> list[int]:
        """Indices of the routed layers for a model with `num_layers` decoder layers."""
        if isinstance(self.layers, str):
            start = {"odd": 1, "even": 0, "all": 0}[self.layers]
            step = 1 if self.layers == "all" else 2
            idx = list(range(start, num_layers, step))
        else:
            out = [i for i in self.layers if not (0 <= i < num_layers)]
            if out:
                raise MoDConfigError(f"MoDConfig.layers: indices {out} out of range for a model with "
                                     f"{num_layers} layers (valid: 0..{num_layers - 1})")
            idx = list(self.layers)
        idx = [i for i in idx if self.dense_first <= i < num_layers - self.dense_last]
        if not idx:
            raise MoDConfigError(f"MoDConfig.layers: no routed layer left of {num_layers} (layers="
                                 f"{self.layers!r}, dense_first={self.dense_first}, dense_last={self.dense_last})")
        return idx

    def threshold_for(self, layer: int) -> float:
        return self.layer_thresholds.get(int(layer), self.threshold)

    @property
    def gate_mode(self) -> str:
        """Resolved gate placement: MoDification gates sub-modules, classic MoD the whole block."""
        if self.gate != "auto":
            return self.gate
        return "submodule" if self.routing == "threshold" else "block"

    def init_logit(self) -> float:
        """Router bias at init."""
        return 0.0 if self.router_init == "zero" else math.log(self.dense_init_gate / (1 - self.dense_init_gate))

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_thresholds"] = {str(k): v for k, v in self.layer_thresholds.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoDConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            import difflib
            hints = {u: difflib.get_close_matches(u, names, n=1) for u in unknown}
            raise MoDConfigError("unknown MoDConfig keys: " + ", ".join(
                f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for u, h in hints.items()))
        return cls(**d)
