#!/usr/bin/env python
"""The main job: MoDify the offline SmolLM2-135M on the offline corpus, on CPU, and print the report.

    bash launch/main.sh                         # fresh machine: set-up, then this script
    python launch/main.py [--config launch/main_cpu.yaml] [--out runs/main] [--steps N]

Steps (each shows progress): fetch the offline corpus -> convert SmolLM2 -> fit routers to token
importance -> short adaptation on DeepSpeed (the same Trainer as launch/adapt.py) -> export the MoD model
-> evaluate against the dense original -> <out>/REPORT.md (+ eval/ with tables and PNGs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_job(path: str, overrides: dict) -> dict:
    import yaml
    job = yaml.safe_load(Path(path).read_text())
    for key, value in overrides.items():
        if value is not None:
            section, _, field = key.partition(".")
            (job.setdefault(section, {}) if field else job)[field or section] = value
    return job


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "launch/main_cpu.yaml"))
    ap.add_argument("--out", default=None, help="output directory (default: the config's)")
    ap.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    ap.add_argument("--seq-len", type=int, default=None, help="override train.seq_len")
    ap.add_argument("--model", default=None, help="override the dense model")
    ap.add_argument("--recipe", default=None, help="override the data recipe")
    a = ap.parse_args(argv)
    job = load_job(a.config, {"out": a.out, "train.max_steps": a.steps, "train.seq_len": a.seq_len,
                              "model": a.model, "recipe": a.recipe})
    os.chdir(ROOT)
    report = run_main(job)
    print(report)
    return 0


def run_main(job: dict) -> str:
    import torch

    from mod_train import MoDConfig
    from mod_train.data import load_recipe
    from mod_train.data.corpus import fetch_corpus
    from mod_train.eval.report import EvalConfig, run_eval
    from mod_train.train.config import TrainConfig
    from mod_train.train.export import export
    from mod_train.train.logger import read_metrics
    from mod_train.train.trainer import RunSpec, Trainer

    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.time()

    def phase(name):
        print(f"\n[mod_train] == {name}", flush=True)
        times[name] = time.time()

    def done(name):
        times[name] = time.time() - times[name]

    if job.get("fetch_corpus", True):
        phase("offline corpus")
        fetch_corpus()
        done("offline corpus")

    phase("dense model")
    model_path = job["model"]
    if model_path == "smollm2":
        from mod_train.offline import smollm2_path
        model_path = str(smollm2_path())
    done("dense model")

    mod_cfg = MoDConfig.from_dict(job.get("mod", {}))
    tc = TrainConfig(**job.get("train", {}))
    tc.validate()
    load_recipe(job["recipe"])  # a bad recipe fails here, before any model work
    start_from = model_path
    if job.get("probe_init", False):
        # routers fitted to token importance on the first training rows (mod_train/train/probe.py)
        phase("router probe")
        from mod_train.train.probe import probe_start
        start_from, r2 = probe_start(model_path, mod_cfg, job["recipe"], tc.seq_len or 512, out / "init_model",
                                     rate=job.get("init_rate"))
        print(f"[mod_train] routers fitted to token importance: probe R^2 mean {sum(r2.values()) / len(r2):.2f}"
              + (f", starting at execution rate {job['init_rate']}" if job.get("init_rate") else ""))
        done("router probe")

    phase("adaptation")
    tr = Trainer(RunSpec(model=start_from, out=str(out), ds=job.get("ds", "ds_configs/zero1.json"),
                         recipe=job["recipe"]), tc, mod_cfg)
    status = tr.run()
    tr.engine = tr.model = None
    done("adaptation")

    phase("export")
    export(out, out / "model")
    done("export")

    phase("evaluation")
    from mod_train.parallel import dist as pdist
    pdist.shutdown()
    ev = EvalConfig(dense=model_path, mod=str(out / "model"), recipe=job["recipe"], out=str(out / "eval"),
                    **job.get("eval", {}))
    res = run_eval(ev)
    done("evaluation")
    times["total"] = time.time() - t_all

    metrics = read_metrics(out / "metrics.jsonl")
    text = render(job, status, metrics, res, times, torch.__version__)
    (out / "REPORT.md").write_text(text)
    return text


def render(job, status, metrics, res, times, torch_version) -> str:
    from mod_train.eval.report import ppl_table
    steps = sorted(metrics)
    lengths = sorted(int(k) for k in res["ppl"])
    L = ["# mod_train main job: MoDification of SmolLM2-135M on CPU", ""]
    L.append(f"- model `{job['model']}`, recipe `{job['recipe']}`, {len(steps)} logged steps of "
             f"{job['train'].get('seq_len')} tokens, trainable `{job['train'].get('trainable')}`; "
             f"MoD `{json.dumps(job.get('mod', {}))}`; status: {status.get('status')}")
    L.append(f"- wall time: total {times['total'] / 60:.1f} min (" +
             ", ".join(f"{k} {v:.0f} s" for k, v in times.items() if k != "total") + f"); torch {torch_version}, "
             f"{os.cpu_count()} CPU cores")
    L.append("")
    L.append("## Adaptation (training split)")
    L.append("| step | LM loss | aux loss | mean realised rate | tokens/s |")
    L.append("|---|---|---|---|---|")
    for s in sorted({steps[0], *steps[:: max(1, len(steps) // 8)], steps[-1]}):
        m = metrics[s]
        L.append(f"| {s} | {m.get('loss/lm', float('nan')):.3f} | {m.get('loss/aux', float('nan')):.4f} | "
                 f"{m.get('routing/rate_mean', float('nan')):.3f} | {m.get('tokens_per_s', float('nan')):.0f} |")
    L.append("")
    L.append("## Held-out perplexity, dense original vs MoD (whole held-out documents)")
    L += ppl_table(res)
    routing = res["routing"][str(lengths[-1])]
    L.append("")
    L.append(f"## Realised execution rate per routed layer (context {lengths[-1]})")
    layers = routing
    L.append("| layer | " + " | ".join(str(j) for j in layers) + " |")
    L.append("|---|" + "---|" * len(layers))
    L.append("| rate | " + " | ".join(f"{v['rate']:.2f}" for v in layers.values()) + " |")
    L.append("| mean gate | " + " | ".join(f"{v['gate']:.2f}" for v in layers.values()) + " |")
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
    L.append("")
    L.append("Figures and the full evaluation report: `eval/report.md` (rate per layer, routing map, gate "
             "histogram, quality vs KV).")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
