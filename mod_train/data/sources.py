"""Raw document readers: one source -> (position, entry) for a given epoch, streamed through `datasets`.

Positions count the source's raw records in the epoch's *shuffled* order (0, 1, 2, ...). The order is
a pure function of (seed, stage, source, epoch): file order is permuted per epoch, then records are
permuted inside consecutive blocks of `shuffle_block` records. Starting at any position therefore
means skipping whole blocks of raw records, which is cheap (no JSON parsing, no tokenising; for
`text` sources whole files are skipped without being opened, for `parquet` whole files by their
row-count metadata), then permuting one block.

Entries are parsed lazily (`Entry.parse`) so records that belong to other data-parallel ranks are
never decoded.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Iterator, Optional

from mod_train.data.recipe import DataError, Recipe, SourceConfig, source_files


def stable_hash(*parts) -> int:
    """A 64-bit hash that is the same on every machine and run (unlike Python's hash())."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def unit_hash(*parts) -> float:
    """A uniform number in [0, 1) determined by `parts`."""
    return stable_hash(*parts) / 2.0**64


@dataclass
class Entry:
    """One raw record, not yet decoded."""

    raw: object  # a JSON line (str; bytes if not UTF-8), a record (dict), or a text file's path
    where: str   # file:line or file or hub id:index, for messages
    kind: str    # "jsonl" | "record" | "text"
    title: Optional[str] = None
    file: str = ""  # the file (or hub id) the record came from, for the bad-line fraction


class BadRecord(Exception):
    pass


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}: {e.reason})") from None


def read_text_file(path: str) -> str:
    """A text file as `open(path, encoding="utf-8").read()` gives it (universal newlines); BadRecord if not UTF-8."""
    with open(path, "rb") as f:
        return _decode(f.read()).replace("\r\n", "\n").replace("\r", "\n")


def split_lines(raw: bytes) -> list:
    """The lines of one physical (b"\\n"-ended) line as text-mode reading plus str.splitlines() gives them
    (what the datasets text loader did, so record positions are unchanged); an undecodable line stays
    one bytes line, for parse() to reject with its file and line."""
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return [raw]


def parse(entry: Entry, src: SourceConfig) -> tuple[str, str]:
    """-> (title, text); raises BadRecord for a line that is not UTF-8, malformed JSON or a record without
    a usable text field."""
    if entry.kind == "text":
        return entry.title or entry.where, read_text_file(entry.raw)
    rec = entry.raw
    if isinstance(rec, bytes):
        rec = _decode(rec)
    if entry.kind == "jsonl":
        try:
            rec = json.loads(rec)
        except json.JSONDecodeError as e:
            raise BadRecord(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    text = rec.get(src.text_field)
    if not isinstance(text, str):
        raise BadRecord(f"no string field '{src.text_field}' (fields: {sorted(rec)[:10]})")
    title = rec.get(src.title_field) if src.title_field else None
    return (str(title) if title is not None else entry.where), text


def _quiet_datasets():
    import datasets
    datasets.logging.set_verbosity_error()
    datasets.logging.disable_progress_bar()
    # load_dataset("json"/"text"/"parquet") sends a download-count HEAD request to the hub on every
    # call; offline, its DNS lookup can block for minutes. Local files need no network at all.
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False


class RawSource:
    """Streams one source's raw entries for (epoch, start position)."""

    def __init__(self, recipe: Recipe, index: int, salt: object = 0):
        self.recipe, self.index, self.src = recipe, index, recipe.sources[index]
        self.salt = salt
        base = None
        if recipe.path:
            from pathlib import Path
            base = Path(recipe.path).resolve().parent
        self.files = [] if self.src.type == "hub" else source_files(self.src, base)
        self._parquet_rows: dict[str, int] = {}

    def record_files(self) -> list[str]:
        """The `Entry.file` keys of this source's records (the unit of the bad-record fraction)."""
        if self.src.type == "hub":
            return [self.src.hub_id]
        return [self._text_key] if self.src.type == "text" else list(self.files)

    @property
    def _text_key(self) -> str:
        return f"{self.src.name} (text files)"

    # -- order ---------------------------------------------------------------------------------
    def _rng(self, *parts) -> random.Random:
        return random.Random(stable_hash(self.recipe.shuffle_seed, self.salt, self.src.name, *parts))

    def file_order(self, epoch: int, shuffle: bool = True) -> list[str]:
        files = list(self.files)
        if shuffle and len(files) > 1 and self.src.shuffle_block > 1:
            self._rng("files", epoch).shuffle(files)
        return files

    # -- raw record streams (file order, no block shuffle) -----------------------------------------
    def _records(self, files: list[str], skip: int) -> Iterator[Entry]:
        """Entries in file order, starting after `skip` raw records."""
        _quiet_datasets()
        from datasets import load_dataset

        t = self.src.type
        if t == "text":  # read lazily by parse(), so other ranks' files are never opened
            for f in files[skip:]:  # the bad-record fraction of one-document files is taken over the source
                yield Entry(f, f, "text", title=_file_title(f), file=self._text_key)
        elif t == "jsonl":
            for f in files:
                lineno = 0
                with open(f, "rb") as fh:
                    for physical in fh:
                        for line in split_lines(physical):
                            lineno += 1
                            if not line.strip():
                                continue
                            if skip:
                                skip -= 1
                                continue
                            yield Entry(line, f"{f}:{lineno}", "jsonl", file=f)
        elif t == "parquet":
            import pyarrow.parquet as pq
            while files and skip:
                n = self._parquet_rows.get(files[0])
                if n is None:
                    n = self._parquet_rows[files[0]] = pq.ParquetFile(files[0]).metadata.num_rows
                if n > skip:
                    break
                skip -= n
                files = files[1:]
            for f in files:
                ds = load_dataset("parquet", data_files=[f], streaming=True, split="train")
                if skip:
                    ds, i0, skip = ds.skip(skip), skip, 0
                else:
                    i0 = 0
                for i, rec in enumerate(ds, start=i0):
                    yield Entry(rec, f"{f}:row {i}", "record", file=f)
        elif t == "hub":  # online users only; the same code path as local files otherwise
            ds = load_dataset(self.src.hub_id, self.src.hub_config, split=self.src.hub_split, streaming=True)
            if skip:
                ds = ds.skip(skip)
            for i, rec in enumerate(ds, start=skip):
                yield Entry(rec, f"{self.src.hub_id}:{i}", "record", file=self.src.hub_id)
        else:  # pragma: no cover - validated earlier
            raise DataError(f"source '{self.src.name}': unknown type {t}")

    # -- shuffled stream -----------------------------------------------------------------------
    def iter_epoch(self, epoch: int, start: int = 0, shuffle: bool = True) -> Iterator[tuple[int, Entry]]:
        """(position, entry) in the epoch's shuffled order, from position `start`."""
        block = self.src.shuffle_block if shuffle else 0
        if block <= 1:
            for i, e in enumerate(self._records(self.file_order(epoch, shuffle), start), start=start):
                yield i, e
            return
        b0 = start // block
        records = self._records(self.file_order(epoch, shuffle), b0 * block)
        b = b0
        while True:
            chunk = []
            for e in records:
                chunk.append(e)
                if len(chunk) == block:
                    break
            if not chunk:
                return
            perm = list(range(len(chunk)))
            self._rng("block", epoch, b).shuffle(perm)
            base = b * block
            for j, k in enumerate(perm):
                if base + j >= start:
                    yield base + j, chunk[k]
            if len(chunk) < block:
                return
            b += 1


def _file_title(path: str) -> str:
    import os
    return os.path.splitext(os.path.basename(path))[0]
