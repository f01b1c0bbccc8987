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
- dense_trained:    the base model trained on the same tokens with the same objective (separates adaptation to
                    the data from the effects of routing)
- pruned:           static depth pruning at matched compute: the layers of lowest block influence deleted, as
                    many as the `prune_match` variant skips on the evaluation text (n_routed * (1 - rate)), untrained
- pruned_trained:   the same pruned model trained on the same tokens with the same objective (KD from the
                    unpruned original when the objective distils)
- any name in `variant_overrides`: the `threshold` variant with those MoDConfig / TrainConfig / start changes

Every variant is evaluated on the same held-out documents: perplexity over non-overlapping windows of
`eval_length`, realised execution rate (token weighted over the routed layers), KV bytes and the time of one
prefill of `prefill_tokens` tokens of the first document with a MoDCache (dense: its own cache); and the same
on the recipe's unseen-domain sources (heldout.unseen), where the rates are measured again.
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
ALL_VARIANTS = ("dense", "threshold", "topk", "threshold_noaux", "threshold_block", "threshold_alpha",
                "dense_trained", "pruned", "pruned_trained")
DEFAULT_VARIANTS = ("dense", "threshold", "topk", "threshold_noaux", "threshold_block")


@dataclass
class AblationConfig:
    model: str | None = None
    """Dense base model directory (None: the offline SmolLM2-135M, mod_train.offline.smollm2_path())."""
    recipe: str = str(ROOT / "data_recipes/offline_long_mix.yaml")
    """Training recipe; its held-out split is the evaluation text."""
    out: str = "runs/ablate"
    """Output directory: one run directory per variant, results.json, table.md."""
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    """Variants to run (see the module docstring); topk needs threshold (its capacity) unless topk_capacity is set."""
    variant_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Named variants of `threshold`: {name: {'mod': {...}, 'train': {...}, 'init': 'probe', 'init_rate': 0.46,
    'init_deleted': 7}} ('init_deleted': the hybrid start of init 'routed', RunConfig.init_deleted)
    (one factor each; 'init_rate' when the factor changes the routed layers, so the same budget is another rate)."""
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
    trainable: Literal["full", "routers", "routers+modules", "lora"] = "full"
    """'full', 'routers', 'routers+modules' or 'lora' (TrainConfig.trainable; lora_* fields via train_overrides;
    a LoRA variant's adapters are merged before it is evaluated or saved)."""
    seed: int = 1234
    """Seed of every run (initialisation, synthetic data); a recipe's data order is the recipe's own `seed`."""
    data_seed: int | None = None
    """The recipe's order_seed for every trained variant and start point: another training order, the same
    held-out split (None: the recipe's own order)."""
    target_rate: float = 0.5
    """Rate targeted by the rate-steering loss (threshold, threshold_block)."""
    target_weight: float = 1.0
    """beta of the rate-steering loss."""
    alpha: float = 0.1
    """alpha of the paper's layer-load loss (threshold_alpha)."""
    topk_capacity: float | None = None
    """Top-k capacity; None: the realised held-out rate of the threshold run."""
    init: Literal["dense", "probe", "allocated", "routed"] = "dense"
    """Start point of every routed variant (RunConfig.init): router_init, the importance probe at init_rate per
    layer, or one budget init_rate allocated by block influence (contains static pruning)."""
    init_rate: float | None = None
    """Execution rate of the start point (required by init 'probe' / 'allocated')."""
    mod_overrides: dict[str, Any] = field(default_factory=dict)
    """MoDConfig fields applied to every variant (e.g. {'layers': 'odd', 'gate_form': 'ste'})."""
    train_overrides: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields applied to every trained variant (e.g. {'objective': 'kd', 'rate_control': 'thresholds'})."""
    prune_layers: int | None = None
    """Layers the pruned variants delete; None: matched to `prune_match`'s realised rate on the evaluation text."""
    prune_match: str = "threshold"
    """The MoD variant whose skipped compute the pruned variants match (unseen-text rate when there is some)."""
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
    threshold = {**base, "routing": "threshold", "gate": "submodule", "target_rate": cfg.target_rate,
                 "target_weight": cfg.target_weight}
    if name == "threshold":
        d = threshold
    elif name in cfg.variant_overrides:
        d = {**threshold, **cfg.variant_overrides[name].get("mod", {})}
    elif name == "threshold_alpha":
        d = {**base, "routing": "threshold", "gate": "submodule", "target_rate": None, "alpha": cfg.alpha}
    elif name == "threshold_noaux":
        d = {**base, "routing": "threshold", "gate": "submodule", "target_rate": None, "alpha": 0.0}
    elif name == "threshold_block":
        d = {**threshold, "gate": "block"}
    elif name == "topk":
        if capacity is None:
            raise ValueError("topk needs a capacity: run the 'threshold' variant first or set topk_capacity")
        d = {**base, "routing": "topk", "gate": "block", "capacity": float(min(1.0, max(capacity, 1e-3)))}
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)} or a variant_overrides name")
    return MoDConfig.from_dict(d)


def evaluate(model, docs: list[list[int]], cfg: AblationConfig, desc: str, unseen: list[list[int]] | None = None) -> dict:
    """Perplexity, realised rate and one prefill's KV bytes on the in-domain documents (and the unseen ones)."""
    out = _measure(model, docs, cfg, desc)
    if unseen:
        u = _measure(model, unseen, cfg, desc + " (unseen)")
        out.update({f"{k}_unseen": u[k] for k in ("ppl", "loss", "tokens", "rate", "rates", "kv_bytes", "kv_ideal")})
    return out


def _measure(model, docs: list[list[int]], cfg: AblationConfig, desc: str) -> dict:
    from tqdm.auto import tqdm
    st = M.RoutingStats() if M.is_mod(model) else None
    with tqdm(total=sum(len(d) for d in docs), desc=f"eval {desc}", unit="tok", disable=not cfg.progress,
              leave=False) as bar:
        r = M.perplexity(model, docs, cfg.eval_length, st, bar)
    longest = max(docs, key=len)
    P = min(cfg.prefill_tokens, len(longest))
    pre = M.prefill(model, torch.tensor(longest[:P])[None], repeats=cfg.prefill_repeats)
    rate = st.mean_rate() if st is not None else 1.0
    return {"ppl": r.ppl, "loss": r.loss, "tokens": r.tokens, "rate": rate,
            "rates": {} if st is None else {str(j): s.rate for j, s in sorted(st.layers.items())},
            "gates": {} if st is None else {str(j): s.mean_gate for j, s in sorted(st.layers.items())},
            "kv_bytes": pre["kv_bytes"], "prefill_s": pre["seconds"], "prefill_tokens": pre["tokens"],
            "kv_ideal": M.ideal_kv_fraction(model, rate) if st is not None else 1.0,
            "layers": model.config.num_hidden_layers}


def train_variant(name: str, mod_cfg, cfg: AblationConfig, model_path: str, over: dict | None = None,
                  teacher: str | None = None):
    """Train one variant with the project's trainer (one plain process, world of one); returns the module.
    `mod_cfg` None trains `model_path` as a dense model; `over` holds the variant's 'train' / 'init' changes."""
    from mod_train.config import RunSpec, TrainConfig
    from mod_train.train import lora
    from mod_train.train.logger import read_metrics
    from mod_train.train.trainer import Trainer
    over = over or {}
    run = Path(cfg.out) / name
    if run.exists():
        shutil.rmtree(run)  # every variant starts from the base model
    tc = TrainConfig(**{**dict(max_steps=cfg.steps, micro_batch_size=cfg.micro_batch_size, seq_len=cfg.seq_len,
                                lr=cfg.lr, router_lr=cfg.router_lr, warmup_steps=cfg.warmup_steps,
                                precision=cfg.precision, trainable=cfg.trainable, seed=cfg.seed, save_every=0,
                                keep_last=1, wandb="disabled", progress=cfg.progress, run_name=f"ablate-{name}"),
                        **cfg.train_overrides, **over.get("train", {})})
    tc.validate()
    t0 = time.time()
    init = over.get("init", cfg.init)
    if mod_cfg is not None and init != "dense":
        from mod_train.experiments.probe import probe_start, start_mod_config
        model_path, _ = probe_start(model_path, mod_cfg, cfg.recipe, cfg.seq_len, run / "init_model",
                                    over.get("init_rate", cfg.init_rate), overrides=_data(cfg),
                                    allocate=init == "allocated", pooled=init == "routed",
                                    delete=over.get("init_deleted", 0))
        mod_cfg = start_mod_config(mod_cfg, model_path)
    tr = Trainer(RunSpec(model=model_path, out=str(run), ds=cfg.ds, recipe=cfg.recipe, dense=mod_cfg is None,
                         teacher=teacher if tc.uses_teacher else None, data=_data(cfg)), tc, mod_cfg)
    status = tr.run()
    secs = time.time() - t0
    model = tr.engine.module
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    lora.merge(model)  # a LoRA variant becomes a plain MoD model (no-op without adapters)
    m = read_metrics(run / "metrics.jsonl")
    last = m[max(m)] if m else {}
    info = {"status": status["status"], "train_seconds": secs, "final_lm_loss": last.get("loss/lm"),
            "final_kd_loss": last.get("loss/kd"), "final_train_rate": last.get("routing/rate_mean"),
            "first_lm_loss": m[min(m)].get("loss/lm") if m else None, "train": tc.to_dict(), "init": init,
            "init_deleted": over.get("init_deleted", 0)}
    if cfg.save_models:
        model.save_pretrained(run / "model")
    if not cfg.keep_checkpoints:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    model = model.float()
    tr.engine = tr.model = tr.built = tr.teacher = None  # drop the optimizer state and the teacher
    return model, info


def _data(cfg: AblationConfig) -> dict:
    """Recipe overrides of the trained variants (the data-order seed)."""
    return {} if cfg.data_seed is None else {"order_seed": cfg.data_seed}


def _pruned_dir(cfg: AblationConfig, res: dict) -> tuple[str, list[int]]:
    """The dense model with the matched number of lowest-influence layers deleted, saved under <out>/pruned_model."""
    from transformers import AutoModelForCausalLM

    from mod_train.experiments.probe import first_rows
    from mod_train.mod.prune import block_influence, lowest_influence, matched_layers, prune_layers
    if cfg.prune_layers is not None:
        n = cfg.prune_layers
    else:
        match = res["variants"].get(cfg.prune_match)
        if match is None:
            raise ValueError(f"the pruned variants match '{cfg.prune_match}''s compute: run it first or set prune_layers")
        rate = match.get("rate_unseen", match["rate"])
        n = matched_layers(len(match["rates"]), rate)
    mc = variant_mod_config(cfg.prune_match if cfg.prune_match in cfg.variant_overrides or
                            cfg.prune_match in ALL_VARIANTS else "threshold", cfg, capacity=0.5)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    bi = block_influence(model, first_rows(cfg.recipe, cfg.seq_len, overrides=_data(cfg)))
    drop = lowest_influence(bi, n, keep_first=mc.dense_first, keep_last=mc.dense_last)
    out = Path(cfg.out) / "pruned_model"
    prune_layers(model, drop).save_pretrained(out)
    from mod_train.data import load_recipe, load_tokenizer
    load_tokenizer(load_recipe(cfg.recipe)).save_pretrained(out)
    res["pruning"] = {"layers_deleted": drop, "count": n, "block_influence": {str(k): v for k, v in bi.items()},
                      "of": n_layers}
    return str(out), drop


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
        if v not in ALL_VARIANTS and v not in cfg.variant_overrides:
            raise ValueError(f"unknown variant {v!r}; choose from {', '.join(ALL_VARIANTS)} or a variant_overrides name")
    later = {"topk": 1, "pruned": 2, "pruned_trained": 2}  # topk after threshold, pruning after the MoD variants
    order = sorted(cfg.variants, key=lambda v: (later.get(v, 0), cfg.variants.index(v)))
    if "topk" in order and cfg.topk_capacity is None and "threshold" not in order:
        raise ValueError("variant 'topk' takes its capacity from 'threshold': add it, or set topk_capacity")
    recipe = load_recipe(cfg.recipe)
    tok = load_tokenizer(recipe)
    docs, _ = load_eval_docs(recipe, tok, cfg.eval_docs, calib_docs=0, max_tokens=cfg.eval_tokens)
    ids = [d.ids for d in docs]
    unseen = None
    if recipe.heldout.unseen:
        udocs, _ = load_eval_docs(recipe, tok, cfg.eval_docs, calib_docs=0, max_tokens=cfg.eval_tokens, domain="unseen")
        unseen = [d.ids for d in udocs]
    res = {"config": dataclasses.asdict(cfg), "docs": [{"title": d.title, "source": d.source, "tokens": len(d.ids)}
                                                       for d in docs], "variants": {}}
    if unseen:
        res["docs_unseen"] = [{"title": d.title, "source": d.source, "tokens": len(d.ids)} for d in udocs]
    torch.manual_seed(cfg.seed)
    pruned = None
    for v in order:
        t0 = time.time()
        if v == "dense":
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
            row = {"trained": False, **evaluate(model, ids, cfg, v, unseen)}
        elif v == "dense_trained":
            model, info = train_variant(v, None, cfg, cfg.model, teacher=cfg.model)
            row = {"trained": True, **info, **evaluate(model, ids, cfg, v, unseen)}
        elif v in ("pruned", "pruned_trained"):
            if pruned is None:
                pruned = _pruned_dir(cfg, res)
            if v == "pruned":
                model = AutoModelForCausalLM.from_pretrained(pruned[0], dtype=torch.float32).eval()
                row = {"trained": False, "layers_deleted": pruned[1], **evaluate(model, ids, cfg, v, unseen)}
            else:
                model, info = train_variant(v, None, cfg, pruned[0], teacher=cfg.model)
                row = {"trained": True, "layers_deleted": pruned[1], **info, **evaluate(model, ids, cfg, v, unseen)}
        else:
            cap = cfg.topk_capacity
            if v == "topk" and cap is None:
                cap = res["variants"]["threshold"]["rate"]
            mcfg = variant_mod_config(v, cfg, cap)
            model, info = train_variant(v, mcfg, cfg, cfg.model, cfg.variant_overrides.get(v), teacher=cfg.model)
            row = {"trained": True, "mod": model.mod_config.to_dict(), **info, **evaluate(model, ids, cfg, v, unseen)}
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
    "dense_trained": "dense base, trained the same",
    "pruned": "static depth pruning, matched compute (untrained)",
    "pruned_trained": "static depth pruning, matched compute, trained the same",
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
    unseen = "docs_unseen" in res
    lines = [f"Held-out perplexity at context {c['eval_length']} over {len(res['docs'])} in-domain documents "
             f"({sum(d['tokens'] for d in res['docs'])} tokens)"
             + (f" and {len(res['docs_unseen'])} unseen-domain documents ({sum(d['tokens'] for d in res['docs_unseen'])}"
                f" tokens of {', '.join(sorted({d['source'] for d in res['docs_unseen']}))})" if unseen else "")
             + f"; {c['steps']} steps x {c['micro_batch_size']} x {c['seq_len']} tokens per trained variant; KV bytes "
             f"of one prefill of up to {c['prefill_tokens']} tokens of the longest document; rates measured on the "
             "evaluated text.", ""]
    head = "| variant | ppl | rate | KV / dense |" + (" unseen ppl | unseen rate | unseen KV / dense |" if unseen else "") \
        + " KV ideal | train LM loss first -> last |"
    lines += [head, "|---|" + "---:|" * (head.count("|") - 3) + "---|"]
    for v, r in res["variants"].items():
        kv_rel = f"{r['kv_bytes'] / base['kv_bytes']:.3f}" if base.get("kv_bytes") else "-"  # no dense row here
        tl = (f"{r['first_lm_loss']:.3f} -> {r['final_lm_loss']:.3f}" if r.get("final_lm_loss") is not None else "")
        extra = f" (capacity {r['mod']['capacity']:.3f})" if v == "topk" else ""
        extra += f" ({len(r['layers_deleted'])} layers deleted)" if r.get("layers_deleted") else ""
        ideal = r["kv_ideal"] if "mod" in r or v.startswith("topk") else \
            r["layers"] / (r["layers"] + len(r.get("layers_deleted", [])))
        row = f"| {LABELS.get(v, v)}{extra} | {r['ppl']:.3f} | {r['rate']:.3f} | {kv_rel} |"
        if unseen:
            ukv = f"{r['kv_bytes_unseen'] / base['kv_bytes_unseen']:.3f}" \
                if base.get("kv_bytes_unseen") and "kv_bytes_unseen" in r else "-"
            row += f" {r.get('ppl_unseen', float('nan')):.3f} | {r.get('rate_unseen', float('nan')):.3f} | {ukv} |"
        lines.append(row + f" {ideal:.3f} | {tl} |")
    return "\n".join(lines) + "\n"
