#!/usr/bin/env python
"""Preview or build a data recipe: token shares, length histograms, long-document fractions, throughput.

    python launch/build_data.py data_recipes/offline_long_mix.yaml                  # stage 0, whole budget
    python launch/build_data.py data_recipes/offline_long_mix.yaml --stage 1 --rows 200
    python launch/build_data.py RECIPE --rows 1000 --out runs/shards                 # also write packed shards
    python launch/build_data.py RECIPE --split heldout                               # the held-out documents
    python launch/build_data.py RECIPE --set seed=7 --set stages.0.seq_len=4096       # recipe overrides

The offline corpus used by the default recipe comes from `python launch/fetch_corpus.py`.
"""
import argparse
import json
import sys

import yaml

from mod_train.data import DataError, load_recipe
from mod_train.data.build import build, format_stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("recipe", help="data_recipes/*.yaml")
    ap.add_argument("--stage", type=int, default=0, help="curriculum stage index (default 0)")
    ap.add_argument("--rows", type=int, default=None, help="rows to build (default: the stage's token budget)")
    ap.add_argument("--split", choices=("train", "heldout"), default="train")
    ap.add_argument("--dp-rank", type=int, default=0)
    ap.add_argument("--dp-world-size", type=int, default=1)
    ap.add_argument("--out", default=None, help="write packed shards (npz + index.json) into this folder")
    ap.add_argument("--shard-rows", type=int, default=256, help="rows per shard file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key (dotted; VALUE parsed as YAML), e.g. sources.code.weight=0.5")
    ap.add_argument("--json", default=None, help="also write the statistics as JSON to this file")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    overrides = {}
    for kv in a.set:
        if "=" not in kv:
            ap.error(f"--set expects KEY=VALUE, got '{kv}'")
        k, v = kv.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    try:
        recipe = load_recipe(a.recipe, **overrides)
        stats = build(recipe, stage=a.stage, rows=a.rows, dp_rank=a.dp_rank, dp_world_size=a.dp_world_size,
                      split=a.split, out=a.out, shard_rows=a.shard_rows, progress=not a.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_stats(stats))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(stats, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
