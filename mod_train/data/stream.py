"""PackedStream: recipe -> weighted, tokenised, packed rows with document boundaries; exactly resumable.

Pipeline (per data-parallel rank, everything deterministic for the recipe's seed)::

    RawSource (datasets streaming; per-epoch file order + block shuffle)      one per source
      -> rank filter  (record position % dp_world_size == dp_rank, before any decoding)
      -> parse (malformed JSON lines counted, warned with file:line, fatal above max_bad_fraction)
      -> split filter (held-out documents chosen by a seeded hash of the whole document)
      -> tokenise in batches (Rust tokenizer, encode_batch_fast) + EOS, truncate, min-length,
         short-document keep-probability (counter-based hash, no RNG state)
      -> interleave by token share: the next document comes from the source furthest below its
         share (argmin tokens_s / weight_s), so realised shares track requested ones to within one
         document at every point of the stream
      -> pack: documents are concatenated and cut into full rows of seq_len (no padding); a document
         cut at a row end continues at the start of the next row as a new segment. Every segment gets
         position ids from 0, its own doc id, and label -100 at its first token.

Resume design (chosen over pre-built packed shards): all randomness is a pure function of
(seed, stage, source, epoch, position), so the whole state is small: per source the cursor
(epoch, next raw position) and the tokens/documents taken so far, the rows emitted, and the
unfinished document being packed (its remaining token ids). `load_state_dict` restores that, and each
source restarts by skipping raw records block-wise without parsing or tokenising them (text
sources skip whole files without opening them, parquet sources skip whole files by metadata), then
re-tokenises at most one tokenisation batch. The next row is identical to the uninterrupted stream's.
Pre-built shards would also resume exactly, but need a build step and disk per (recipe, seq_len, world
size); the stream needs neither and still resumes in well under a second per source on local files
(docs/data.md has the figures).

Data parallelism: rank r takes the records whose position is r modulo the world size (so the ranks'
documents are disjoint and together complete); tensor-parallel peers pass the same dp_rank and get
identical rows.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections import defaultdict
from typing import Iterator, Optional, Union

import numpy as np
import torch

from mod_train.data.recipe import DataError, Recipe, check_seq_len
from mod_train.data.sources import BadRecord, RawSource, parse, stable_hash, unit_hash

TENSOR_KEYS = ("input_ids", "position_ids", "doc_ids", "labels", "source_ids")
IGNORE_INDEX = -100
_STATE_VERSION = 1
_TOKENIZE_CHARS = 1 << 20  # a tokenisation batch stops at this many characters (bounds resume work)
MODEL_TOKENIZER = "model"  # recipe `tokenizer:` value: the training model's own tokenizer


def load_tokenizer(recipe_or_name: Union[Recipe, str]):
    """The recipe's tokenizer ('smollm2' = the offline SmolLM2 directory). A recipe with `tokenizer: model`
    is tokenised by the training model's own tokenizer: tools without a model must be given one."""
    from transformers import AutoTokenizer

    name = recipe_or_name.tokenizer if isinstance(recipe_or_name, Recipe) else recipe_or_name
    if name == MODEL_TOKENIZER:
        raise DataError("this recipe says `tokenizer: model` (the training model's own tokenizer): pass the "
                        "tokenizer explicitly (e.g. PackedStream(recipe, tokenizer=AutoTokenizer.from_pretrained(dir)))")
    if name == "smollm2":
        from mod_train.offline import smollm2_path
        name = str(smollm2_path())
    return AutoTokenizer.from_pretrained(name)


def model_max_len(tokenizer) -> Optional[int]:
    """max_position_embeddings from the tokenizer directory's config.json, else a sane model_max_length."""
    path = getattr(tokenizer, "name_or_path", "") or ""
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            c = json.load(f)
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            if isinstance(c.get(key), int):
                return c[key]
    m = getattr(tokenizer, "model_max_length", None)
    return m if isinstance(m, int) and m < 10**7 else None


def is_heldout(recipe: Recipe, source: str, title: str, text: str) -> bool:
    """Whole-document held-out split: by title list, else a seeded hash of the document's text."""
    h = recipe.heldout
    if h.titles and title in h.titles:
        return True
    if h.fraction <= 0:
        return False
    import hashlib
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return unit_hash(recipe.seed, "heldout", source, digest) < h.fraction


class _BadLines:
    """Counts malformed records per file, each line once: only the first pass (epoch 0) counts, and the
    fraction is judged over the whole file when that pass ends, never on running counts. Warns with
    file:line; fails above recipe.max_bad_fraction."""

    MAX_WARNINGS_PER_FILE = 5

    def __init__(self, recipe: Recipe):
        self.limit = recipe.max_bad_fraction
        self.seen: dict[str, int] = defaultdict(int)
        self.bad: dict[str, int] = defaultdict(int)

    def ok(self, file: str, epoch: int = 0) -> None:
        if epoch == 0:
            self.seen[file] += 1

    def record(self, source: str, where: str, file: str, why: str, epoch: int = 0) -> None:
        if epoch != 0:
            return
        self.seen[file] += 1
        self.bad[file] += 1
        if self.bad[file] <= self.MAX_WARNINGS_PER_FILE:
            warnings.warn(f"source '{source}': skipping {where}: {why}", stacklevel=2)

    def check(self, source: str, files) -> None:
        """After a whole pass over `files`: fail if one has too many malformed records."""
        for f in files:
            if self.bad[f] and self.bad[f] / self.seen[f] > self.limit:
                raise DataError(f"source '{source}': {self.bad[f]} of {self.seen[f]} records of {f} are malformed "
                                f"({self.bad[f] / self.seen[f]:.1%} > max_bad_fraction {self.limit:.1%})")


class _Reader:
    """One source's kept, tokenised documents for one rank and split, with a resumable cursor."""

    def __init__(self, stream: "PackedStream", index: int):
        self.s, self.i = stream, index
        self.src = stream.recipe.sources[index]
        self.raw = RawSource(stream.recipe, index, salt=stream._salt)
        rep = self.src.repeat
        self.max_epochs = 1 if stream.split == "heldout" else (None if rep is True else 1 if rep is False else int(rep))
        self.epoch, self.pos, self.done = 0, 0, False
        self._gen = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "done": self.done}

    def load(self, st: dict) -> None:
        self.epoch, self.pos, self.done = int(st["epoch"]), int(st["pos"]), bool(st["done"])
        self._gen = None

    def next(self):
        """-> (epoch, position, title, ids) or None when the source is exhausted."""
        if self.done:
            return None
        if self._gen is None:
            self._gen = self._docs(self.epoch, self.pos)
        doc = next(self._gen, None)
        if doc is None:
            self.done = True
            return None
        self.epoch, self.pos = doc[0], doc[1] + 1
        return doc

    def _docs(self, epoch: int, pos: int):
        s, src = self.s, self.src
        want_heldout = s.split == "heldout"
        while self.max_epochs is None or epoch < self.max_epochs:
            raw_seen, kept, batch, chars = False, 0, [], 0
            for p, entry in self.raw.iter_epoch(epoch, pos):
                raw_seen = True
                if p % s.dp_world_size != s.dp_rank:
                    continue
                try:
                    title, text = parse(entry, src)
                except BadRecord as e:
                    s._bad.record(src.name, entry.where, entry.file, str(e), epoch)
                    continue
                s._bad.ok(entry.file, epoch)
                if is_heldout(s.recipe, src.name, title, text) != want_heldout:
                    continue
                batch.append((p, title, text))
                chars += len(text)
                if len(batch) >= s.recipe.tokenize_batch or chars >= _TOKENIZE_CHARS:
                    for d in self._tokenize(epoch, batch):
                        kept += 1
                        yield d
                    batch, chars = [], 0
            for d in self._tokenize(epoch, batch):
                kept += 1
                yield d
            s._bad.check(src.name, self.raw.record_files())
            if pos == 0 and not raw_seen:
                raise DataError(f"source '{src.name}' is empty: no documents in "
                                f"{src.hub_id or src.path}")
            if pos == 0 and not kept and s.split == "train":
                raise DataError(f"source '{src.name}' yields no training documents for data-parallel rank "
                                f"{s.dp_rank}/{s.dp_world_size} after filters (min_doc_tokens, held-out split)")
            epoch, pos = epoch + 1, 0

    def _tokenize(self, epoch: int, batch):
        if not batch:
            return
        s, src = self.s, self.src
        encs = s._backend.encode_batch_fast([t for _, _, t in batch], add_special_tokens=False)
        for (p, title, _), enc in zip(batch, encs):
            ids = enc.ids
            if s._eos is not None:
                ids.append(s._eos)
            if src.max_doc_tokens is not None and len(ids) > src.max_doc_tokens:
                ids = ids[: src.max_doc_tokens]
            n = len(ids)
            if n < src.min_doc_tokens:
                continue
            if n < src.short_doc_tokens and src.short_keep_prob < 1.0:
                if unit_hash(s.recipe.seed, s._salt, "keep", src.name, epoch, p) >= src.short_keep_prob:
                    continue
            yield epoch, p, title, np.asarray(ids, dtype=np.int64)


class PackedStream:
    """Iterator of packed rows for one data-parallel rank (see the module docstring).

    Each row is a dict: input_ids, position_ids, doc_ids, labels, source_ids (LongTensor[seq_len]),
    `sources` (names of the sources in the row, in order of appearance) and `docs` (one
    (source, epoch, position, token offset) tuple per document segment, for debugging and tests).
    """

    def __init__(self, recipe: Recipe, tokenizer=None, stage: int = 0, dp_rank: int = 0, dp_world_size: int = 1,
                 split: str = "train", seq_len: Optional[int] = None, drop_last: bool = True,
                 max_rows: Optional[int] = None):
        """
        recipe: from load_recipe. tokenizer: a HF fast tokenizer (None: load the recipe's).
        stage: index into recipe.stages (sequence length and token budget). seq_len: override the
        stage's length. dp_rank/dp_world_size: data-parallel coordinates (tensor/pipeline peers pass
        the same dp_rank). split: "train" or "heldout" (held-out documents, one pass). drop_last:
        drop the unfinished last row of a finite stream instead of padding it (labels -100, source
        id -1). max_rows: stop after this many rows (default: the stage's token budget split over ranks).
        """
        if split not in ("train", "heldout"):
            raise DataError(f"split must be 'train' or 'heldout', got '{split}'")
        if not 0 <= dp_rank < dp_world_size:
            raise DataError(f"dp_rank {dp_rank} outside [0, {dp_world_size})")
        self.recipe, self.split = recipe, split
        self.stage = stage
        st = recipe.stage(stage)
        self.seq_len = int(seq_len or st.seq_len)
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.drop_last = drop_last
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe)
        if not getattr(self.tokenizer, "is_fast", False):
            raise DataError("PackedStream needs a fast (Rust) tokenizer")
        self._backend = self.tokenizer.backend_tokenizer
        limit = recipe.max_seq_len or model_max_len(self.tokenizer)
        if limit is not None:
            check_seq_len(recipe, limit)
            if self.seq_len > limit:
                raise DataError(f"seq_len {self.seq_len} exceeds the {limit} tokens the tokenizer/model supports")
        self._eos = None
        if recipe.append_eos:
            tok = recipe.eos_token or self.tokenizer.eos_token
            vocab = self.tokenizer.get_vocab()
            if tok is None or tok not in vocab:
                raise DataError(f"eos_token '{tok}' is not in the tokenizer's vocabulary")
            self._eos = vocab[tok]
        self._pad = self._eos if self._eos is not None else 0
        if max_rows is None and split == "train" and st.tokens is not None:
            max_rows = st.tokens // (self.seq_len * dp_world_size)
        self.max_rows = max_rows
        self.source_names = [s.name for s in recipe.sources]
        self.weights = recipe.normalised_weights()
        self._salt = stage  # each stage of the curriculum sees its own document order
        self._bad = _BadLines(recipe)
        self._readers = [_Reader(self, i) for i in range(len(recipe.sources))]
        self.rows = 0
        self.tokens = [0] * len(recipe.sources)  # tokens scheduled per source (the share accounting)
        self.docs = [0] * len(recipe.sources)
        self._pending = None  # (source index, epoch, pos, remaining ids, offset already emitted)
        self._warned_done: set[int] = set()
        self._finished = False
        self.doc_log: Optional[list] = None  # set to [] to record (source index, tokens) per scheduled document

    # -- identity ----------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        r = self.recipe
        key = [r.seed, r.append_eos, r.eos_token, r.tokenizer, self.split, self.stage, self.seq_len,
               self.dp_rank, self.dp_world_size, r.heldout.fraction, sorted(r.heldout.titles)]
        for s in r.sources:
            key.append([s.name, s.type, s.path, s.hub_id, s.text_field, round(s.weight, 9), s.min_doc_tokens,
                        s.max_doc_tokens, s.short_doc_tokens, s.short_keep_prob, s.repeat, s.shuffle_block])
        return f"{stable_hash(json.dumps(key, default=str)):016x}"

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        return self

    def __len__(self) -> int:
        if self.max_rows is None:
            raise TypeError("unbounded stream (no token budget)")
        return self.max_rows

    def _next_doc(self):
        while True:
            active = [i for i, r in enumerate(self._readers) if not r.done]
            if not active:
                return None
            i = min(active, key=lambda k: (self.tokens[k] / self.weights[k], k))
            doc = self._readers[i].next()
            if doc is None:
                if i not in self._warned_done and len(active) > 1 and self.split == "train":
                    warnings.warn(f"source '{self.source_names[i]}' is exhausted (repeat={self.recipe.sources[i].repeat}); "
                                  "the remaining sources share its weight", stacklevel=3)
                self._warned_done.add(i)
                continue
            epoch, pos, _title, ids = doc
            self.tokens[i] += len(ids)
            self.docs[i] += 1
            if self.doc_log is not None:
                self.doc_log.append((i, len(ids)))
            return i, epoch, pos, ids, 0

    def __next__(self) -> dict:
        if self._finished or (self.max_rows is not None and self.rows >= self.max_rows):
            raise StopIteration
        S = self.seq_len
        ids = np.empty(S, np.int64)
        pos = np.empty(S, np.int64)
        doc = np.empty(S, np.int64)
        src = np.empty(S, np.int64)
        starts = []
        segs = []
        fill, d = 0, 0
        while fill < S:
            if self._pending is None:
                self._pending = self._next_doc()
                if self._pending is None:
                    break
            i, epoch, p, toks, off = self._pending
            n = min(len(toks), S - fill)
            ids[fill:fill + n] = toks[:n]
            pos[fill:fill + n] = np.arange(n)
            doc[fill:fill + n] = d
            src[fill:fill + n] = i
            starts.append(fill)
            segs.append((self.source_names[i], epoch, p, off))
            fill += n
            d += 1
            self._pending = None if n == len(toks) else (i, epoch, p, toks[n:], off + n)
        if fill < S:
            self._finished = True
            if fill == 0 or self.drop_last:
                raise StopIteration
            ids[fill:] = self._pad
            pos[fill:] = np.arange(S - fill)
            doc[fill:] = d
            src[fill:] = -1
        labels = ids.copy()
        labels[starts] = IGNORE_INDEX
        if fill < S:
            labels[fill:] = IGNORE_INDEX
        self.rows += 1
        names = list(dict.fromkeys(s[0] for s in segs))
        return {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos),
                "doc_ids": torch.from_numpy(doc), "labels": torch.from_numpy(labels),
                "source_ids": torch.from_numpy(src), "sources": names, "docs": segs}

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Small, JSON-serialisable state; the next row after load_state_dict equals this stream's next row."""
        pend = None
        if self._pending is not None:
            i, epoch, p, toks, off = self._pending
            pend = {"source": i, "epoch": epoch, "pos": p, "ids": toks.tolist(), "offset": off}
        return {"version": _STATE_VERSION, "fingerprint": self.fingerprint(), "rows": self.rows,
                "tokens": list(self.tokens), "docs": list(self.docs), "finished": self._finished,
                "readers": [r.state() for r in self._readers], "pending": pend,
                "bad": {"seen": dict(self._bad.seen), "bad": dict(self._bad.bad)}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"data state version {state.get('version')} != {_STATE_VERSION}")
        if state["fingerprint"] != self.fingerprint():
            raise DataError("data state was saved for a different recipe, stage, seq_len, split or data-parallel "
                            "layout; it cannot resume this stream exactly")
        self.rows = int(state["rows"])
        self.tokens = [int(t) for t in state["tokens"]]
        self.docs = [int(t) for t in state["docs"]]
        self._finished = bool(state.get("finished", False))
        for r, st in zip(self._readers, state["readers"]):
            r.load(st)
        p = state["pending"]
        self._pending = None if p is None else (int(p["source"]), int(p["epoch"]), int(p["pos"]),
                                                np.asarray(p["ids"], dtype=np.int64), int(p["offset"]))
        self._bad.seen.update(state.get("bad", {}).get("seen", {}))
        self._bad.bad.update(state.get("bad", {}).get("bad", {}))

    # -- reporting -----------------------------------------------------------------------------------
    def realised_shares(self) -> dict[str, float]:
        total = sum(self.tokens) or 1
        return {n: t / total for n, t in zip(self.source_names, self.tokens)}


def collate(rows: list[dict]) -> dict:
    """Rows -> a batch: LongTensor[B, S] for each of TENSOR_KEYS the rows have (input_ids, position_ids,
    doc_ids, labels, source_ids), and per-row lists of `sources` / `docs` where rows carry them (PackedStream)."""
    out = {k: torch.stack([torch.as_tensor(r[k], dtype=torch.long) for r in rows]) for k in TENSOR_KEYS if k in rows[0]}
    for k in ("sources", "docs"):
        if k in rows[0]:
            out[k] = [r[k] for r in rows]
    return out


def unseen_recipe(recipe: Recipe) -> Recipe:
    """The recipe's unseen-domain sources (heldout.unseen) as a recipe of their own, every document held out."""
    import dataclasses
    from pathlib import Path

    from mod_train.data.recipe import HeldoutConfig, source_files
    if not recipe.heldout.unseen:
        raise DataError(f"recipe '{recipe.name}' has no heldout.unseen sources (evaluation-only domains)")
    base = Path(recipe.path).resolve().parent if recipe.path else None
    for s in recipe.heldout.unseen:
        if s.type != "hub":
            source_files(s, base)  # a missing file is named here, with the fetch hint
    return dataclasses.replace(recipe, sources=list(recipe.heldout.unseen),
                               heldout=HeldoutConfig(fraction=0.0, titles=[]))


def heldout_documents(recipe: Recipe, max_docs: Optional[int] = None,
                      domain: str = "in_domain") -> list[tuple[str, str, str]]:
    """Held-out whole documents as (title, source, text), in file order, balanced over sources
    (at most ceil(max_docs / n_sources) per source, then trimmed to max_docs). `domain`: 'in_domain' (the
    training sources' held-out documents) or 'unseen' (the heldout.unseen sources, every document)."""
    if domain not in ("in_domain", "unseen"):
        raise DataError(f"domain must be 'in_domain' or 'unseen', got {domain!r}")
    if domain == "unseen":
        recipe = unseen_recipe(recipe)
    per_source = None if max_docs is None else math.ceil(max_docs / len(recipe.sources))
    bad = _BadLines(recipe)
    per: list[list[tuple[str, str, str]]] = []
    for i, src in enumerate(recipe.sources):
        found = []
        raw = RawSource(recipe, i)
        for _p, entry in raw.iter_epoch(0, 0, shuffle=False):
            try:
                title, text = parse(entry, src)
            except BadRecord as e:
                bad.record(src.name, entry.where, entry.file, str(e))
                continue
            bad.ok(entry.file)
            if domain == "unseen" or is_heldout(recipe, src.name, title, text):
                found.append((title, src.name, text))
                if per_source is not None and len(found) >= per_source:
                    break
        else:
            bad.check(src.name, raw.record_files())
        per.append(found)
    out = []
    for k in range(max((len(x) for x in per), default=0)):  # round-robin over sources
        out.extend(x[k] for x in per if k < len(x))
    return out if max_docs is None else out[:max_docs]
