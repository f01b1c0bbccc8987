#!/usr/bin/env python
"""Training throughput: MoD against dense fine-tuning of the same model, in the same run, through the real
trainer (mod_train/experiments/bench_train.py; figures in docs/training.md).

    OMP_NUM_THREADS=2 python launch/bench_train.py --seq_len 2048 --steps 3 --rates [0.5,0.125]
"""
from mod_train import cli
from mod_train.experiments.bench_train import TrainBenchConfig


def main(argv):
    cfg = cli.parse(TrainBenchConfig, argv, prog="bench_train.py", description=__doc__)
    from mod_train.experiments.bench_train import run_train_bench
    run_train_bench(cfg)
    return 0


if __name__ == "__main__":
    cli.main(main, "bench_train.py")
