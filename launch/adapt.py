#!/usr/bin/env python
"""MoDification training: convert a dense HF causal LM and train it on DeepSpeed, resumably.

One machine (N ranks; CPU ranks too):
    deepspeed --num_gpus 2 launch/adapt.py --ds ds_configs/zero3.json --model HuggingFaceTB/SmolLM2-135M \
        --recipe data_recipes/offline_long_mix.yaml --out runs/smol --mod.threshold 0.5 --train.max_steps 1000
torchrun:   torchrun --nproc_per_node 2 launch/adapt.py ...same arguments...
One process: python launch/adapt.py ...same arguments...
Cluster:    sbatch launch/slurm/adapt.sbatch (see launch/slurm/README in docs/training.md)

Re-running the same command resumes from <out>/checkpoints/latest. SIGTERM/SIGUSR1 write a
checkpoint and exit cleanly (exit code 0; SLURM requeues the job). Overrides: --mod.<field>,
--train.<field> (see mod_train/config.py and mod_train/train/config.py); --config run.yaml (or .json) holds
defaults for both sections ({"mod": {...}, "train": {...}}).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse(argv=None):
    import yaml
    from mod_train import MoDConfig
    from mod_train.train.config import TrainConfig, apply_overrides, split_overrides

    rest, pairs = split_overrides(list(sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ds", default="ds_configs/zero1.json", help="DeepSpeed config (ds_configs/*.json)")
    ap.add_argument("--model", required=True, help="dense HF model directory or hub id")
    ap.add_argument("--recipe", required=True, help="data recipe YAML, or 'synthetic'")
    ap.add_argument("--out", required=True, help="output directory (checkpoints, metrics, wandb)")
    ap.add_argument("--config", help="YAML/JSON with {'mod': {...}, 'train': {...}} defaults")
    ap.add_argument("--tokenizer", help="tokenizer location if not the model directory")
    ap.add_argument("--dense", action="store_true", help="train the unmodified dense model (baseline)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(rest)
    # YAML or JSON (JSON is YAML); other top-level keys (e.g. launch/main_cpu.yaml's eval:) are ignored
    base = yaml.safe_load(open(args.config)) if args.config else {}
    mod = MoDConfig.from_dict(base.get("mod", {}))
    tc = TrainConfig(**base.get("train", {}))
    apply_overrides({"mod": mod, "train": tc}, pairs)
    mod.validate()
    tc.validate()
    return args, mod, tc


def main(argv=None) -> int:
    from mod_train.train.config import ConfigError
    try:
        args, mod, tc = parse(argv)
    except (ConfigError, ValueError) as e:
        print(f"adapt.py: error: {e}", file=sys.stderr)
        return 2
    from mod_train.parallel import dist as pdist
    from mod_train.train.trainer import RunSpec, train
    spec = RunSpec(model=args.model, out=args.out, ds=args.ds, recipe=args.recipe, dense=args.dense,
                   tokenizer=args.tokenizer)
    res = train(spec, tc, mod)
    pdist.shutdown()
    if res["rank"] == 0:
        print(f"[mod_train] {res['status']} at step {res['step']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
