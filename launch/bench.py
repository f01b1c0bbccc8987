#!/usr/bin/env python
"""Efficiency benchmark: dense original vs its MoD version in the same run (prefill, decode, KV bytes,
peak memory, optional forward+backward), with ideal ratios from FLOP/byte counting.

    python launch/bench.py                                   # SmolLM2, 1k-8k, rates 0.5/0.25/0.125
    python launch/bench.py --mod runs/main/model --lengths 2048 8192 --train-lengths 2048 8192
Writes <out>/bench.json, bench.png and bench.md; prints the table.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    from mod_train.eval.bench import BenchConfig, run_bench, table
    d = BenchConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default=d.dense, help="dense model dir (default: offline SmolLM2-135M)")
    ap.add_argument("--mod", default=d.mod, help="saved MoD model dir (default: convert --dense)")
    ap.add_argument("--lengths", type=int, nargs="+", default=d.lengths)
    ap.add_argument("--rates", type=float, nargs="+", default=d.rates)
    ap.add_argument("--decode-tokens", type=int, default=d.decode_tokens)
    ap.add_argument("--repeats", type=int, default=d.repeats)
    ap.add_argument("--train-lengths", type=int, nargs="*", default=d.train_lengths)
    ap.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"])
    ap.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--out", default=d.out)
    a = ap.parse_args(argv)
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = BenchConfig(dense=a.dense, mod=a.mod, lengths=a.lengths, rates=a.rates, decode_tokens=a.decode_tokens,
                      repeats=a.repeats, train_lengths=a.train_lengths, dtype=a.dtype, device=a.device, out=a.out)
    res = run_bench(cfg)
    md = table(res)
    Path(a.out, "bench.md").write_text(f"{res['model']} on {res['device']} ({os.cpu_count()} cores)\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
