#!/usr/bin/env python
"""Stream throughput (read + tokenise + pack, tokens/s) and resume latency of a recipe, one process.

    OMP_NUM_THREADS=1 python launch/bench_data.py data_recipes/offline_long_mix.yaml --tokens 4000000

Figures for this repository's 2-core machine are in docs/data.md.
"""
import argparse
import json
import time

from mod_train.data import PackedStream, load_recipe, load_tokenizer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--tokens", type=int, default=4_000_000, help="tokens to stream per stage")
    ap.add_argument("--stages", type=int, nargs="*", default=None, help="stage indices (default: all)")
    a = ap.parse_args(argv)
    r = load_recipe(a.recipe)
    tok = load_tokenizer(r)
    results = []
    for stage in a.stages if a.stages is not None else range(len(r.stages)):
        s = PackedStream(r, tok, stage=stage, max_rows=10**12)
        n_rows = max(1, a.tokens // s.seq_len)
        t0 = time.perf_counter()
        first = None
        for i, _row in zip(range(n_rows), s):
            if i == 0:
                first = time.perf_counter() - t0
        dt = time.perf_counter() - t0
        state = s.state_dict()
        t1 = time.perf_counter()
        s2 = PackedStream(r, tok, stage=stage, max_rows=10**12)
        s2.load_state_dict(state)
        a_row, b_row = next(s), next(s2)
        resume = time.perf_counter() - t1
        assert (a_row["input_ids"] == b_row["input_ids"]).all()
        res = {"stage": stage, "seq_len": s.seq_len, "rows": n_rows, "tokens": n_rows * s.seq_len,
               "seconds": round(dt, 2), "tokens_per_s": round(n_rows * s.seq_len / dt),
               "first_row_s": round(first, 3), "resume_next_row_s": round(resume, 3),
               "state_bytes": len(json.dumps(state)), "shares": {k: round(v, 4) for k, v in s.realised_shares().items()}}
        results.append(res)
        print(json.dumps(res))
    return results


if __name__ == "__main__":
    main()
