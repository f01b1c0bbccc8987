#!/usr/bin/env python
"""The main job: MoDify the offline SmolLM2-135M on the offline corpus, on CPU, and print the report.

    bash launch/main.sh                                    # fresh machine: set-up, then this script
    python launch/main.py [--config launch/main_cpu.yaml] [--out runs/main] [--train.max_steps N] ...

Phases (each shows progress): fetch the offline corpus -> convert SmolLM2 -> fit routers to token importance ->
short adaptation on DeepSpeed (the same Trainer as launch/adapt.py) -> export the MoD model -> evaluate against
the dense original -> <out>/REPORT.md (+ eval/ with tables and PNGs). mod_train/experiments/main_job.py.
The settings are mod_train.config.RunConfig fields; launch/main_cpu.yaml is the default --config.
"""
import os
from pathlib import Path

from mod_train import cli
from mod_train.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def main(argv):
    os.chdir(ROOT)  # the config's paths (recipe, ds) are relative to the repository
    if "--config" not in argv:
        argv = ["--config", "launch/main_cpu.yaml", *argv]
    cfg = cli.parse(RunConfig, argv, prog="main.py", description=__doc__)
    from mod_train.experiments.main_job import run_main
    print(run_main(cfg))
    return 0


if __name__ == "__main__":
    cli.main(main, "main.py")
