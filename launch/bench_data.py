#!/usr/bin/env python
"""Stream throughput (read + tokenise + pack, tokens/s) and resume latency of a recipe, one process.

    OMP_NUM_THREADS=1 python launch/bench_data.py data_recipes/offline_long_mix.yaml --tokens 4000000

Figures for this repository's 2-core machine are in docs/data.md (mod_train/data/build.py: stream_bench).
"""
from dataclasses import dataclass
from typing import Optional

from mod_train import cli


@dataclass
class DataBenchConfig:
    recipe: str
    """data_recipes/*.yaml"""
    tokens: int = 4_000_000
    """Tokens to stream per stage."""
    stages: Optional[list[int]] = None
    """Stage indices (None: all)."""


def main(argv):
    a = cli.parse(DataBenchConfig, argv, prog="bench_data.py", description=__doc__, positional=("recipe",))
    from mod_train.data import load_recipe
    from mod_train.data.build import stream_bench
    stream_bench(load_recipe(a.recipe), a.tokens, a.stages)
    return 0


if __name__ == "__main__":
    cli.main(main, "bench_data.py")
