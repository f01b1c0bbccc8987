#!/usr/bin/env python
"""The MoDification ablation in one command: from one base model, train on the same tokens (recipe, seed,
steps) threshold-p with the rate-steering layer-load loss, top-k MoD at the threshold run's realised rate,
threshold-p without the auxiliary loss, and the whole-block gate; then one table of held-out perplexity,
realised execution rate, KV bytes and prefill time (see mod_train/eval/ablate.py).

    python launch/ablate.py --out runs/ablate --steps 30 --seq-len 512          # the offline SmolLM2
    python launch/ablate.py --model <dense dir> --recipe <yaml> --variants threshold,topk --steps 200

Writes <out>/table.md and <out>/results.json (rewritten after every variant) and one run directory per
variant (metrics.jsonl; checkpoints are deleted unless --keep-checkpoints true).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    os.environ.setdefault("WANDB_MODE", "disabled")
    from mod_train.eval.ablate import AblationConfig, run_ablation
    from mod_train.eval.cli import add_dataclass_args, to_config
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(ap, AblationConfig)
    cfg = to_config(AblationConfig, ap.parse_args(argv))
    res = run_ablation(cfg)
    from mod_train.eval.ablate import render
    print(render(res))
    print(f"[mod_train] ablation written to {cfg.out}/table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
