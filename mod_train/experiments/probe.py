"""A probe-initialised start point for adaptation: the dense model converted to MoD with each router fitted
to the token-importance probe (mod_train.fit_routers_to_importance) on the first training rows, saved as a
MoD checkpoint that the trainer starts from (it keeps a MoD checkpoint's routers). Used by the main job and
the ablation, and by launch/adapt.py with `init`; the held-out documents stay unseen until evaluation."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from mod_train.config import ConfigError, RunConfig


def start_point(cfg: RunConfig, reuse: bool = True) -> RunConfig:
    """`cfg` as a run starts from it: unchanged for init 'dense'; otherwise its model is the probe-fitted MoD
    checkpoint <out>/init_model (init 'probe' / 'allocated' / 'routed', at `init_rate`; with `reuse`, one already
    there is taken as it is: a resumed run starts from its checkpoint anyway) and its MoD settings gain the start's
    allocation (`start_mod_config`)."""
    if cfg.init == "dense":
        return cfg
    init = Path(cfg.out) / "init_model"
    if reuse and (init / "config.json").is_file():
        return dataclasses.replace(cfg, model=str(init), mod=start_mod_config(cfg.mod, init))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"RunConfig.init={cfg.init!r}: the probe runs in one process and {init} does not exist "
                          "yet; run the same command once as plain `python launch/adapt.py ...` (the launcher "
                          "re-uses it afterwards), or pass a probe start directory as --model")
    path, r2 = probe_start(cfg.model, cfg.mod, cfg.recipe, cfg.train.seq_len or 512, init, rate=cfg.init_rate,
                           overrides=cfg.data, allocate=cfg.init == "allocated", pooled=cfg.init == "routed",
                           delete=cfg.init_deleted)
    print(f"[mod_train] routers fitted to token importance: probe R^2 mean {sum(r2.values()) / len(r2):.2f}"
          + (f", starting at execution rate {cfg.init_rate}" if cfg.init_rate else ""), flush=True)
    return dataclasses.replace(cfg, model=path, mod=start_mod_config(cfg.mod, path))


def start_mod_config(user, start_dir) -> "MoDConfig":
    """The MoD settings of a run from a fitted start: the user's, plus the allocation the start wrote (per-layer
    rates, held under rate_hold 'window', and the off layers, p = 1); the user's own entries win."""
    from mod_train.config import MoDConfig
    saved = MoDConfig.from_dict(json.loads((Path(start_dir) / "config.json").read_text()).get("mod") or {})
    off = {j: p for j, p in saved.layer_thresholds.items() if p >= 1.0}
    return dataclasses.replace(user, layer_rates={**saved.layer_rates, **user.layer_rates},
                               layer_thresholds={**off, **user.layer_thresholds})


def first_rows(recipe_path: str, seq_len: int, rows: int = 4, overrides: dict | None = None) -> list[dict]:
    """The first `rows` packed training rows of `seq_len` tokens (input_ids, position_ids: documents restart)."""
    from mod_train.data import PackedStream, load_recipe, load_tokenizer
    recipe = load_recipe(recipe_path, **(overrides or {}))
    stream = PackedStream(recipe, load_tokenizer(recipe), seq_len=seq_len, split="train")
    return [{k: v[None] for k, v in next(stream).items() if k in ("input_ids", "position_ids")} for _ in range(rows)]


def probe_start(model_path: str, mod_cfg, recipe_path: str, seq_len: int, out, rate: float | None = None,
                rows: int = 4, overrides: dict | None = None, allocate: bool = False,
                pooled: bool = False, delete: int = 0) -> tuple[str, dict[int, float]]:
    """Fit the routers on `rows` packed training rows of `seq_len` tokens (document boundaries kept), centred
    at execution `rate` (None: at the dense init gate); save model and tokenizer to `out`. Returns the
    directory and the probe's R^2 per routed layer.

    With `allocate`, `rate` is one budget over all routed layers, spent by block influence on the same rows
    (mod_train.mod.prune.allocate_budget): each layer's router is centred at its own rate (0: the layer is
    skipped whole, 1: it runs every token), so the start contains static depth pruning. With `pooled`, `rate` is
    one budget over all (token, layer) pairs ranked by the probes' predicted update (init 'routed'); with
    `delete` as well (the hybrid start, RunConfig.init_deleted), the `delete` routed layers of lowest block
    influence are turned off first (static deletion, as the pruning baseline picks them) and the rest of the
    budget is spent token by token in the other layers."""
    from transformers import AutoModelForCausalLM

    from mod_train import fit_routers_to_importance, modify
    from mod_train.data import load_recipe, load_tokenizer
    from mod_train.mod.prune import allocate_budget, block_influence, lowest_influence
    if delete and not (pooled and rate is not None):
        raise ConfigError(f"RunConfig.init_deleted={delete}: deleting layers before routing is the hybrid start of "
                          "init 'routed' with an init_rate; use init 'routed' or set init_deleted 0")
    batches = first_rows(recipe_path, seq_len, rows, overrides)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    hold, mod_cfg = mod_cfg.rate_hold, dataclasses.replace(mod_cfg, rate_hold="off")  # the fit writes the rates
    rates = rate
    if delete:
        routed = mod_cfg.routed_layers(model.config.num_hidden_layers)
        if not 0 < delete < len(routed) or rate * len(routed) > len(routed) - delete:
            raise ConfigError(f"RunConfig.init_deleted={delete}: with init_rate {rate} over {len(routed)} routed "
                              f"layers at most {int(len(routed) * (1 - rate) + 1e-9)} can be deleted whole (the "
                              "others must carry the budget); lower init_deleted")
        bi = block_influence(model.eval(), batches)
        drop = lowest_influence({j: bi[j] for j in routed}, delete)
        model = modify(model, dataclasses.replace(mod_cfg, layer_thresholds={
            **mod_cfg.layer_thresholds, **{j: 1.0 for j in drop}}))
    elif allocate:
        if rate is None:
            raise ConfigError("RunConfig.init_rate is required with init='allocated' (the start's mean rate)")
        bi = block_influence(model.eval(), batches)
        model = modify(model, mod_cfg)
        rates = allocate_budget(bi, model.routed_layers, rate)
    else:
        model = modify(model, mod_cfg)
    r2 = fit_routers_to_importance(model, batches, rate=rates, pooled=pooled)
    model.set_mod_config(dataclasses.replace(model.mod_config, rate_hold=hold))
    out = Path(out)
    model.save_pretrained(out)
    load_tokenizer(load_recipe(recipe_path, **(overrides or {}))).save_pretrained(out)
    return str(out), r2
