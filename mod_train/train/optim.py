"""The optimiser's pieces: which parameters train, their groups (routers get their own lr), the schedule.

DeepSpeed builds the AdamW from the ds config ("auto" values filled from TrainConfig); these functions
decide what it sees. Used for both engine kinds (train/engine.py).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from mod_train.config import TrainConfig
from mod_train.parallel.zero3 import full_shape
from mod_train.train.lora import LORA_KEY


def set_trainable(model, tc: TrainConfig) -> tuple[int, int]:
    """Set requires_grad per `tc.trainable`; returns (trainable, total) parameter counts (ZeRO-3 aware).
    'lora' trains the routers and the adapters (train/lora.py injected them), nothing of the base model."""
    n_train = n_all = 0
    for n, p in model.named_parameters():
        if tc.trainable == "full":
            p.requires_grad_(True)
        elif tc.trainable == "routers":
            p.requires_grad_("router" in n)
        elif tc.trainable == "lora":
            p.requires_grad_("router" in n or LORA_KEY in n)
        else:
            p.requires_grad_("router" in n or any(s in n for s in tc.train_modules))
        k = getattr(p, "ds_numel", p.numel())
        n_all += k
        n_train += k if p.requires_grad else 0
    if n_train == 0:
        raise ValueError(f"trainable={tc.trainable!r} selects no parameter (does the model have routers?)")
    return n_train, n_all


def param_groups(model, tc: TrainConfig) -> list[dict]:
    """AdamW groups: matrices with weight decay, norms/biases without, routers at `router_lr` without."""
    router, decay, no_decay = [], [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "router" in n:
            router.append(p)
        elif len(full_shape(p)) >= 2 and "norm" not in n:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay, "lr": tc.lr, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr": tc.lr, "name": "no_decay"},
        {"params": router, "weight_decay": 0.0, "lr": tc.router_lr or tc.lr, "name": "router"},
    ]
    return [g for g in groups if g["params"]]


def lr_lambda(tc: TrainConfig):
    """Multiplier of the peak lr after `step` optimizer steps: linear warm-up, then cosine to min_lr_ratio."""
    def f(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / (tc.warmup_steps + 1)
        span = max(1, tc.max_steps - tc.warmup_steps)
        prog = min(1.0, (step - tc.warmup_steps) / span)
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
    return f


def group_lr_lambdas(tc: TrainConfig, names: list[str]) -> list:
    """One multiplier per param group: the routers follow `lr_lambda`; with `router_stage_steps` = n every other
    group stays at 0 for the first n steps and then runs the same schedule shifted by n (its own warm-up)."""
    base = lr_lambda(tc)
    n = tc.router_stage_steps
    if n == 0:
        return [base for _ in names]
    late = lr_lambda(dataclasses.replace(tc, max_steps=tc.max_steps - n, router_stage_steps=0))

    def shifted(step: int) -> float:
        return 0.0 if step < n else late(step - n)
    return [base if name == "router" else shifted for name in names]


def scheduler(tc: TrainConfig, names: list[str]):
    """The lr-scheduler factory deepspeed.initialize calls with the optimizer it built from the groups `names`."""
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, group_lr_lambdas(tc, names))
