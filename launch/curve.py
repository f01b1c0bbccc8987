#!/usr/bin/env python
"""Quality against compute from ablation results: one table and one PNG of held-out perplexity (in-domain and
unseen) against the KV-cache saving, MoD against static depth pruning (mod_train/experiments/curve.py).

    python launch/curve.py --results [runs/c4/results.json,runs/c7/results.json] --out docs/curve
"""
from mod_train import cli
from mod_train.experiments.curve import CurveConfig


def main(argv):
    cfg = cli.parse(CurveConfig, argv, prog="curve.py", description=__doc__)
    from mod_train.experiments.curve import render, run_curve, collect
    run_curve(cfg)
    print(render(*collect(cfg)))
    print(f"[mod_train] curve written to {cfg.out}.png and {cfg.out}.md")
    return 0


if __name__ == "__main__":
    cli.main(main, "curve.py")
