#!/usr/bin/env python
"""MoDification training: convert a dense HF causal LM and train it on DeepSpeed, resumably.

One machine (N ranks; CPU ranks too):
    deepspeed --num_gpus 2 launch/adapt.py --ds ds_configs/zero3.json --model HuggingFaceTB/SmolLM2-135M \\
        --recipe data_recipes/offline_long_mix.yaml --out runs/smol --mod.threshold 0.5 --train.max_steps 1000
torchrun:   torchrun --nproc_per_node 2 launch/adapt.py ...same arguments...
One process: python launch/adapt.py ...same arguments...
From a file: python launch/adapt.py --config launch/main_cpu.yaml --out runs/x   (later arguments win)
Cluster:    sbatch launch/slurm/adapt.sbatch (docs/training.md)

Re-running the same command resumes from <out>/checkpoints/latest. SIGTERM/SIGUSR1 write a checkpoint and
exit cleanly (exit code 0; SLURM requeues the job). Every setting below is a field of
mod_train.config.RunConfig (--mod.* MoDConfig, --train.* TrainConfig); --debug shows tracebacks.
"""
import dataclasses

from mod_train import cli
from mod_train.config import RunConfig


def main(argv):
    cfg = cli.parse(RunConfig, argv, prog="adapt.py", description=__doc__)
    from mod_train.data import load_recipe
    from mod_train.experiments.probe import start_point
    from mod_train.offline import resolve_model
    from mod_train.parallel import dist as pdist
    from mod_train.train.preflight import check_locations
    from mod_train.train.trainer import train

    if cfg.recipe != "synthetic" and not cfg.recipe.startswith("synthetic:"):
        load_recipe(cfg.recipe, **cfg.data)  # a bad recipe fails here, before any model is loaded
    check_locations(cfg)  # so does a missing --model/--teacher/--tokenizer folder (the probe start loads the model)
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model))
    cfg = start_point(cfg)
    res = train(cfg, cfg.train, cfg.mod)
    pdist.shutdown()
    if res["rank"] == 0:
        print(f"[mod_train] {res['status']} at step {res['step']}", flush=True)
    return 0


if __name__ == "__main__":
    cli.main(main, "adapt.py")
