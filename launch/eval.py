#!/usr/bin/env python
"""Evaluate a MoD model against its dense model: held-out perplexity at several context lengths, routing
statistics per layer, KV bytes and prefill time, quality against KV memory over calibrated target rates; on
request lm-evaluation-harness tasks, passkey / key-value needle retrieval and side-by-side samples.
Writes <out>/report.md (tables + PNGs) and <out>/results.json (mod_train/eval/report.py).

    python launch/eval.py --dense <dense dir> --mod <saved MoD dir> --out runs/eval --lengths [512,2048,8192]
    python launch/eval.py --dense <dense dir> --mod_from_dense true --mod_overrides '{"router_init": "dense"}'
    python launch/eval.py --mod <dir> --tasks mod_lastword,mod_choice --passkey true --needle true --samples 3
The default recipe is data_recipes/offline_long_mix.yaml (fetch its corpus with launch/fetch_corpus.py);
--dense defaults to the offline SmolLM2-135M. Settings: mod_train.config.EvalConfig; docs/evaluation.md.
"""
from pathlib import Path

from mod_train import cli
from mod_train.config import ConfigError, EvalConfig


def main(argv):
    cfg = cli.parse(EvalConfig, argv, prog="eval.py", description=__doc__)
    if not cfg.mod and not cfg.mod_from_dense:
        raise ConfigError("EvalConfig.mod is not set: give --mod <saved MoD dir> or --mod_from_dense true")
    from mod_train.eval.report import run_eval
    res = run_eval(cfg)
    print((Path(cfg.out) / "report.md").read_text())
    print(f"[mod_train] report written to {cfg.out}/report.md ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    cli.main(main, "eval.py")
