#!/usr/bin/env python
"""Preview or build a data recipe: token shares, length histograms, long-document fractions, throughput.

    python launch/build_data.py data_recipes/offline_long_mix.yaml                  # stage 0, whole budget
    python launch/build_data.py data_recipes/offline_long_mix.yaml --stage 1 --rows 200
    python launch/build_data.py RECIPE --rows 1000 --out runs/shards                 # also write packed shards
    python launch/build_data.py RECIPE --split heldout                               # the held-out documents
    python launch/build_data.py RECIPE --data '{"seed": 7, "stages.0.seq_len": 4096}' # recipe overrides

The offline corpus used by the default recipe comes from `python launch/fetch_corpus.py`.
"""
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from mod_train import cli


@dataclass
class BuildConfig:
    recipe: str
    """data_recipes/*.yaml"""
    stage: int = 0
    """Curriculum stage index."""
    rows: Optional[int] = None
    """Rows to build (None: the stage's token budget)."""
    split: Literal["train", "heldout"] = "train"
    """Which split of the recipe."""
    dp_rank: int = 0
    """Data-parallel rank whose shard is built."""
    dp_world_size: int = 1
    """Data-parallel ranks the stream is sharded over."""
    out: Optional[str] = None
    """Write packed shards (npz + index.json) into this folder."""
    shard_rows: int = 256
    """Rows per shard file."""
    data: dict[str, Any] = field(default_factory=dict)
    """Recipe overrides as dotted keys, e.g. {'seed': 7, 'sources.code.weight': 0.5}."""
    json: Optional[str] = None
    """Also write the statistics as JSON to this file."""
    progress: bool = True
    """Show progress."""


def main(argv):
    a = cli.parse(BuildConfig, argv, prog="build_data.py", description=__doc__, positional=("recipe",))
    from mod_train.data import load_recipe
    from mod_train.data.build import build, format_stats
    stats = build(load_recipe(a.recipe, **a.data), stage=a.stage, rows=a.rows, dp_rank=a.dp_rank,
                  dp_world_size=a.dp_world_size, split=a.split, out=a.out, shard_rows=a.shard_rows,
                  progress=a.progress)
    print(format_stats(stats))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(stats, f, indent=1)
    return 0


if __name__ == "__main__":
    cli.main(main, "build_data.py")
