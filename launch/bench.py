#!/usr/bin/env python
"""Efficiency benchmark: dense original vs its MoD version in the same run (prefill, decode, KV bytes,
peak memory, optional forward+backward), with ideal ratios from FLOP/byte counting.

    python launch/bench.py                                   # SmolLM2, 1k-8k, rates 0.5/0.25/0.125
    python launch/bench.py --mod runs/main/model --lengths [2048,8192] --train_lengths [2048,8192]
    python launch/bench.py --serve true --lengths [8192,32768] --rates [0.5,0.125] --dtype bfloat16   # serving
Writes <out>/bench.json, bench.png and bench.md; prints the table. Settings: mod_train.eval.bench.BenchConfig.
"""
import os
from pathlib import Path

from mod_train import cli
from mod_train.eval.bench import BenchConfig


def main(argv):
    cfg = cli.parse(BenchConfig, argv, prog="bench.py", description=__doc__)
    from mod_train.eval.bench import run_bench, table
    res = run_bench(cfg)
    md = table(res)
    Path(cfg.out, "bench.md").write_text(f"{res['model']} on {res['device']} ({os.cpu_count()} cores)\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    cli.main(main, "bench.py")
