#!/usr/bin/env python
"""The MoDification ablation in one command: from one base model, train on the same tokens (recipe, seed,
steps) threshold-p with the rate-steering layer-load loss, top-k MoD at the threshold run's realised rate,
threshold-p without the auxiliary loss, and the whole-block gate; then one table of held-out perplexity,
realised execution rate, KV bytes and prefill time (mod_train/experiments/ablate.py).

    python launch/ablate.py --out runs/ablate --steps 30 --seq_len 512          # the offline SmolLM2
    python launch/ablate.py --model <dense dir> --recipe <yaml> --variants [threshold,topk] --steps 200

Writes <out>/table.md and <out>/results.json (rewritten after every variant) and one run directory per
variant (metrics.jsonl; checkpoints are deleted unless --keep_checkpoints true).
"""
import os

from mod_train import cli
from mod_train.experiments.ablate import AblationConfig


def main(argv):
    os.environ.setdefault("WANDB_MODE", "disabled")
    cfg = cli.parse(AblationConfig, argv, prog="ablate.py", description=__doc__)
    from mod_train.experiments.ablate import render, run_ablation
    print(render(run_ablation(cfg)))
    print(f"[mod_train] ablation written to {cfg.out}/table.md")
    return 0


if __name__ == "__main__":
    cli.main(main, "ablate.py")
