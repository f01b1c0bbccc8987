"""Engine construction: the model, built so it fits (parallel/), wrapped by deepspeed.initialize.

One entry, `build_engine`, for both kinds: a plain DeepSpeed engine over the HF/MoD model (ZeRO 0-3, AutoTP)
or a pipeline engine over the model's stages (parallel/pipeline.py). It returns what it built; the trainer
keeps it. Parallelism is applied here from outside: parallel/ is handed the model and never sees the loop.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from mod_train.config import RunSpec, TrainConfig
from mod_train.parallel import dsconfig
from mod_train.train import lora
from mod_train.train.objective import resolve_hidden_layers
from mod_train.train.optim import param_groups, scheduler, set_trainable


@dataclass
class Built:
    """What build_engine made."""

    engine: Any
    """The DeepSpeed engine (DeepSpeedEngine or PipelineEngine)."""
    model: Any
    """The module it wraps (the MoD/HF model, or the PipelineModule)."""
    group_names: list[str]
    """Names of the optimizer's parameter groups, in order (decay, no_decay, router)."""
    n_trainable: int
    """Trainable parameters (full count, also under ZeRO-3)."""
    n_params: int
    """All parameters."""
    accepts_doc_ids: bool
    """Whether the forward takes `doc_ids` (packed-document attention)."""
    keepalive: Any = None
    """Objects that must live as long as the model (ZeRO-3's HfDeepSpeedConfig)."""

    @property
    def pipeline(self) -> bool:
        return hasattr(self.engine, "train_batch")


def build_engine(spec: RunSpec, tc: TrainConfig, mod_cfg, ds: dict, tp: int = 1,
                 before_engine: Optional[Callable[[Any], None]] = None) -> Built:
    """Build model and engine for a filled DeepSpeed config `ds`. `before_engine(model)` runs just before
    deepspeed.initialize (the place to edit parameters: ZeRO-1/2 take their fp32 master copies there).
    trainable='lora' injects the adapters (train/lora.py) into the built model before anything else sees it."""
    import deepspeed

    if tc.trainable == "lora" and (dsconfig.pp_stages(ds) > 1 or tp > 1):
        from mod_train.config import ConfigError
        raise ConfigError("train.trainable = 'lora': LoRA adapters are not supported with pipeline or tensor "
                          "parallelism; use a ZeRO preset (ds_configs/zero1.json .. zero3.json)")
    if dsconfig.pp_stages(ds) > 1:
        model, keep = _pipeline_module(spec, mod_cfg, ds), None
        mpu = None
    else:
        from mod_train.parallel.zero3 import build_model
        model, keep = build_model(spec.model, mod_cfg, ds, dtype=torch.float32)
        if tc.trainable == "lora":
            lora.apply(model, tc)
        if tc.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        mpu = None
        if tp > 1:
            from mod_train.parallel.autotp import tp_groups
            mpu = tp_groups(tp)
    n_trainable, n_params = set_trainable(model, tc)
    if before_engine is not None:
        before_engine(model)
    groups = param_groups(model, tc)
    kw = {} if mpu is None else {"mpu": mpu}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, lr_scheduler=scheduler(tc, [g["name"] for g in groups]),
                                           config=dsconfig.for_engine(ds), **kw)
    pipe = hasattr(engine, "train_batch")
    module = model if pipe else engine.module
    accepts = pipe or "doc_ids" in inspect.signature(type(module).forward).parameters
    return Built(engine, module, [g["name"] for g in groups], n_trainable, n_params, accepts, keep)


def _pipeline_module(spec: RunSpec, mod_cfg, ds: dict):
    from mod_train.mod.convert import from_pretrained_mod
    from mod_train.parallel.pipeline import build_pipeline_module

    if mod_cfg is None:
        raise ValueError("pipeline training is implemented for MoD models (use ZeRO for the dense baseline)")
    model = from_pretrained_mod(spec.model, mod_cfg, dtype=torch.float32)
    pcfg = ds.get("pipeline", {})
    return build_pipeline_module(model, dsconfig.pp_stages(ds), pcfg.get("partition", "uniform"),
                                 int(pcfg.get("activation_checkpoint_interval", 0) or 0))


def build_teacher(spec: RunSpec, tc: TrainConfig, mod_cfg, ds: dict, student: Built, tp: int = 1):
    """The dense original's next-token logits for the KD objective, as `teacher(kw) -> logits`, or None.

    - Routers only (the base weights never change): the student's own weights with routing off, no copy.
    - LoRA (the base weights never change either): the student's own weights with routing and adapters off.
    - Otherwise a frozen copy built the way the student is (partitioned under ZeRO-3, no optimizer state) from
      `spec.teacher` or the start model, run as the MoD stack with routing off, so packed documents never
      attend to each other, exactly as in the student.
    - Its location, config and vocabulary (the student's) were checked by preflight, before any model loaded.
    - `teacher.model` is the module it runs; `teacher.hidden_layers` the layers of the hidden-state term.
    """
    if not tc.uses_teacher:
        return None
    from mod_train.config import ConfigError, MoDConfig
    if student.pipeline:
        raise ConfigError("TrainConfig.objective=%r: distillation is not supported with pipeline parallelism; "
                          "use ZeRO-3 or AutoTP" % tc.objective)
    if tc.trainable in ("routers", "lora") and spec.teacher is None and mod_cfg is not None:
        model = student.model
    else:
        import deepspeed
        from mod_train.parallel.zero3 import build_model
        cfg = mod_cfg or MoDConfig()
        src = spec.teacher or spec.model
        model, keep = build_model(src, cfg, ds, dtype=torch.float32)
        model.requires_grad_(False)
        kw = {}
        if tp > 1:
            from mod_train.parallel.autotp import tp_groups
            kw["mpu"] = tp_groups(tp)
        engine, _, _, _ = deepspeed.initialize(model=model, config=dsconfig.for_inference(ds), **kw)
        model = engine.module.eval()
        model._teacher_keepalive = keep

    def teacher(inputs: dict) -> torch.Tensor:
        with model.routing_disabled(), lora.adapters_disabled(model):
            return model(**inputs).logits

    teacher.model = model  # the hidden-state term reads the teacher's layers through it (objective.capture_hidden)
    teacher.hidden_layers = resolve_hidden_layers(tc, model.config.num_hidden_layers)
    return teacher
