"""Dataclass configs, near the bottom of the package (below: paths, errors): every field has a one-line doc
(shown by `--help`). The error types live in mod_train.errors and are re-exported here.

- `MoDConfig`: the method. Validated on construction, round-trips through the HF config (`to_dict`/`from_dict`).
- `TrainConfig`: everything the loop needs that is neither the method nor the data.
- `EvalConfig`: held-out evaluation of a MoD model against its dense original.
- `RunSpec` / `RunConfig`: what a run reads and writes; `RunConfig` is the root configuration that every
  launcher parses (YAML/JSON typed by these fields plus `--section.key` overrides, `mod_train.cli`).

Choice fields are `Literal[...]`, so the command line and YAML files are checked against the same choices.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from mod_train.errors import ConfigError, UserError  # noqa: F401  (re-exported: their old home)
from mod_train.paths import check_model_location

LayerSpec = Union[Literal["odd", "even", "all"], list[int]]


class MoDConfigError(ConfigError):
    """A MoD setting is invalid; the message names the field and the fix."""


@dataclass
class MoDConfig:
    routing: Literal["threshold", "topk"] = "threshold"
    """'threshold' (MoDification threshold-p) or 'topk' (classic MoD expert-choice baseline)."""
    threshold: float = 0.5
    """p: a token runs a routed layer iff sigmoid gate >= p. Must lie in (0, 1)."""
    layer_thresholds: dict[int, float] = field(default_factory=dict)
    """Per-layer p overriding `threshold` ({layer_index: p}); written by post-hoc calibration. p = 1.0 turns the
    layer off: no token runs it (sinks included), it computes nothing and stores no K/V in either skipped_kv
    mode (a statically deleted layer; the 'allocated' start writes it for its rate-0 layers)."""
    capacity: float = 0.125
    """Top-k only: fraction of each sequence's valid tokens selected per routed layer, in (0, 1]."""
    layers: LayerSpec = "odd"
    """Routed layers: 'odd' (1,3,..), 'even' (0,2,..), 'all', or an explicit list of indices."""
    dense_first: int = 0
    """Force this many first layers dense whatever `layers` says."""
    dense_last: int = 0
    """Force this many last layers dense whatever `layers` says."""
    router_input: Literal["residual", "norm"] = "residual"
    """Gate input: 'residual' (the layer input h) or 'norm' (output of the input layernorm)."""
    router_init: Literal["dense", "zero"] = "dense"
    """'dense' (w=0, b=logit(dense_init_gate): starts close to the original) or 'zero' (g=0.5)."""
    dense_init_gate: float = 0.95
    """Gate value at init for router_init='dense'; must exceed every threshold so all tokens run."""
    gate: Literal["auto", "submodule", "block"] = "auto"
    """Where the gate multiplies: 'submodule' (attn and MLP separately), 'block' (whole block), 'auto'."""
    topk_weight: Literal["sigmoid", "logit"] = "sigmoid"
    """Top-k block-output weight: 'sigmoid' (bounded, sigmoid(r)) or 'logit' (raw r as in MoD)."""
    topk_causal_eval: bool = True
    """Top-k in eval/generation decides causally with sigmoid(r) >= 0.5 (the BCE-trained predictor)."""
    alpha: float = 0.01
    """Weight of the layer-load loss R = alpha * sum_j F_j * G_j (threshold routing)."""
    target_rate: Optional[float] = None
    """If set, replace R by the calibration loss beta * sum_j (F_j - target) * S_j (see router.py)."""
    target_weight: float = 1.0
    """beta: weight of the target-rate calibration loss."""
    target_scope: Literal["layer", "global"] = "layer"
    """What target_rate constrains: each routed layer's rate ('layer'), or the token-weighted mean rate over all
    routed layers ('global': one compute budget, each layer free to differ)."""
    rate_floor: float = 0.0
    """With target_scope='global': a routed layer running fewer than this share of tokens is pushed back up."""
    gate_form: Literal["sigmoid", "ste"] = "sigmoid"
    """Scale of an executed token's update: 'sigmoid' (the paper: x g) or 'ste' (x 1 forward, the gradient of g
    backward, a straight-through gate: executed tokens keep their full update at conversion)."""
    topk_bce_weight: float = 0.01
    """Weight of top-k's BCE loss making sigmoid(r) > 0.5 agree with top-k membership."""
    impl: Literal["fast", "reference"] = "fast"
    """'fast' (gather selected tokens, compute, scatter) or 'reference' (full compute with masks)."""
    decode: Literal["eager", "static", "cuda_graphs"] = "eager"
    """How generation decodes one token per row (mod_train.mod.graphs): 'eager' (the layers as in prefill),
    'static' (every buffer at a fixed shape and address, lengths, masks, positions and routing history on the
    device, one host decision per routed layer: does any row run it) or 'cuda_graphs' (the static step captured
    as CUDA graphs, one per run of dense layers and one per routed layer's body, replayed; on a CPU model it
    decodes as 'static'). Prefill and training are not affected."""
    sink_tokens: int = 0
    """The first n tokens of every document (position ids 0..n-1) run every routed layer whatever their gate, in
    training, prefill and decode (the attention sink); counted in rates and KV; top-k selects outside them."""
    skipped_kv: Literal["drop", "keep"] = "drop"
    """What a skipped token leaves in a routed layer: 'drop' (the paper: no K/V; executed tokens attend to executed
    tokens only) or 'keep' (K/V from its layer input are computed and cached, so executed tokens attend to every
    token; saves Q, attention, O and MLP of skipped tokens but no KV, except in layers that are off, p = 1)."""
    rate_hold: Literal["off", "window"] = "off"
    """'window': routed layer j runs token t iff its logit ranks in the top layer_rates[j] share of the last
    rate_window logits of its document (itself included): a causal per-sequence threshold that holds each layer's
    rate on any text. Layers without a layer_rates entry, and 'off', use the fixed threshold p_j."""
    rate_window: int = 256
    """Tokens (of the same document, padding excluded) whose logits set a token's threshold under rate_hold."""
    layer_rates: dict[int, float] = field(default_factory=dict)
    """Per-layer target execution rates ({layer_index: rate in [0, 1]}) that rate_hold='window' realises; written by
    the 'routed' start and by calibrate_thresholds."""

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
            "decode": ("eager", "static", "cuda_graphs"),
            "skipped_kv": ("drop", "keep"),
            "rate_hold": ("off", "window"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, f"got {getattr(self, name)!r}; choose one of {', '.join(map(repr, allowed))}")
        if not (0.0 < float(self.threshold) < 1.0):
            bad("threshold", f"p={self.threshold} must lie strictly between 0 and 1 (default 0.5)")
        self.layer_thresholds = {int(k): float(v) for k, v in dict(self.layer_thresholds).items()}
        for k, v in self.layer_thresholds.items():
            if not (0.0 < v <= 1.0):
                bad("layer_thresholds", f"layer {k}: p={v} must lie in (0, 1) (or be 1.0: the layer is off)")
        self.layer_rates = {int(k): float(v) for k, v in dict(self.layer_rates).items()}
        for k, v in self.layer_rates.items():
            if not (0.0 <= v <= 1.0):
                bad("layer_rates", f"layer {k}: rate {v} must lie in [0, 1]")
        if isinstance(self.sink_tokens, bool) or not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            bad("sink_tokens", f"{self.sink_tokens!r} must be an integer >= 0 (0: no sink; 1-4 keeps the attention "
                "sink, the first tokens of every document)")
        if isinstance(self.rate_window, bool) or not isinstance(self.rate_window, int) or self.rate_window < 1:
            bad("rate_window", f"{self.rate_window!r} must be an integer >= 1, e.g. 256")
        if self.rate_hold == "window" and self.routing != "threshold":
            bad("rate_hold", "'window' replaces the thresholds of threshold routing; top-k already fixes each "
                "sequence's rate by its capacity: use rate_hold 'off' with routing 'topk'")
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
        for name, allowed in (("target_scope", ("layer", "global")), ("gate_form", ("sigmoid", "ste"))):
            if getattr(self, name) not in allowed:
                bad(name, f"got {getattr(self, name)!r}; choose one of {', '.join(map(repr, allowed))}")
        if not 0.0 <= self.rate_floor < 1.0:
            bad("rate_floor", f"{self.rate_floor} must lie in [0, 1)")
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
            if self.rate_hold == "window" and not self.layer_rates:
                bad("rate_hold", "'window' holds the per-layer rates in layer_rates, which is empty: set layer_rates "
                    "({layer: rate}), start from init 'routed' (it writes them), or calibrate_thresholds the model "
                    "with rate_hold 'window'")

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

    def is_off(self, layer: int) -> bool:
        """Layer `layer` is off (p = 1): no token runs it, nothing is computed or stored."""
        return self.threshold_for(layer) >= 1.0

    def held_rate(self, layer: int) -> float | None:
        """The rate rate_hold='window' realises in `layer`, or None when its fixed threshold decides."""
        return self.layer_rates.get(int(layer)) if self.rate_hold == "window" else None

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
        d["layer_rates"] = {str(k): v for k, v in self.layer_rates.items()}
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


def _bad(cls: str, name: str, value, fix: str) -> ConfigError:
    """One line naming the field as the command line spells it (train.x for TrainConfig), its value, the fix."""
    where = {"TrainConfig": "train"}.get(cls, cls)
    return ConfigError(f"{where}.{name} = {value!r}: {fix}")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""TrainConfig.lora_target_modules' default: the attention and MLP projections of a Llama-shaped decoder layer."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to train for (a resumed run continues up to this step)."""
    micro_batch_size: int = 1
    """Sequences per rank per forward/backward (DeepSpeed train_micro_batch_size_per_gpu)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (DeepSpeed gradient_accumulation_steps)."""
    seq_len: Optional[int] = None
    """Packed sequence length; None: the recipe's (curriculum) stage lengths, 2048 for 'synthetic'."""
    lr: float = 3e-5
    """Peak learning rate of the base-model parameters (MoDification: 3e-5)."""
    router_lr: Optional[float] = None
    """Peak learning rate of the routers; None means the same as `lr`."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of the peak learning rate."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    router_stage_steps: int = 0
    """First optimizer steps in which only the routers learn (every other group at lr 0: a routers-only stage on the
    frozen model, as SkipGPT trains before LoRA); the other groups' warm-up and decay start after it."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to routers, norms and biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    precision: Literal["bf16", "fp32", "fp16"] = "bf16"
    """'bf16' or 'fp32' ('fp16' is refused on CPU and discouraged on GPU)."""
    trainable: Literal["full", "routers", "routers+modules", "lora"] = "full"
    """'full' (all parameters), 'routers' (routers only), 'routers+modules' (routers + `train_modules`) or 'lora'
    (routers + LoRA adapters on `lora_target_modules`, the base weights frozen; the export merges the adapters)."""
    train_modules: list[str] = field(default_factory=list)
    """Name substrings of extra modules trained with trainable='routers+modules' (e.g. ['norm', 'mlp'])."""
    lora_rank: int = 16
    """trainable='lora': rank r of each adapter (the update is B @ A with A [r, in], B [out, r])."""
    lora_alpha: float = 32.0
    """trainable='lora': adapter scale numerator; the update is multiplied by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """trainable='lora': dropout on the adapters' input, in [0, 1)."""
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """trainable='lora': names (last component) of the linear layers that get adapters; routers always train fully."""
    grad_checkpointing: bool = False
    """Recompute decoder layers in backward to save activation memory."""
    objective: Literal["lm", "kd", "lm+kd"] = "lm"
    """'lm' (next-token loss), 'kd' (forward KL to the dense original's next-token distribution) or both."""
    lm_weight: float = 1.0
    """Weight of the LM loss when `objective` includes it."""
    kd_weight: float = 1.0
    """Weight of the KD loss when `objective` includes it."""
    kd_temperature: float = 1.0
    """Softmax temperature of both distributions in the KD loss (scaled by T^2; Minitron: 1 is best)."""
    kd_hidden_weight: float = 0.0
    """Weight of the hidden-state term of distillation (objective 'kd' / 'lm+kd'): the mean cosine distance
    1 - cos(h_student, h_teacher) after the decoder layers `kd_hidden_layers`, at the positions the KD loss scores
    (0: off; Minitron found it helps a little only for deep cuts)."""
    kd_hidden_layers: list[int] = dataclasses.field(default_factory=list)
    """Decoder layers (the original model's indices; negative from the end) whose outputs the hidden-state term
    compares; empty: the last layer. A layer deleted from a pruned student cannot be chosen."""
    rate_control: Literal["loss", "thresholds"] = "loss"
    """How the execution rate follows MoDConfig.target_rate: 'loss' (the auxiliary loss moves the routers) or
    'thresholds' (also, after every step the thresholds move to the scheduled quantile of the step's router
    logits, so the realised rate follows the schedule exactly; per layer, or one common shift with global scope)."""
    rate_warmup_steps: int = 0
    """Anneal the target rate linearly from `rate_start` to MoDConfig.target_rate over this many steps (0: none)."""
    rate_start: float = 1.0
    """Target rate at step 0 of the anneal (1.0: every token runs, the dense model)."""
    seed: int = 1234
    """Seed of parameters' random parts, dropout and data order."""
    save_every: int = 500
    """Write a checkpoint every N optimizer steps (0: only at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Number of most recent checkpoints kept on disk."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""
    per_source_loss: bool = True
    """Log the LM loss per data source (needs `source_ids` in the rows)."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """'offline' (local run, `wandb sync` later), 'online', or 'disabled'."""
    wandb_project: str = "mod_train"
    """wandb project name."""
    run_name: Optional[str] = None
    """Run name for wandb and the log; defaults to the output directory's name."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    elastic: bool = False
    """Resume a checkpoint written at another world size (or global-batch split): model and optimizer state through
    DeepSpeed's universal checkpoint, the data re-sharded by document, grad_accum recomputed to keep the global
    batch; refused in one line where that cannot be done (docs/training.md)."""
    exit_after_steps: int = 0
    """Testing aid: stop (without saving) after this many steps of this process (0: off)."""

    def validate(self) -> None:
        def bad(name, fix):
            raise _bad("TrainConfig", name, getattr(self, name), fix)
        _check_choices(self)
        if self.trainable == "routers+modules" and not self.train_modules:
            bad("train_modules", "trainable='routers+modules' needs a non-empty list, e.g. ['mlp']")
        self._validate_lora(bad)
        for name in ("max_steps", "micro_batch_size", "grad_accum", "seq_len", "log_every", "keep_last"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.seq_len is not None and self.seq_len < 2:
            bad("seq_len", "a row needs at least 2 tokens to predict one")
        for name in ("save_every", "warmup_steps", "exit_after_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0 (0 turns it off)")
        for name in ("lr", "router_lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                bad(name, "learning rates must be > 0, e.g. 3e-5")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must lie in [0, 1]")
        for name in ("lm_weight", "kd_weight"):
            if getattr(self, name) < 0:
                bad(name, "loss weights must be >= 0")
        if not self.kd_temperature > 0:
            bad("kd_temperature", "must be > 0 (1.0 is the usual choice)")
        if self.kd_hidden_weight < 0:
            bad("kd_hidden_weight", "loss weights must be >= 0 (0: no hidden-state term)")
        if self.kd_hidden_weight > 0 and not self.uses_teacher:
            bad("kd_hidden_weight", f"the hidden-state term distils: set objective to 'kd' or 'lm+kd' "
                f"(it is {self.objective!r}) or the weight to 0")
        if self.rate_warmup_steps < 0:
            bad("rate_warmup_steps", "must be >= 0 (0: no anneal)")
        if not 0 <= self.router_stage_steps <= self.max_steps:
            bad("router_stage_steps", f"must lie in [0, max_steps={self.max_steps}] (0: no routers-only stage)")
        if not 0 < self.rate_start <= 1:
            bad("rate_start", "an execution rate lies in (0, 1]")

    def _validate_lora(self, bad) -> None:
        """The LoRA fields (checked whatever `trainable` is, so a typo never waits for the switch to 'lora')."""
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            bad("lora_rank", "the adapter rank must be an integer >= 1, e.g. 16")
        if not self.lora_alpha > 0:
            bad("lora_alpha", "the adapter scale must be > 0, e.g. 32 (twice the rank)")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "a dropout probability lies in [0, 1), e.g. 0.05")
        targets = self.lora_target_modules
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
            bad("lora_target_modules", "give a non-empty list of linear-layer names, e.g. ['q_proj', 'v_proj']")
        if any("router" in t for t in targets):
            bad("lora_target_modules", "routers always train fully under trainable='lora'; remove them from the list")

    @property
    def uses_teacher(self) -> bool:
        """Whether the objective needs the dense original's predictions."""
        return "kd" in self.objective

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class EvalConfig:
    dense: Optional[str] = None
    """Dense HF model directory (the baseline); None: the run's model, or the offline SmolLM2-135M."""
    recipe: str = "data_recipes/offline_long_mix.yaml"
    """Data recipe whose held-out split is evaluated (its tokenizer must match the models)."""
    out: str = "runs/eval"
    """Output directory of the report."""
    mod: Optional[str] = None
    """Saved MoD model directory; None with mod_from_dense converts the dense model (untrained)."""
    mod_from_dense: bool = False
    """Evaluate an untrained conversion of `dense` with `mod_overrides` (routers as initialised)."""
    mod_overrides: dict[str, Any] = field(default_factory=dict)
    """MoDConfig fields for mod_from_dense (e.g. {'router_init': 'dense'})."""
    lengths: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    """Context lengths (window sizes) of the perplexity evaluation."""
    max_docs: Optional[int] = 4
    """Held-out documents evaluated (None: all)."""
    max_tokens: Optional[int] = None
    """Truncate each evaluated document to this many tokens (None: whole documents)."""
    unseen: bool = True
    """Also evaluate on the recipe's unseen-domain sources (heldout.unseen): perplexity, rates and KV there."""
    pruning_baseline: bool = True
    """Also evaluate static depth pruning at the MoD model's realised compute (its lowest-influence layers
    deleted, n_routed * (1 - rate) of them): the baseline a MoD model must beat."""
    targets: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125])
    """Target execution rates of the post-hoc calibration sweep (threshold routing)."""
    sweep_length: Optional[int] = None
    """Context length of the sweep (None: the smallest of `lengths`)."""
    calib_docs: int = 2
    """Held-out documents used only for calibration (never evaluated)."""
    calib_tokens: int = 2048
    """Tokens of each calibration document used."""
    prefill_tokens: Optional[int] = None
    """Tokens of the KV/prefill measurement (None: the largest length, capped by the first document)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Model dtype for evaluation."""
    progress: bool = True
    """tqdm progress bars."""
    tasks: Union[list[str], str] = field(default_factory=list)
    """lm-evaluation-harness tasks run on both models, a list or 'a,b,c': the local held-out tasks (mod_lastword,
    mod_choice, mod_lastword_unseen, mod_choice_unseen) or any lm-eval task name (hub tasks need a network)."""
    task_examples: int = 100
    """Examples generated per local task (written with its YAML under <out>/lm_eval_tasks)."""
    task_limit: Optional[int] = None
    """Examples lm-eval evaluates per task (None: all)."""
    seed: int = 0
    """Seed of the local tasks' examples and of the retrieval probes (same seed, same files and probes)."""
    passkey: bool = False
    """Passkey retrieval, dense vs MoD, at every retrieval length and depth."""
    needle: bool = False
    """Key-value needle-in-a-haystack retrieval (one key asked among `retrieval_distractors` others), dense vs MoD."""
    retrieval_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    """Retrieval probe lengths in tokens (prompt + answer); at most the model's max_position_embeddings."""
    retrieval_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    """Needle depths in the haystack: 0 = its start, 1 = its end (just before the question)."""
    retrieval_trials: int = 3
    """Probes per (length, depth): different haystack offsets and needles."""
    retrieval_distractors: int = 3
    """Other keys' needles in each key-value probe."""
    samples: int = 0
    """Held-out prompts whose greedy continuations by both models the report shows side by side (0: none)."""
    sample_prompt_tokens: int = 192
    """Tokens of each sample prompt (from the middle of a held-out document)."""
    sample_new_tokens: int = 48
    """Tokens each model generates per sample prompt."""

    def __post_init__(self):
        if isinstance(self.tasks, str):  # `--tasks a,b,c` on the command line
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]

    def validate(self) -> None:
        def bad(name, fix):
            raise _bad("EvalConfig", name, getattr(self, name), fix)
        _check_choices(self)
        for name in ("task_examples", "task_limit", "retrieval_trials", "sample_prompt_tokens", "sample_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "must be >= 1" + (" (or null: all)" if name == "task_limit" else ""))
        for name in ("samples", "retrieval_distractors"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0 (0: none)")
        if (self.passkey or self.needle) and (not self.retrieval_lengths or min(self.retrieval_lengths) < 64):
            bad("retrieval_lengths", "give probe lengths of at least 64 tokens, e.g. [1024, 2048]")
        if (self.passkey or self.needle) and (not self.retrieval_depths
                                              or any(not 0 <= d <= 1 for d in self.retrieval_depths)):
            bad("retrieval_depths", "needle depths lie in [0, 1], e.g. [0.1, 0.5, 0.9]")
        if not self.lengths or any(n < 2 for n in self.lengths):
            bad("lengths", "give context lengths of at least 2 tokens, e.g. --lengths [512,2048]")
        if any(not 0 < t <= 1 for t in self.targets):
            bad("targets", "target execution rates lie in (0, 1], e.g. [1.0, 0.5, 0.25]")
        for name in ("max_docs", "max_tokens", "sweep_length", "prefill_tokens", "calib_docs", "calib_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "must be >= 1 (or null where allowed)")
        self.check_models()

    def check_models(self) -> None:
        """Cheap checks of the model locations before any model is loaded (a missing local folder is named as
        such, not as a bad hub id; a local folder must hold an HF config.json, a MoD one for `mod`), and a warning
        for lengths beyond the dense model's max_position_embeddings (perplexity there measures extrapolation)."""
        import warnings

        if self.dense is not None:
            check_model_location(self.dense, "EvalConfig.dense")
            _check_model_dir(self.dense, "EvalConfig.dense", mod=False)
        if self.mod:
            check_model_location(self.mod, "EvalConfig.mod")
            _check_model_dir(self.mod, "EvalConfig.mod", mod=True)
        if self.dense is None:
            return
        from transformers import AutoConfig
        limit = getattr(AutoConfig.from_pretrained(self.dense), "max_position_embeddings", None)
        beyond = [n for n in self.lengths if limit is not None and n > limit]
        if beyond:
            msg = (f"EvalConfig.lengths {beyond} exceed the dense model's max_position_embeddings {limit}: "
                   "perplexity there measures extrapolation beyond the trained context")
            warnings.warn(msg, stacklevel=2)
            print(f"[mod_train] warning: {msg}", flush=True)


def _check_model_dir(path: str, name: str, mod: bool) -> None:
    """A local model folder holds an HF config.json, and a MoD one (model_type 'mod_*') where a MoD model is due.
    Read as JSON: no Auto class (and no remote code) is involved before the load."""
    import json
    import os
    cfg = os.path.join(os.path.expanduser(path), "config.json")
    if not os.path.isdir(os.path.expanduser(path)):
        return  # a hub id
    try:
        with open(cfg) as f:
            model_type = json.load(f).get("model_type", "")
    except (OSError, ValueError):
        raise ConfigError(f"{name} = {path!r}: not a Hugging Face model directory (no readable config.json); give "
                          "a folder written by save_pretrained or launch/export.py") from None
    if mod and not model_type.startswith("mod_"):
        raise ConfigError(f"{name} = {path!r}: model_type {model_type!r} is not a MoD model; give a folder exported "
                          "from a MoD run (launch/export.py), or use --mod_from_dense true to convert a dense model")


@dataclass
class RunSpec:
    """What a training run reads and writes (the trainer's input besides the MoD and training settings)."""

    model: str
    """Dense HF model directory or hub id to convert; 'smollm2' = the offline SmolLM2-135M."""
    out: str
    """Output directory: checkpoints/, metrics.jsonl, wandb/ (re-running the same command resumes)."""
    ds: Union[str, dict] = "ds_configs/zero1.json"
    """DeepSpeed config (a ds_configs/*.json preset or a dict); "auto" values are filled from `train`."""
    recipe: str = "synthetic"
    """Data recipe YAML, or 'synthetic' for random tokens."""
    dense: bool = False
    """Train the unmodified dense model (baseline) instead of the MoD model."""
    tokenizer: Optional[str] = None
    """The run's tokenizer if not the model's own: it tokenises the data and ships with the export."""
    allow_tokenizer_mismatch: bool = False
    """Train although the recipe's `tokenizer:` differs from the run's tokenizer (which is used anyway)."""
    data: dict[str, Any] = field(default_factory=dict)
    """Recipe overrides as dotted keys, e.g. {'seed': 3, 'stages.0.seq_len': 1024, 'sources.code.weight': 0.5}."""
    teacher: Optional[str] = None
    """Model the 'kd' objective distils (None: the model being converted, its own weights with routing off)."""


@dataclass
class RunConfig(RunSpec):
    """The root configuration of a run: every launcher parses (a part of) it."""

    init: Literal["dense", "probe", "allocated", "routed"] = "dense"
    """Start point: 'dense' (routers as mod.router_init), 'probe' (routers fitted to each layer's token-importance
    probe, centred so every routed layer starts at init_rate), 'allocated' (one budget init_rate over all routed
    layers by block influence: the least influential layers start skipped whole, which is static depth pruning,
    the rest run, the tokens of the one partly-run layer chosen by the probe; its rate-0 layers are off, p = 1) or
    'routed' (one budget over all (token, layer) pairs: those with the largest predicted update run, sinks left
    out; each layer's share is written to mod.layer_rates for rate_hold 'window'; fit_routers_to_importance
    pooled)."""
    init_rate: Optional[float] = None
    """Execution rate of the start point (probe: per layer, None = the dense gate; allocated: the mean, required)."""
    init_deleted: int = 0
    """The hybrid start (init 'routed' only): this many routed layers of lowest block influence are deleted whole
    first (off, p = 1: no compute, no K/V, as static pruning picks them) and the rest of the init_rate budget is
    spread over tokens in the other layers."""
    mod: MoDConfig = field(default_factory=MoDConfig)
    """The method (MoDConfig)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop (TrainConfig)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation after training (the main job; EvalConfig)."""

    def validate(self) -> None:
        self.mod.validate()
        self.train.validate()
        self.eval.validate()
        if self.init_rate is not None and not 0 < self.init_rate <= 1:
            raise _bad("RunConfig", "init_rate", self.init_rate, "an execution rate lies in (0, 1], e.g. 0.5")
        if self.mod.rate_hold == "window" and not self.mod.layer_rates and self.init == "dense":
            raise _bad("mod", "rate_hold", "window", "the held rates come from the start point: use init "
                       "'routed' (or 'allocated' / 'probe' with init_rate), or set mod.layer_rates")
        if self.init_deleted < 0 or (self.init_deleted and self.init != "routed"):
            raise _bad("RunConfig", "init_deleted", self.init_deleted, "layers deleted whole before routing: 0, or "
                       f"a positive count with init 'routed' (init is {self.init!r})")
        if self.init in ("allocated", "routed") and self.init_rate is None:
            raise _bad("RunConfig", "init_rate", None, f"init={self.init!r} needs the start's mean execution rate, "
                       "e.g. 0.5")


def _check_choices(obj) -> None:
    """Literal-typed fields hold one of their choices (dataclasses built in code bypass the CLI's check)."""
    import typing
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        if typing.get_origin(tp) is Literal and getattr(obj, f.name) not in typing.get_args(tp):
            raise _bad(type(obj).__name__, f.name, getattr(obj, f.name),
                       "choose one of " + ", ".join(map(repr, typing.get_args(tp))))
