"""Workflows that train AND measure: the only package that imports both mod_train.train and mod_train.eval.

- main_job.py:   the main job (launch/main.py): probe -> adaptation -> export -> evaluation -> REPORT.md.
- probe.py:      the probe-initialised start point (routers fitted to token importance), main job / ablation.
- ablate.py:     the paper's ablation on the project's trainer (launch/ablate.py).
- bench_train.py: training throughput, MoD vs dense, through the real trainer (launch/bench_train.py).
"""
