#!/usr/bin/env python
"""Fetch the offline text corpus (idempotent): `python launch/fetch_corpus.py [--out DIR] [--force true]`.

See mod_train/data/corpus.py for what is fetched, the pinned checksums and the output format.
"""
from dataclasses import dataclass
from typing import Optional

from mod_train import cli


@dataclass
class FetchConfig:
    out: Optional[str] = None
    """Output folder (default: $MOD_TRAIN_HOME/corpus)."""
    force: bool = False
    """Rebuild even if the manifest says it is up to date."""


def main(argv):
    cfg = cli.parse(FetchConfig, argv, prog="fetch_corpus.py", description=__doc__)
    from mod_train.data.corpus import CorpusError, fetch_corpus
    try:
        fetch_corpus(cfg.out, cfg.force)
    except CorpusError as e:
        raise cli.ConfigError(str(e)) from None
    return 0


if __name__ == "__main__":
    cli.main(main, "fetch_corpus.py")
