"""Evaluation of a MoD conversion against its dense model.

    from mod_train.eval import EvalConfig, run_eval, perplexity, RoutingStats
    run_eval(EvalConfig(dense="dense_dir", mod="mod_dir", out="runs/eval"))    # report.md + PNGs + results.json

- metrics.py: windowed held-out perplexity (token weighted), routing statistics read from the routers
  of the evaluated forward, one-prefill KV bytes and latency, the ideal KV fraction 1 - rho (1 - r).
- data.py:    whole held-out documents of a recipe, calibration text disjoint from them.
- report.py:  dense vs MoD report (launch/eval.py).
- plots.py:   PNGs (execution rate per layer, layer x position map, gate histogram, quality vs KV,
              routed layers per rate bin).
- adaptivity.py: how token-adaptive the routing is (partly-run layers, their share of compute, KV fraction).
- bench.py:   efficiency benchmark (launch/bench.py).
"""
from mod_train.eval.metrics import PPLResult, RoutingStats, ideal_kv_fraction, perplexity, prefill, window_nll
from mod_train.eval.report import EvalConfig, run_eval

__all__ = ["EvalConfig", "run_eval", "perplexity", "window_nll", "prefill", "ideal_kv_fraction", "RoutingStats",
           "PPLResult"]
