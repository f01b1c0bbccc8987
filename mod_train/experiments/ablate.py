"""The paper's ablation as one experiment (launch/ablate.py): variants trained from the same base model on
the same tokens (same recipe, seed, steps, sequence length) with the project's trainer, then one table.

Variants (names for --variants):
- threshold:        threshold-p, per-sub-module gate, rate-steering layer-load loss (MoDConfig.target_rate)
- threshold_alpha:  threshold-p, the paper's layer-load loss R = alpha sum_j F_j G_j (MoDConfig.alpha)
- topk:             classic top-k MoD (whole-block gate) at matched realised compute: capacity = the held-out
                    execution rate of the `threshold` run (trained after it); evaluated causally with its
                    BCE-trained predictor, plus a row with non-causal top-k at evaluation (not servable)
- threshold_noaux:  threshold-p without the auxiliary loss (alpha = 0, no target rate)
- threshold_block:  threshold-p with the whole-block gate (gate='block') instead of per-sub-module gates
- dense:            the base model, untrained (reference row; no training)

Every trained variant is evaluated on the same held-out documents: perplexity over non-overlapping windows
of `eval_length`, realised execution rate (token weighted over the routed layers), KV bytes and the time of
one prefill of `prefill_tokens` tokens of the first document with a MoDCache (dense: its own cache).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mod_train.eval import metrics as M

ROOT = Path(__file__).resolve().parents[2]
Variant = Literal["dense", "threshold", "topk", "threshold_noaux", "threshold_block", "threshold_alpha"]
ALL_VARIANTS = ("dense", "threshold", "topk", "threshold_noaux", "threshold_block", "threshold_alpha")
DEFAULT_VARIANTS = ("dense", "threshold", "topk", "threshold_noaux", "threshold_block")


@dataclass
class AblationConfig:
    model: str | None = None
    """Dense base model directory (None: the offline SmolLM2-135M, mod_train.offline.smollm2_path())."""
    recipe: str = str(ROOT / "data_recipes/offline_long_mix.yaml")
    """Training recipe; its held-out split is the evaluation text."""
    out: str = "runs/ablate"
    """Output directory: one run directory per variant, results.json, table.md."""
    variants: list[Variant] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    """Variants to run (see the module docstring); topk needs threshold (its capacity) unless topk_capacity is set."""
    steps: int = 30
    """Optimizer steps per variant."""
    seq_len: int = 512
    """Packed training sequence length."""
    micro_batch_size: int = 1
    """Sequences per optimizer step."""
    lr: float = 3e-5
    """Peak learning rate of the base parameters."""
    router_lr: float = 1e-3
    """Peak learning rate of the routers (they must move within a short run)."""
    warmup_steps: int = 2
    """Linear warm-up steps."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision ('fp32' or 'bf16')."""
    trainable: Literal["full", "routers", "routers+modules"] = "full"
    """'full', 'routers' or 'routers+modules' (TrainConfig.trainable)."""
    seed: int = 1234
    """Seed of the data order and of every run."""
    target_rate: float = 0.5
    """Rate targeted by the rate-steering loss (threshold, threshold_block)."""
    target_weight: float = 1.0
    """beta of the rate-steering loss."""
    alpha: float = 0.1
    """alpha of the paper's layer-load loss (threshold_alpha)."""
    topk_capacity: float | None = None
    """Top-k capacity; None: the realised held-out rate of the threshold run."""
    init_rate: float | None = None
    """Start every routed variant from routers fitted to the token-importance probe and centred at this
    execution rate (fit_routers_to_importance on the first training rows); None: MoDConfig.router_init."""
    mod_overrides: dict[str, Any] = field(default_factory=dict)
    """MoDConfig fields applied to every variant (e.g. {'layers': 'odd'})."""
    eval_length: int = 1024
    """Context length of the held-out perplexity."""
    eval_docs: int = 4
    """Held-out documents evaluated."""
    eval_tokens: int | None = 4096
    """Tokens of each evaluated document (None: whole documents)."""
    prefill_tokens: int = 2048
    """Tokens of the KV-bytes / prefill-time measurement."""
    prefill_repeats: int = 2
    """Prefill timings taken (the fastest is reported)."""
    ds: str = str(ROOT / "ds_configs/zero1.json")
    """DeepSpeed config of the trainer."""
    keep_checkpoints: bool = False
    """Keep each variant's training checkpoints (about 12 bytes per parameter in fp32)."""
    save_models: bool = False
    """Save each trained variant as a HF directory under <out>/<variant>/model (for launch/eval.py)."""
    progress: bool = True
    """Progress bars."""


def variant_mod_config(name: str, cfg: AblationConfig, capacity: float | None = None):
    from mod_train import MoDConfig
    base = dict(cfg.mod_overrides)
    if name == "threshold":
        d = {**base, "routing": "threshold", "gate": "submodule", "target_rate": cfg.target_rate,
             "target_weight": cfg.target_weight}
    elif name == "threshold_alpha":
        d = {**base, "routing": "threshold", "gate": "submodule", "target_rate": None, "alpha": cfg.alpha}
    elif name == "threshold_noaux":
        d = {**base, "routing": "threshold", "gate": "submodule", "target_rate": None, "alpha": 0.0}
    elif name == "threshold_block":
        d = {**base, "routing": "threshold", "gate": "block", "target_rate": cfg.target_rate,
             "target_weight": cfg.target_weight}
    elif name == "topk":
        if capacity is None:
            raise ValueError("topk needs a capacity: run the 'threshold' variant first or set topk_capacity")
        d = {**base, "routing": "topk", "gate": "block", "capacity": float(min(1.0, max(capacity, 1e-3)))}
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}")
    return MoDConfig.from_dict(d)


def evaluate(model, docs: list[list[int]], cfg: AblationConfig, desc: str) -> dict:
    from tqdm.auto import tqdm
    st = M.RoutingStats() if M.is_mod(model) else None
    with tqdm(total=sum(len(d) for d in docs), desc=f"eval {desc}", unit="tok", disable=not cfg.progress,
              leave=False) as bar:
        r = M.perplexity(model, docs, cfg.eval_length, st, bar)
    P = min(cfg.prefill_tokens, len(docs[0]))
    pre = M.prefill(model, torch.tensor(docs[0][:P])[None], repeats=cfg.prefill_repeats)
    rate = st.mean_rate() if st is not None else 1.0
    return {"ppl": r.ppl, "loss": r.loss, "tokens": r.tokens, "rate": rate,
            "rates": {} if st is None else {str(j): s.rate for j, s in sorted(st.layers.items())},
            "gates": {} if st is None else {str(j): s.mean_gate for j, s in sorted(st.layers.items())},
            "kv_bytes": pre["kv_bytes"], "prefill_s": pre["seconds"], "prefill_tokens": pre["tokens"],
            "kv_ideal": M.ideal_kv_fraction(model, rate)}


def train_variant(name: str, mod_cfg, cfg: AblationConfig, model_path: str):
    """Train one variant with the project's trainer (one plain process, world of one); returns the module."""
    from mod_train.config import RunSpec, TrainConfig
    from mod_train.train.logger import read_metrics
    from mod_train.train.trainer import Trainer
    run = Path(cfg.out) / name
    if run.exists():
        shutil.rmtree(run)  # every variant starts from the base model
    tc = TrainConfig(max_steps=cfg.steps, micro_batch_size=cfg.micro_batch_size, seq_len=cfg.seq_len, lr=cfg.lr,
                     router_lr=cfg.router_lr, warmup_steps=cfg.warmup_steps, precision=cfg.precision,
                     trainable=cfg.trainable, seed=cfg.seed, save_every=0, keep_last=1, wandb="disabled",
                     progress=cfg.progress, run_name=f"ablate-{name}")
    t0 = time.time()
    if cfg.init_rate is not None:
        from mod_train.experiments.probe import probe_start
        model_path, _ = probe_start(model_path, mod_cfg, cfg.recipe, cfg.seq_len, run / "init_model", cfg.init_rate)
    tr = Trainer(RunSpec(model=model_path, out=str(run), ds=cfg.ds, recipe=cfg.recipe), tc, mod_cfg)
    status = tr.run()
    secs = time.time() - t0
    model = tr.engine.module
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    m = read_metrics(run / "metrics.jsonl")
    last = m[max(m)] if m else {}
    info = {"status": status["status"], "train_seconds": secs, "final_lm_loss": last.get("loss/lm"),
            "final_train_rate": last.get("routing/rate_mean"),
            "first_lm_loss": m[min(m)].get("loss/lm") if m else None}
    if cfg.save_models:
        model.save_pretrained(run / "model")
    if not cfg.keep_checkpoints:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    model = model.float()
    tr.engine = tr.model = None  # drop the optimizer state
    return model, info


def run_ablation(cfg: AblationConfig) -> dict:
    from transformers import AutoModelForCausalLM
    from mod_train.data import load_recipe, load_tokenizer
    from mod_train.eval.data import load_eval_docs
    from mod_train.parallel import dist as pdist
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.model is None:
        from mod_train.offline import smollm2_path
        cfg.model = str(smollm2_path())
    for v in cfg.variants:
        if v not in ALL_VARIANTS:
            raise ValueError(f"unknown variant {v!r}; choose from {', '.join(ALL_VARIANTS)}")
    order = sorted(cfg.variants, key=lambda v: (v == "topk", ALL_VARIANTS.index(v)))  # topk after threshold
    if "topk" in order and cfg.topk_capacity is None and "threshold" not in order:
        raise ValueError("variant 'topk' takes its capacity from 'threshold': add it, or set topk_capacity")
    recipe = load_recipe(cfg.recipe)
    tok = load_tokenizer(recipe)
    docs, _ = load_eval_docs(recipe, tok, cfg.eval_docs, calib_docs=0, max_tokens=cfg.eval_tokens)
    ids = [d.ids for d in docs]
    res = {"config": dataclasses.asdict(cfg), "docs": [{"title": d.title, "source": d.source, "tokens": len(d.ids)}
                                                       for d in docs], "variants": {}}
    torch.manual_seed(cfg.seed)
    for v in order:
        t0 = time.time()
        if v == "dense":
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
            row = {"trained": False, **evaluate(model, ids, cfg, v)}
        else:
            cap = cfg.topk_capacity
            if v == "topk" and cap is None:
                cap = res["variants"]["threshold"]["rate"]
            mcfg = variant_mod_config(v, cfg, cap)
            model, info = train_variant(v, mcfg, cfg, cfg.model)
            row = {"trained": True, "mod": mcfg.to_dict(), **info, **evaluate(model, ids, cfg, v)}
            if v == "topk":  # the non-servable reference: non-causal top-k selection at evaluation
                model.set_mod_config(dataclasses.replace(model.mod_config, topk_causal_eval=False))
                nc = evaluate(model, ids, cfg, "topk (non-causal)")
                res["variants"]["topk_noncausal_eval"] = {"trained": True, "same_weights_as": "topk", **nc}
        row["seconds"] = time.time() - t0
        res["variants"][v] = row
        if v == "topk":  # keep the non-causal row after the causal one
            res["variants"]["topk_noncausal_eval"] = res["variants"].pop("topk_noncausal_eval")
        (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
        (out / "table.md").write_text(render(res))
        del model
        gc.collect()
    pdist.shutdown()
    return res


LABELS = {
    "dense": "dense base (untrained)",
    "threshold": "threshold-p + rate loss (sub-module gate)",
    "threshold_alpha": "threshold-p + layer-load loss (alpha)",
    "topk": "top-k MoD, matched capacity (causal eval)",
    "topk_noncausal_eval": "top-k MoD, same weights, non-causal eval",
    "threshold_noaux": "threshold-p, no aux loss",
    "threshold_block": "threshold-p + rate loss, whole-block gate",
}


def render(res: dict) -> str:
    c = res["config"]
    base = res["variants"].get("dense", {})
    lines = [f"Held-out perplexity at context {c['eval_length']} over {len(res['docs'])} documents "
             f"({sum(d['tokens'] for d in res['docs'])} tokens); {c['steps']} steps x {c['micro_batch_size']} x "
             f"{c['seq_len']} tokens per variant; KV bytes and prefill time of one {c['prefill_tokens']}-token prefill.",
             "",
             "| variant | ppl | realised rate | KV bytes | KV / dense | KV ideal | prefill s | train loss first -> last |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for v, r in res["variants"].items():
        kv_rel = r["kv_bytes"] / base["kv_bytes"] if base.get("kv_bytes") else float("nan")
        tl = (f"{r['first_lm_loss']:.3f} -> {r['final_lm_loss']:.3f}" if r.get("final_lm_loss") is not None else "")
        extra = f" (capacity {r['mod']['capacity']:.3f})" if v == "topk" else ""
        lines.append(f"| {LABELS.get(v, v)}{extra} | {r['ppl']:.3f} | {r['rate']:.3f} | {r['kv_bytes'] / 2**20:.2f} MiB "
                     f"| {kv_rel:.3f} | {r['kv_ideal']:.3f} | {r['prefill_s']:.3f} | {tl} |")
    return "\n".join(lines) + "\n"
