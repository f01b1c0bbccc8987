#!/usr/bin/env python
"""Fetch the offline text corpus (idempotent): `python launch/fetch_corpus.py [--out DIR] [--with-debian-docs]`.

See mod_train/data/corpus.py for what is fetched, the pinned checksums and the output format.
"""
import sys

from mod_train.data.corpus import main

if __name__ == "__main__":
    sys.exit(main())
