"""PackedStream: recipe -> weighted, tokenised, packed rows with document boundaries; exactly resumable.

Pipeline (per data-parallel rank, everything deterministic for the recipe's seed)::

    RawSource (datasets streaming; per-epoch file order + block shuffle)      one per source
      -> rank filter  (record position % dp_world_size == dp_rank, before any decoding)
      -> parse (malformed JSON lines counted, warned with file:line, fatal above max_bad_fraction)
      -> split filter (held-out documents chosen by a seeded hash of the whole document)
      -> tokenise in batches (Rust tokenizer, encode_batch_fast) + EOS, truncate, min-length,
         short-document keep-probability (counter-based hash, no RNG state)
      -> interleave and pack: each source keeps `recipe.open_docs` documents open. A row is filled
         piece by piece; each piece goes to the source furthest below its token share (argmin
         packed_tokens_s / weight_s) and takes, from that source's open documents in turn, as many
         consecutive tokens as the document has left or the row has room for (no padding). A
         document cut at a row end continues where it left off in a later row, as a new segment.
         Every segment gets position ids from 0, its own doc id, and label -100 at its first token.

Why pieces and not whole documents: a short run must see the mixture. Packing whole documents one
after another (open_docs = 1, the stream before interleaving, kept exactly) lets one 35k-token book
fill the first 70 rows of 512 tokens. With pieces at most seq_len long, the greedy choice keeps every
source's packed tokens within [-(k-2+w_s), 1-w_s] * seq_len of its share w_s of all packed tokens
(k = sources with documents left), so ANY window of W consecutive rows holds each source's share to
within (k-1)/W (docs/data.md; tests/test_data.py checks it). Open documents per source rotate, so a
short run also sees several documents of each source instead of the first one.

Resume design (chosen over pre-built packed shards): all randomness is a pure function of
(seed, stage, source, epoch, position), so the whole state is small: per source the cursor
(epoch, next raw position) and the tokens/documents taken so far, the rows emitted, and per open
document its (epoch, position, tokens already packed, length, checksum) -- not its token ids.
`load_state_dict` restores that: the open documents are re-read by position and re-tokenised (checked
against length and checksum), and each source restarts by skipping raw records block-wise without
parsing or tokenising them (text sources skip whole files without opening them, parquet sources skip
whole files by metadata), then re-tokenises at most one tokenisation batch. The next row is identical
to the uninterrupted stream's.
Pre-built shards would also resume exactly, but need a build step and disk per (recipe, seq_len, world
size); the stream needs neither and still resumes in well under a second per source on local files
(docs/data.md has the figures).

Data parallelism: rank r takes the records whose position is r modulo the world size (so the ranks'
documents are disjoint and together complete); tensor-parallel peers pass the same dp_rank and get
identical rows.

Elastic resume (`load_resharded`, another data-parallel size M than the N ranks that saved): the contract is
the global document order, per source the records by (epoch, position). Old rank r has consumed exactly the
records of its class (position % N == r) before its cursor, so the consumed set is the "skip layer" (N, the
N cursors); a new rank takes the records of its class modulo M that no skip layer consumed, starting at the
smallest old cursor, and the old ranks' open documents (with the tokens already packed) are dealt out to the
new ranks. No document is trained twice and none is skipped; layers compose over several resumes and are
dropped once a rank's cursor has passed them. What is only approximate: the share accounting and the
rows/documents counters are the old totals split evenly, so the rows after a resume are packed differently
from an uninterrupted run at either size (the same documents, other neighbours).
"""
from __future__ import annotations

import json
import math
import os
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np
import torch

from mod_train.data.recipe import DataError, Recipe, check_seq_len
from mod_train.data.sources import BadRecord, RawSource, parse, stable_hash, unit_hash

TENSOR_KEYS = ("input_ids", "position_ids", "doc_ids", "labels", "source_ids")
IGNORE_INDEX = -100
_STATE_VERSION = 3  # 3: readers may carry skip layers (elastic resume); 2: open documents by position
_READS_VERSIONS = (2, 3)  # a version-2 state is a version-3 state without skip layers
_DONE = [1 << 62, 0]  # the cursor of a reader that has read all its passes: after every (epoch, position)
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
        self.skip: list[dict] = []  # elastic resume: {"world": N, "cursors": [[epoch, pos] per old rank]}
        self._gen = None

    def cursor(self) -> list:
        """[epoch, next position]: every record of this rank's class before it is consumed."""
        return list(_DONE) if self.done else [self.epoch, self.pos]

    def state(self) -> dict:
        st = {"epoch": self.epoch, "pos": self.pos, "done": self.done}
        live = [L for L in self.skip if self.cursor() < max(L["cursors"])]  # a passed layer skips nothing ahead
        if live:
            st["skip"] = live
        return st

    def load(self, st: dict) -> None:
        self.epoch, self.pos, self.done = int(st["epoch"]), int(st["pos"]), bool(st["done"])
        self.skip = [{"world": int(L["world"]), "cursors": [[int(e), int(p)] for e, p in L["cursors"]]}
                     for L in st.get("skip", [])]
        self._gen = None

    def _consumed(self, epoch: int, pos: int) -> bool:
        """Whether a run before an elastic resume already took the record (epoch, pos)."""
        return any([epoch, pos] < L["cursors"][pos % L["world"]] for L in self.skip)

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
                if p % s.dp_world_size != s.dp_rank or (self.skip and self._consumed(epoch, p)):
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
            if pos == 0 and not raw_seen and not self.skip:
                raise DataError(f"source '{src.name}' is empty: no documents in "
                                f"{src.hub_id or src.path}")
            if pos == 0 and not kept and s.split == "train" and not self.skip:
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
                if unit_hash(s.recipe.shuffle_seed, s._salt, "keep", src.name, epoch, p) >= src.short_keep_prob:
                    continue
            yield epoch, p, title, np.asarray(ids, dtype=np.int64)


@dataclass
class _OpenDoc:
    """A document being packed: where it came from, its token ids, and how many are already in rows."""

    epoch: int
    pos: int
    ids: np.ndarray
    offset: int = 0

    def left(self) -> int:
        return len(self.ids) - self.offset


def _checksum(ids: np.ndarray) -> int:
    """Guards a resume: an open document re-read from its position must be the one that was saved."""
    return zlib.crc32(np.ascontiguousarray(ids, dtype=np.int64).tobytes())


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
        self.tokens = [0] * len(recipe.sources)  # tokens packed into rows per source (the share accounting)
        self.docs = [0] * len(recipe.sources)  # documents opened per source
        self.open_docs = recipe.open_docs
        self._open: list[list[_OpenDoc]] = [[] for _ in recipe.sources]  # in turn order, front = next
        self._warned_done: set[int] = set()
        self._finished = False
        self.doc_log: Optional[list] = None  # set to [] to record (source index, tokens) per opened document

    # -- identity ----------------------------------------------------------------------------------
    def fingerprint(self, dp_rank: Optional[int] = None, dp_world_size: Optional[int] = None) -> str:
        """Identity of the stream (of data-parallel rank `dp_rank` of `dp_world_size`; default: this one's)."""
        r = self.recipe
        dp = (self.dp_rank, self.dp_world_size) if dp_world_size is None else (dp_rank, dp_world_size)
        key = [r.seed, r.append_eos, r.eos_token, r.tokenizer, self.split, self.stage, self.seq_len,
               *dp, r.heldout.fraction, sorted(r.heldout.titles), r.open_docs]
        if r.order_seed is not None:  # appended only when set: fingerprints of existing runs stay as they were
            key.append(["order_seed", r.order_seed])
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

    def _pick_source(self) -> Optional[int]:
        """The source of the next row piece: the one furthest below its token share among those with
        documents left (ties: the first). With open_docs == 1 the source of the unfinished document
        comes first, so each document is packed whole before the next (the pre-interleaving stream)."""
        if self.open_docs == 1:
            held = [i for i, docs in enumerate(self._open) if docs]
            if held:
                return held[0]
        live = [i for i, r in enumerate(self._readers) if self._open[i] or not r.done]
        if not live:
            return None
        return min(live, key=lambda k: (self.tokens[k] / self.weights[k], k))

    def _fill(self, i: int) -> bool:
        """Open documents of source i up to open_docs; False (with a warning) once it has none left."""
        docs, reader = self._open[i], self._readers[i]
        while len(docs) < self.open_docs:
            doc = reader.next()
            if doc is None:
                break
            epoch, pos, _title, ids = doc
            docs.append(_OpenDoc(epoch, pos, ids))
            self.docs[i] += 1
            if self.doc_log is not None:
                self.doc_log.append((i, len(ids)))
        if docs:
            return True
        others = any(self._open[k] or not r.done for k, r in enumerate(self._readers) if k != i)
        if i not in self._warned_done and others and self.split == "train":
            warnings.warn(f"source '{self.source_names[i]}' is exhausted (repeat={self.recipe.sources[i].repeat}); "
                          "the remaining sources share its weight", stacklevel=4)
        self._warned_done.add(i)
        return False

    def _next_doc(self) -> Optional[tuple[int, _OpenDoc]]:
        """-> (source index, the open document whose turn it is), or None when every source is exhausted."""
        while True:
            i = self._pick_source()
            if i is None:
                return None
            if self._fill(i):
                return i, self._open[i][0]

    def _packed(self, i: int, n: int) -> None:
        """Account n tokens of source i's current document; an unfinished document waits for its next turn."""
        doc = self._open[i].pop(0)
        doc.offset += n
        self.tokens[i] += n
        if doc.left():
            self._open[i].append(doc)

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
            nxt = self._next_doc()
            if nxt is None:
                break
            i, od = nxt
            n = min(od.left(), S - fill)
            ids[fill:fill + n] = od.ids[od.offset:od.offset + n]
            pos[fill:fill + n] = np.arange(n)
            doc[fill:fill + n] = d
            src[fill:fill + n] = i
            starts.append(fill)
            segs.append((self.source_names[i], od.epoch, od.pos, od.offset))
            self._packed(i, n)
            fill += n
            d += 1
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
        """Small, JSON-serialisable state; the next row after load_state_dict equals this stream's next row.
        Open documents are kept as [epoch, position, tokens packed, length, checksum], not token ids."""
        open_ = [[[d.epoch, d.pos, d.offset, len(d.ids), _checksum(d.ids)] for d in docs] for docs in self._open]
        return {"version": _STATE_VERSION, "fingerprint": self.fingerprint(), "rows": self.rows,
                "tokens": list(self.tokens), "docs": list(self.docs), "finished": self._finished,
                "readers": [r.state() for r in self._readers], "open": open_,
                "bad": {"seen": dict(self._bad.seen), "bad": dict(self._bad.bad)}}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, self.dp_rank, self.dp_world_size)
        self.rows = int(state["rows"])
        self.tokens = [int(t) for t in state["tokens"]]
        self.docs = [int(t) for t in state["docs"]]
        self._finished = bool(state.get("finished", False))
        for r, st in zip(self._readers, state["readers"]):
            r.load(st)
        self._open = [self._reopen(i, saved) for i, saved in enumerate(state["open"])]
        self._bad.seen.update(state.get("bad", {}).get("seen", {}))
        self._bad.bad.update(state.get("bad", {}).get("bad", {}))

    def _check_state(self, state: dict, dp_rank: int, dp_world_size: int) -> None:
        if state.get("version") not in _READS_VERSIONS:
            raise DataError(f"data state version {state.get('version')} cannot resume this stream (version "
                            f"{_STATE_VERSION}): it was saved by another mod_train; resume with that version, or "
                            "start the data stream afresh (drop the checkpoint's 'data' entry)")
        if state["fingerprint"] != self.fingerprint(dp_rank, dp_world_size):
            raise DataError("data state was saved for a different recipe, stage, seq_len, split, open_docs or "
                            "data-parallel layout; it cannot resume this stream exactly")

    def load_resharded(self, states: list[dict]) -> None:
        """Elastic resume: continue from the states of ALL the ranks of a run with another data-parallel size
        (states[r] = old rank r's state_dict). This rank takes its share of what they had not consumed: the
        records of its class modulo this run's size that no old rank took, and every M-th of their open
        documents, where each left off (module docstring)."""
        n, m, me = len(states), self.dp_world_size, self.dp_rank
        for r, st in enumerate(states):
            self._check_state(st, r, n)
        rows = sum(int(st["rows"]) for st in states)
        readers, open_ = [], []
        for i in range(len(self.source_names)):
            old = [st["readers"][i] for st in states]
            cursors = [list(_DONE) if rd["done"] else [int(rd["epoch"]), int(rd["pos"])] for rd in old]
            start = min(cursors)
            layers = [{"world": n, "cursors": cursors}]
            for rd in old:
                layers += [L for L in rd.get("skip", []) if L not in layers]
            done = start == _DONE
            readers.append({"epoch": 0 if done else start[0], "pos": 0 if done else start[1], "done": done,
                            "skip": [] if done else [L for L in layers if start < max(L["cursors"])]})
            docs = sorted((d for st in states for d in st["open"][i]), key=lambda d: (d[0], d[1]))
            open_.append(docs[me::m])
        bad = {k: defaultdict(int) for k in ("seen", "bad")}
        for st in states:
            for k, counts in st.get("bad", {}).items():
                for f, c in counts.items():
                    bad[k][f] += int(c)  # every new rank judges its files by the totals so far (same fractions)
        split = lambda total: total // m + (me < total % m)  # noqa: E731
        self.load_state_dict({
            "version": _STATE_VERSION, "fingerprint": self.fingerprint(), "rows": split(rows),
            "tokens": [sum(int(st["tokens"][i]) for st in states) // m for i in range(len(readers))],
            "docs": [sum(int(st["docs"][i]) for st in states) // m for i in range(len(readers))],
            "finished": all(st.get("finished", False) for st in states), "readers": readers, "open": open_,
            "bad": {k: dict(v) for k, v in bad.items()}})

    def _reopen(self, i: int, saved: list) -> list[_OpenDoc]:
        """Source i's open documents, re-read from their (epoch, position) and re-tokenised: only these
        records are parsed, so resuming costs about one tokenisation of open_docs documents per source."""
        reader = self._readers[i]
        found: dict[tuple[int, int], np.ndarray] = {}
        for epoch in sorted({int(e) for e, *_ in saved}):
            need = {int(p) for e, p, *_ in saved if int(e) == epoch}
            batch = []
            for p, entry in reader.raw.iter_epoch(epoch, min(need)):
                if p in need:
                    try:
                        batch.append((p, *parse(entry, reader.src)))
                    except BadRecord:
                        continue  # reported as changed below
                    if len(batch) == len(need):
                        break
            found.update(((e, p), ids) for e, p, _title, ids in reader._tokenize(epoch, batch))
        docs = []
        for epoch, p, offset, n, crc in saved:
            ids = found.get((int(epoch), int(p)))
            if ids is None or len(ids) != n or _checksum(ids) != crc:
                raise DataError(f"source '{self.source_names[i]}': the document at epoch {epoch}, position {p} was "
                                "being packed when the state was saved but reads back differently: the source's "
                                "files changed; resume with the original files or start the data stream afresh")
            docs.append(_OpenDoc(int(epoch), int(p), ids, int(offset)))
        return docs

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
