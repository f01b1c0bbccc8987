#!/usr/bin/env python
"""Evaluate a MoD model against its dense model: held-out perplexity at several context lengths, routing
statistics per layer, KV bytes and prefill time, quality against KV memory over calibrated target rates.
Writes <out>/report.md (tables + PNGs) and <out>/results.json (see mod_train/eval/report.py).

    python launch/eval.py --dense <dense dir> --mod <saved MoD dir> --out runs/eval --lengths 512,2048,8192
    python launch/eval.py --dense <dense dir> --mod-from-dense --mod-overrides '{"router_init": "dense"}' ...
The default recipe is data_recipes/offline_long_mix.yaml (fetch its corpus with launch/fetch_corpus.py);
--dense defaults to the offline SmolLM2-135M.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    from mod_train.eval.cli import add_dataclass_args, to_config
    from mod_train.eval.report import EvalConfig, run_eval
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mod-from-dense", action="store_true", dest="mod_from_dense",
                    help="evaluate an untrained conversion of --dense with --mod-overrides")
    add_dataclass_args(ap, EvalConfig, skip=("mod_from_dense", "dense"))
    ap.add_argument("--dense", default=None, help="dense HF model directory (default: the offline SmolLM2-135M)")
    ns = ap.parse_args(argv)
    if ns.dense is None:
        from mod_train.offline import smollm2_path
        ns.dense = str(smollm2_path())
    if not ns.mod and not ns.mod_from_dense:
        ap.error("give --mod <dir> or --mod-from-dense")
    cfg = to_config(EvalConfig, ns)
    res = run_eval(cfg)
    print(open(os.path.join(cfg.out, "report.md")).read())
    print(f"[mod_train] report written to {cfg.out}/report.md ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
