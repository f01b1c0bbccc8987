"""Training configuration (one dataclass, one-line doc per field) and `--section.key value` overrides.

`TrainConfig` holds everything the loop needs that is not the method (`MoDConfig`) or the data
(`mod_train.data`). `apply_overrides` maps command-line pairs such as `--mod.threshold 0.55` or
`--train.max_steps 100` onto the dataclasses with type checking and a "did you mean" hint.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A training/override setting is invalid; the message names the field and the fix."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to train for (a resumed run continues up to this step)."""
    micro_batch_size: int = 1
    """Sequences per rank per forward/backward (DeepSpeed train_micro_batch_size_per_gpu)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (DeepSpeed gradient_accumulation_steps)."""
    seq_len: int | None = None
    """Packed sequence length; None: the recipe's (curriculum) stage lengths, 2048 for 'synthetic'."""
    lr: float = 3e-5
    """Peak learning rate of the base-model parameters (MoDification: 3e-5)."""
    router_lr: float | None = None
    """Peak learning rate of the routers; None means the same as `lr`."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of the peak learning rate."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to routers, norms and biases)."""
    betas: tuple = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    precision: str = "bf16"
    """'bf16' or 'fp32' ('fp16' is refused on CPU and discouraged on GPU)."""
    trainable: str = "full"
    """'full' (all parameters), 'routers' (routers only) or 'routers+modules' (routers + `train_modules`)."""
    train_modules: list = field(default_factory=list)
    """Name substrings of extra modules trained with trainable='routers+modules' (e.g. ['norm', 'mlp'])."""
    grad_checkpointing: bool = False
    """Recompute decoder layers in backward to save activation memory."""
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
    wandb: str = "offline"
    """'offline' (local run, `wandb sync` later), 'online', or 'disabled'."""
    wandb_project: str = "mod_train"
    """wandb project name."""
    run_name: str | None = None
    """Run name for wandb and the log; defaults to the output directory's name."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    exit_after_steps: int = 0
    """Testing aid: stop (without saving) after this many steps of this process (0: off)."""

    def validate(self) -> None:
        def bad(name, msg):
            raise ConfigError(f"TrainConfig.{name}: {msg}")
        if self.precision not in ("bf16", "fp32", "fp16"):
            bad("precision", f"got {self.precision!r}; choose 'bf16' or 'fp32'")
        if self.trainable not in ("full", "routers", "routers+modules"):
            bad("trainable", f"got {self.trainable!r}; choose 'full', 'routers' or 'routers+modules'")
        if self.trainable == "routers+modules" and not self.train_modules:
            bad("train_modules", "trainable='routers+modules' needs a non-empty list, e.g. ['mlp']")
        for name in ("max_steps", "micro_batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.lr <= 0 or (self.router_lr is not None and self.router_lr <= 0):
            bad("lr", "learning rates must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must lie in [0, 1]")
        if self.keep_last < 1:
            bad("keep_last", "keep at least one checkpoint")
        if self.wandb not in ("offline", "online", "disabled"):
            bad("wandb", f"got {self.wandb!r}; choose 'offline', 'online' or 'disabled'")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# -- overrides -------------------------------------------------------------------------------------

def _coerce(value: str, tp, where: str, in_union: bool = False):
    """Parse a command-line string into the annotated type `tp` (a typing object or a str)."""
    if isinstance(tp, str):
        tp = eval(tp, {**vars(typing), "list": list, "dict": dict, "tuple": tuple})  # annotations are strings
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        errs = []
        for a in sorted(args, key=lambda a: a is str):  # str last: '[1,3]' is a list, not a string
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, in_union=True)
            except ConfigError as e:
                errs.append(str(e))
        raise ConfigError(f"{where}: cannot parse {value!r} as {tp}")
    if tp is bool:
        v = value.lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected a boolean (true/false), got {value!r}")
    if tp in (int, float):
        try:
            return tp(value) if tp is float else int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        return value
    if tp in (list, tuple, dict) or origin in (list, tuple, dict):
        base = origin or tp
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            v = [x for x in value.split(",") if x] if base is not dict and not (in_union and "," not in value) else None
            if v is not None and base is list:
                v = [int(x) if x.lstrip("-").isdigit() else x for x in v]
        if not isinstance(v, (list, dict)) or (base is dict) != isinstance(v, dict):
            raise ConfigError(f"{where}: expected a {base.__name__} (JSON or comma-separated), got {value!r}")
        return tuple(v) if base is tuple else v
    if tp is typing.Any:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    # Union-like LayerSpec etc. fall through: try JSON, else the raw string.
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def apply_overrides(sections: dict[str, Any], pairs: list[tuple[str, str]]) -> None:
    """Apply `(section.key, value)` string pairs onto dataclass instances in `sections` in place.

    Unknown sections or keys raise `ConfigError` with the closest valid name.
    """
    for dotted, raw in pairs:
        if "." not in dotted:
            raise ConfigError(f"--{dotted}: overrides look like --section.key (sections: {', '.join(sections)})")
        sec, key = dotted.split(".", 1)
        if sec not in sections:
            hint = difflib.get_close_matches(sec, list(sections), n=1)
            raise ConfigError(f"--{dotted}: unknown section {sec!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f"; sections: {', '.join(sections)}")
        obj = sections[sec]
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            raise ConfigError(f"--{dotted}: unknown key {key!r} for {type(obj).__name__}"
                              + (f" (did you mean '{sec}.{hint[0]}'?)" if hint else ""))
        hints = typing.get_type_hints(type(obj)) if True else {}
        setattr(obj, key, _coerce(raw, hints.get(key, fields[key].type), f"--{dotted}"))


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate `--a.b value` / `--a.b=value` pairs from the other arguments."""
    rest, pairs, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=", 1)[0] and not a.startswith("--local_rank"):
            if "=" in a:
                k, v = a[2:].split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{a}: missing value")
                k, v = a[2:], argv[i + 1]
                i += 1
            pairs.append((k, v))
        else:
            rest.append(a)
        i += 1
    return rest, pairs
