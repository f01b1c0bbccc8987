"""Training throughput: MoD against dense fine-tuning of the same model, in the same run (launch/bench_train.py).

    OMP_NUM_THREADS=2 python launch/bench_train.py --seq_len 2048 --steps 3 --rates [0.5,0.125]

Every configuration trains through the real trainer (DeepSpeed engine, AdamW, the same data) for
`warmup` + `steps` optimizer steps; the configurations are built side by side in one process and
their steps interleaved (dense, MoD r1, MoD r2, dense, ...), so machine load hits all of them alike;
tokens/s = seq_len / median timed step. MoD runs get
token-dependent routers (random weights, zero bias) whose per-layer thresholds are calibrated on
the rows the benchmark trains on to the requested execution rate (mod_train.calibrate_thresholds),
with alpha=0 and (by default) router lr 1e-12 so the rate stays where it was put; every other
parameter trains exactly as in the dense run. The realised rate of the timed steps is reported.
Default model: the offline SmolLM2-135M (30 layers, 15 routed: odd layers).

With --kd every configuration also runs with objective 'kd' (a frozen teacher copy), and the KD step is
reported against the same configuration's LM step (`step_vs_plain`; ideal about 1 + 1/3: one more forward).
"""
from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch


@dataclass
class TrainBenchConfig:
    model: str = "smollm2"
    """Dense HF model directory or hub id; 'smollm2' = the offline SmolLM2-135M."""
    recipe: str = "synthetic"
    """'synthetic' or a data recipe YAML."""
    seq_len: int = 2048
    """Packed row length of every step."""
    steps: int = 3
    """Timed optimizer steps per configuration."""
    warmup: int = 1
    """Untimed first steps."""
    rates: list[float] = field(default_factory=lambda: [0.5, 0.125])
    """Target execution rates of the routed layers (one MoD configuration each)."""
    kd: bool = False
    """Also time every configuration with objective 'kd' (a frozen teacher copy, full-parameter training): the
    cost of distillation per step, reported as the ratio to the same configuration's plain LM step."""
    freeze_routers: bool = True
    """Routers get lr 1e-12 (still in the optimizer) so the calibrated rate holds."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision."""
    ds: str = "ds_configs/zero1.json"
    """DeepSpeed config of every configuration."""
    out: str = "runs/bench_train"
    """Output directory (one run directory per configuration)."""
    json: Optional[str] = None
    """Write the results here (default: <out>/results.json)."""

def calibrate(t, m, rate, n_rows=2):
    """Token-dependent routers (random weights, zero bias) with per-layer thresholds at `rate`, calibrated on
    the rows this benchmark trains on. Runs before deepspeed.initialize (Trainer.before_engine) so the
    engine's fp32 master copy has them."""
    import torch

    from mod_train import random_routers
    from mod_train.data import collate
    st = t.stream
    if hasattr(st, "row"):  # synthetic: the rows this benchmark trains on, so the realised rate is the target
        rows = [st.row(i) for i in range(n_rows)]
    else:
        fresh = type(st)(st.recipe, st.tok, st.dp_rank, st.dp_world, st.seq_len)
        rows = [next(fresh) for _ in range(n_rows)]
    b = collate(rows)
    with torch.no_grad():
        random_routers(m, seed=0, batches=[{"input_ids": b["input_ids"], "position_ids": b["position_ids"]}],
                       rate=rate)


def run_train_bench(a: TrainBenchConfig) -> dict:
    """Build every configuration, interleave their steps, return (and write) tokens/s against dense."""
    from mod_train.config import MoDConfig, RunSpec, TrainConfig
    from mod_train.offline import resolve_model
    from mod_train.parallel import dist as pdist
    from mod_train.train.trainer import Trainer

    model = resolve_model(a.model)
    out = Path(a.out)
    configs = [("dense", None, "lm")] + [(f"mod_r{r}", r, "lm") for r in a.rates]
    if a.kd:
        configs = [c for name, rate, _ in configs for c in ((name, rate, "lm"), (f"{name}_kd", rate, "kd"))]
    trainers = []
    for name, rate, objective in configs:
        tc = TrainConfig(max_steps=a.warmup + a.steps, seq_len=a.seq_len, precision=a.precision, lr=1e-5,
                         router_lr=1e-12 if a.freeze_routers else None, warmup_steps=0, save_every=0,
                         wandb="disabled", progress=False, per_source_loss=False, objective=objective)
        mc = MoDConfig(router_init="zero", alpha=0.0, threshold=0.5)
        hook = None if rate is None else (lambda tr, m, rate=rate: calibrate(tr, m, rate, n_rows=a.warmup + a.steps))
        t = Trainer(RunSpec(model=model, out=str(out / name), ds=a.ds, recipe=a.recipe, dense=rate is None),
                    tc, None if rate is None else mc, before_engine=hook)
        t.setup()
        trainers.append((name, rate, t))
        gc.collect()
    # interleave the configurations step by step so that they see the same machine load
    times = {name: [] for name, _, _ in trainers}
    rates_seen = {name: [] for name, _, _ in trainers}
    losses_seen = {name: [] for name, _, _ in trainers}
    for step in range(a.warmup + a.steps):
        for name, rate, t in trainers:
            t.stream.fill(t.tc.micro_batch_size * t.tc.grad_accum)  # the step's rows, taken before the clock
            t0 = time.perf_counter()
            m = t.train_step(False)
            dt = time.perf_counter() - t0
            print(f"step {step} {name:<10} {dt:7.2f} s  loss {m['loss/lm']:.4f}  rate "
                  f"{m.get('routing/rate_mean', 1.0):.3f}", flush=True)
            if step >= a.warmup:
                times[name].append(dt)
                rates_seen[name].append(m.get("routing/rate_mean", 1.0))
                losses_seen[name].append(m["loss/lm"])
    results = []
    for name, rate, _ in trainers:
        step_t = statistics.median(times[name])
        results.append({"config": name, "target_rate": rate, "seq_len": a.seq_len, "precision": a.precision,
                        "median_step_s": step_t, "tokens_per_s": a.seq_len / step_t, "step_times_s": times[name],
                        "realised_rate": statistics.mean(rates_seen[name]), "lm_loss": losses_seen[name][-1]})
    dense = results[0]["tokens_per_s"]
    plain = {r["config"]: r["median_step_s"] for r in results}
    print(f"\n{'config':<14} {'realised rate':>13} {'step s':>8} {'tokens/s':>9} {'vs dense':>9} {'vs plain':>9}")
    for r in results:
        r["speedup_vs_dense"] = r["tokens_per_s"] / dense
        if r["config"].endswith("_kd"):  # the KD step against the same configuration's LM step
            r["step_vs_plain"] = r["median_step_s"] / plain[r["config"][:-3]]
        print(f"{r['config']:<14} {r['realised_rate']:>13.3f} {r['median_step_s']:>8.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['speedup_vs_dense']:>8.2f}x" + (f" {r['step_vs_plain']:>8.2f}x" if "step_vs_plain" in r else ""))
    path = Path(a.json or out / "results.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    res = {"config": vars(a), "results": results}
    path.write_text(json.dumps(res, indent=1))
    pdist.shutdown()
    return res
