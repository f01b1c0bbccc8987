"""The main job: MoDify a model on a recipe, evaluate it against the dense original, write REPORT.md.

    text = run_main(parse(RunConfig, ["--config", "launch/main_cpu.yaml"]))      # launch/main.py

Phases (each prints a header and shows progress): the offline corpus -> the dense model -> the router probe
(`init`) -> adaptation on DeepSpeed (the same Trainer as launch/adapt.py) -> export -> evaluation
(mod_train.eval) -> <out>/REPORT.md, with the evaluation's tables and PNGs under <out>/eval/.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from mod_train.config import RunConfig


class Phases:
    """Wall time per phase, announced as it starts."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.t0 = time.time()

    def start(self, name: str) -> None:
        print(f"\n[mod_train] == {name}", flush=True)
        self.seconds[name] = time.time()

    def done(self, name: str) -> None:
        self.seconds[name] = time.time() - self.seconds[name]

    def total(self) -> float:
        return time.time() - self.t0


def run_main(cfg: RunConfig) -> str:
    """Run every phase for `cfg`; returns the report's Markdown (also written to <out>/REPORT.md)."""
    import torch

    from mod_train.data import load_recipe
    from mod_train.data.corpus import fetch_corpus
    from mod_train.eval.report import run_eval
    from mod_train.experiments.probe import start_point
    from mod_train.offline import resolve_model
    from mod_train.parallel import dist as pdist
    from mod_train.train.export import export
    from mod_train.train.logger import read_metrics
    from mod_train.train.trainer import Trainer

    cfg.validate()
    ph = Phases()
    if Path(cfg.recipe).is_file() and "{corpus}" in Path(cfg.recipe).read_text():
        ph.start("offline corpus")  # the recipe reads the offline corpus: fetch it (idempotent)
        fetch_corpus()
        ph.done("offline corpus")
    load_recipe(cfg.recipe, **cfg.data)  # a bad recipe fails here, before any model work
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    ph.start("dense model")
    model_path = resolve_model(cfg.model)
    ph.done("dense model")

    start = dataclasses.replace(cfg, model=model_path)
    if cfg.init != "dense":
        ph.start("router probe")
        start = start_point(start, reuse=False)
        ph.done("router probe")

    ph.start("adaptation")
    tr = Trainer(start, cfg.train, start.mod)
    status = tr.run()
    tr.engine = tr.model = tr.built = None
    ph.done("adaptation")

    ph.start("export")
    export(out, out / "model")
    ph.done("export")

    ph.start("evaluation")
    pdist.shutdown()
    ev = dataclasses.replace(cfg.eval, dense=model_path, mod=str(out / "model"), recipe=cfg.recipe,
                             out=str(out / "eval"))
    res = run_eval(ev)
    ph.done("evaluation")

    from mod_train.eval.plots import rate_schedule
    metrics = read_metrics(out / "metrics.jsonl")
    rate_schedule(metrics, out / "rate_schedule.png")
    text = render(cfg, status, metrics, res, ph.seconds, ph.total(), torch.__version__)
    (out / "REPORT.md").write_text(text)
    return text


def _non_default(obj) -> dict:
    """The fields of a config dataclass that differ from its defaults (what the job chose)."""
    base = type(obj)()
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if getattr(obj, f.name) != getattr(base, f.name)}


def render(cfg: RunConfig, status, metrics, res, seconds, total, torch_version) -> str:
    from mod_train.eval.adaptivity import summary
    from mod_train.eval.report import field_sections, ppl_table, unseen_section
    steps = sorted(metrics)
    lengths = sorted(int(k) for k in res["ppl"])
    L = ["# mod_train main job: MoDification of SmolLM2-135M on CPU", ""]
    L.append(f"- model `{cfg.model}`, recipe `{cfg.recipe}`, {len(steps)} logged steps of "
             f"{cfg.train.seq_len} tokens, trainable `{cfg.train.trainable}`; "
             f"MoD `{json.dumps(_non_default(cfg.mod))}`; status: {status.get('status')}")
    L.append(f"- wall time: total {total / 60:.1f} min (" +
             ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f"); torch {torch_version}, "
             f"{os.cpu_count()} CPU cores")
    L.append("")
    L.append("## Adaptation (training split)")
    L.append("| step | LM loss | KD loss | aux loss | target rate | mean realised rate | tokens/s |")
    L.append("|---|---|---|---|---|---|---|")
    nan = float("nan")
    for s in sorted({steps[0], *steps[:: max(1, len(steps) // 8)], steps[-1]}):
        m = metrics[s]
        L.append(f"| {s} | {m.get('loss/lm', nan):.3f} | {m.get('loss/kd', nan):.3f} | {m.get('loss/aux', nan):.4f} | "
                 f"{m.get('routing/target', nan):.3f} | {m.get('routing/rate_mean', nan):.3f} | "
                 f"{m.get('tokens_per_s', nan):.0f} |")
    L.append("")
    L.append("The schedule against the realised rate, step by step: [rate_schedule.png](rate_schedule.png).")
    L.append("")
    L.append("## Held-out perplexity, dense original vs MoD (whole held-out documents)")
    L += ppl_table(res)
    L += unseen_section(res)
    layers = res["routing"][str(lengths[-1])]
    L.append("")
    L.append(f"## Realised execution rate per routed layer (context {lengths[-1]})")
    L.append("| layer | " + " | ".join(str(j) for j in layers) + " |")
    L.append("|---|" + "---|" * len(layers))
    L.append("| rate | " + " | ".join(f"{v['rate']:.2f}" for v in layers.values()) + " |")
    L.append("| mean gate | " + " | ".join(f"{v['gate']:.2f}" for v in layers.values()) + " |")
    if res.get("adaptivity"):
        L.append("")
        L.append(f"Routing on this text: {summary(res['adaptivity']['in_domain'])} "
                 "([eval/adaptivity_in_domain.png](eval/adaptivity_in_domain.png); how token-adaptive, per text: "
                 "`eval/report.md`).")
    pre = res["prefill"]
    L.append("")
    L.append(f"## Serving cost at the longest measured context ({pre['mod'].get('tokens')} tokens, one prefill)")
    kv_d, kv_m = pre["dense"]["kv_bytes"], pre["mod"]["kv_bytes"]
    L.append(f"- KV cache: dense {kv_d / 2**20:.1f} MiB, MoD {kv_m / 2**20:.1f} MiB -> **{kv_d / max(kv_m, 1):.2f}x** "
             "smaller")
    L.append(f"- prefill: dense {pre['dense']['seconds']:.2f} s, MoD {pre['mod']['seconds']:.2f} s -> "
             f"**{pre['dense']['seconds'] / max(pre['mod']['seconds'], 1e-9):.2f}x** faster")
    if res.get("sweep", {}).get("points"):
        L.append("")
        L.append(f"## Quality against KV memory (thresholds calibrated post hoc, context {res['sweep']['length']})")
        L.append("| target rate | realised rate | MoD ppl | KV / dense (measured) | KV / dense (ideal) |")
        L.append("|---|---|---|---|---|")
        for p in res["sweep"]["points"]:
            L.append(f"| {p['target']} | {p['rate']:.3f} | {p['ppl']:.2f} | {p['kv_measured']:.3f} | "
                     f"{p['kv_ideal']:.3f} |")
        L.append(f"\ndense ppl at that context: {res['sweep']['dense_ppl']:.2f}")
    L += [x.replace("](retrieval_", "](eval/retrieval_") for x in field_sections(res)]
    L.append("")
    L.append("Figures and the full evaluation report: `eval/report.md` (rate per layer, routing map, gate "
             "histogram, routed layers per rate bin, quality vs KV"
             + (", retrieval heatmaps" if res.get("retrieval") else "") + ").")
    return "\n".join(L) + "\n"

