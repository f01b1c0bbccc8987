"""`trainable: lora` through peft: LoRA adapters on the base model's linear projections, routers trained fully.

- `apply(model, tc)`: inject adapters into the `tc.lora_target_modules` layers in place
  (`peft.inject_adapter_in_model`): the model keeps its own class, forward (doc_ids, cache), `mod_config`,
  `routing_disabled()` and routers; a target `q_proj` becomes a peft `lora.Linear` whose `base_layer` is the
  original layer, and the adapter parameters' names hold `lora_` (what `optim.set_trainable` trains).
- `adapters_disabled(model)`: every adapter off for the block; with routing off as well this is the dense
  original, so the KD teacher under lora is the student's own weights (no copy).
- `merge(model)`: fold each adapter into its base weight (W + B A * alpha / r) and put the plain layer back:
  the model saves as a plain MoD model (no `lora_` keys), as after a full run.

The injection happens before deepspeed.initialize (train/engine.py). Under ZeRO-3 the base weights are already
partitioned by then; the new adapter parameters are ordinary tensors, created from the same seed on every rank,
which the ZeRO-3 engine partitions at initialize like any parameter it finds unpartitioned.
"""
from __future__ import annotations

from contextlib import contextmanager

from mod_train.config import ConfigError, TrainConfig

LORA_KEY = "lora_"
"""Substring of every adapter parameter's name (lora_A, lora_B)."""


def lora_config(tc: TrainConfig):
    """The peft LoraConfig of `tc`'s lora_* fields (no bias adapters: the base biases stay frozen)."""
    from peft import LoraConfig
    return LoraConfig(r=tc.lora_rank, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout,
                      target_modules=list(tc.lora_target_modules), bias="none")


def recorded(train: dict) -> TrainConfig:
    """The lora settings of a run as its checkpoint recorded them (meta.json `train`), as a TrainConfig."""
    names = ("trainable", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")
    return TrainConfig(**{k: train[k] for k in names if k in train})


def apply(model, tc: TrainConfig):
    """Inject LoRA adapters into `model` in place; returns it. A target list that matches no layer is one line
    naming the field."""
    from peft import inject_adapter_in_model
    try:
        inject_adapter_in_model(lora_config(tc), model)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        raise ConfigError(f"train.lora_target_modules = {list(tc.lora_target_modules)!r}: no such linear layer in "
                          f"the model; use names of its projections, e.g. ['q_proj', 'v_proj']") from None
    return model


def lora_layers(model) -> list:
    """The peft LoRA layers of `model` (empty when it has no adapters)."""
    return [m for m in model.modules() if _is_lora(m)]


@contextmanager
def adapters_disabled(model):
    """Every LoRA adapter of `model` is off inside the block (peft's `enable_adapters`), back on after it; a model
    without adapters is left as it is. Adapters are on (and trainable) again after the block."""
    layers = lora_layers(model)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def merge(model):
    """Fold every adapter into its base layer's weight and replace the peft layer by that base layer, in place;
    returns the model, which then holds no `lora_` parameter (peft's merge_and_unload for injected adapters).
    Every parameter must be materialised (not ZeRO-3 partitioned)."""
    targets = [(name, m) for name, m in model.named_modules() if name and _is_lora(m)]
    for name, m in targets:
        m.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.get_base_layer())
    if "peft_config" in vars(model):  # inject_adapter_in_model's record of the adapters: none are left
        del model.peft_config
    return model


def _is_lora(m) -> bool:
    from peft.tuners.lora import LoraLayer
    return isinstance(m, LoraLayer)
