"""DeepSpeed config presets: load, fill "auto" values from the training config, refuse what cannot work.

The presets in ds_configs/ use "auto" for everything that the training config already decides
(batch sizes, clipping, precision, optimizer hyper-parameters), so the two never disagree.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from mod_train.config import ConfigError, TrainConfig


class DSConfigError(ConfigError):
    """The DeepSpeed config cannot work for this run; the message says why and what to change."""


def load(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    p = Path(path_or_dict)
    if not p.is_file():
        raise DSConfigError(f"DeepSpeed config {p} not found (presets live in ds_configs/)")
    return json.loads(p.read_text())


def on_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def tp_size(ds: dict) -> int:
    return int(ds.get("tensor_parallel", {}).get("autotp_size", 1) or 1)


def pp_stages(ds: dict) -> int:
    return int(ds.get("pipeline", {}).get("stages", 1) or 1)


def fill(ds: dict, tc: TrainConfig, world_size: int, hidden_size: int | None = None) -> dict:
    """A copy of `ds` with every "auto" value replaced from `tc` and the world layout."""
    ds = copy.deepcopy(ds)
    tp, pp = tp_size(ds), pp_stages(ds)
    if world_size % (tp * pp):
        raise DSConfigError(f"world size {world_size} is not divisible by tensor-parallel {tp} x pipeline {pp}")
    dp = world_size // (tp * pp)

    def setauto(d, key, value):
        if d.get(key, "auto") == "auto":
            d[key] = value

    setauto(ds, "train_micro_batch_size_per_gpu", tc.micro_batch_size)
    setauto(ds, "gradient_accumulation_steps", tc.grad_accum)
    setauto(ds, "train_batch_size", tc.micro_batch_size * tc.grad_accum * dp)
    setauto(ds, "gradient_clipping", tc.grad_clip)
    ds.setdefault("bf16", {})
    ds.setdefault("fp16", {})
    setauto(ds["bf16"], "enabled", tc.precision == "bf16")
    setauto(ds["fp16"], "enabled", tc.precision == "fp16")
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    setauto(params, "lr", tc.lr)
    setauto(params, "betas", list(tc.betas))
    setauto(params, "eps", tc.eps)
    setauto(params, "weight_decay", tc.weight_decay)
    if params.get("torch_adam", None) == "auto":
        params["torch_adam"] = not on_gpu()  # DeepSpeed's fused Adam needs CUDA (and a JIT build)
    zo = ds.get("zero_optimization", {})
    if hidden_size:
        h = int(hidden_size)
        setauto(zo, "reduce_bucket_size", h * h)
        if zero_stage(ds) == 3:
            setauto(zo, "stage3_prefetch_bucket_size", int(0.9 * h * h))
            setauto(zo, "stage3_param_persistence_threshold", 10 * h)
    for k in [k for k, v in zo.items() if v == "auto"]:  # leave DeepSpeed's defaults
        del zo[k]
    off = zo.get("offload_optimizer", {})
    if off.get("device") not in (None, "none") and params.get("torch_adam") and not on_gpu():
        ds["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on CPU-offloaded states (CPU-only test machines)
    if tc.grad_checkpointing:
        ds.setdefault("activation_checkpointing", {"partition_activations": False})
    validate(ds, world_size)
    return ds


def validate(ds: dict, world_size: int) -> None:
    stage, tp, pp = zero_stage(ds), tp_size(ds), pp_stages(ds)
    gpu = on_gpu()
    if ds.get("fp16", {}).get("enabled") is True and not gpu:
        raise DSConfigError("fp16 is not supported on CPU (DeepSpeed's CPU accelerator rejects it): "
                            "use --train.precision bf16 or fp32")
    if ds.get("fp16", {}).get("enabled") is True and ds.get("bf16", {}).get("enabled") is True:
        raise DSConfigError("fp16 and bf16 are both enabled; enable one")
    if pp > 1 and stage >= 2:
        raise DSConfigError(f"pipeline parallelism ({pp} stages) works only with ZeRO stage 0 or 1; this config "
                            f"asks for ZeRO-{stage} (DeepSpeed partitions gradients/parameters across the same "
                            "ranks that pipeline micro-batches need whole). Use ds_configs/pipeline.json or zero3.json")
    if pp > 1 and tp > 1:
        raise DSConfigError("pipeline + tensor parallel together is not supported by this trainer; pick one")
    if world_size % (tp * pp):
        raise DSConfigError(f"world size {world_size} is not divisible by tensor-parallel {tp} x pipeline {pp}")
    off_p = ds.get("zero_optimization", {}).get("offload_param", {}).get("device", "none")
    if off_p not in (None, "none") and stage != 3:
        raise DSConfigError(f"offload_param needs ZeRO-3 (config has ZeRO-{stage})")
    for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if ds.get(k) == "auto":
            raise DSConfigError(f"{k} is still 'auto': call fill() with the training config")
    dp = world_size // (tp * pp)
    if ds["train_batch_size"] != ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * dp:
        raise DSConfigError(f"train_batch_size {ds['train_batch_size']} != micro {ds['train_micro_batch_size_per_gpu']}"
                            f" x accumulation {ds['gradient_accumulation_steps']} x data-parallel {dp}")


def for_hf(ds: dict) -> dict:
    """The copy handed to HfDeepSpeedConfig: transformers refuses from_pretrained when the config
    carries `tensor_parallel` (AutoTP is applied later by deepspeed.initialize)."""
    d = copy.deepcopy(ds)
    if tp_size(d) > 1:
        d.pop("train_batch_size", None)  # without the TP key DeepSpeed would count TP ranks as data-parallel
    d.pop("tensor_parallel", None)
    d.pop("pipeline", None)
    return d


def for_engine(ds: dict) -> dict:
    """The copy handed to deepspeed.initialize (our own keys removed)."""
    d = copy.deepcopy(ds)
    d.pop("pipeline", None)
    return d


def for_inference(ds: dict) -> dict:
    """The copy for a frozen model that only runs forward (the KD teacher): the same ZeRO stage and precision,
    no optimizer, no scheduler, no optimizer offload."""
    d = for_engine(ds)
    d.pop("optimizer", None)
    d.pop("scheduler", None)
    d.pop("zero_force_ds_cpu_optimizer", None)
    if zero_stage(d) < 3:  # ZeRO-1/2 shard optimizer state only, and DeepSpeed refuses them without an optimizer
        d["zero_optimization"] = {"stage": 0}
    d.get("zero_optimization", {}).pop("offload_optimizer", None)
    return d
