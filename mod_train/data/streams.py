"""The streams a run trains on: `build_stream(recipe)` -> the recipe's length curriculum, or synthetic rows.

A stream is an iterator of packed rows (dicts of equal-length 1-D int tensors/lists: input_ids,
position_ids, doc_ids, labels, optionally source_ids) with `state_dict()`/`load_state_dict()` so
that a restart resumes at the exact row. Each data-parallel rank reads its own shard; ranks of one
tensor-parallel group read the same shard.
"""
from __future__ import annotations

import torch


class SyntheticStream:
    """Deterministic packed rows of random tokens (tests, benchmarks). Row i depends only on
    (seed, i), so sharding is `i % dp_world == dp_rank` and resuming is storing the next index."""

    def __init__(self, seq_len: int, vocab_size: int, seed: int = 0, dp_rank: int = 0, dp_world_size: int = 1,
                 mean_doc_len: int = 0, num_sources: int = 2):
        self.seq_len, self.vocab, self.seed = seq_len, vocab_size, seed
        self.dp_rank, self.dp_world = dp_rank, dp_world_size
        self.mean_doc_len = mean_doc_len or max(8, seq_len // 3)
        self.num_sources = num_sources
        self.index = dp_rank  # next global row index for this rank

    def __iter__(self):
        return self

    def row(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        # learnable structure: a token mostly follows its predecessor + 1 (mod a small range)
        ids = torch.empty(self.seq_len, dtype=torch.long)
        ids[0] = torch.randint(0, self.vocab, (1,), generator=g)
        noise = torch.randint(0, self.vocab, (self.seq_len,), generator=g)
        keep = torch.rand(self.seq_len, generator=g) < 0.7
        for t in range(1, self.seq_len):
            ids[t] = (ids[t - 1] + 1) % self.vocab if keep[t] else noise[t]
        pos = torch.empty_like(ids)
        doc = torch.empty_like(ids)
        src = torch.empty_like(ids)
        t, d = 0, 0
        while t < self.seq_len:
            n = int(torch.randint(self.mean_doc_len // 2, self.mean_doc_len * 3 // 2 + 1, (1,), generator=g))
            n = max(1, min(n, self.seq_len - t))
            pos[t:t + n] = torch.arange(n)
            doc[t:t + n] = d
            src[t:t + n] = int(torch.randint(0, self.num_sources, (1,), generator=g))
            t, d = t + n, d + 1
        labels = ids.clone()
        labels[pos == 0] = -100  # no prediction across a document boundary
        return {"input_ids": ids, "position_ids": pos, "doc_ids": doc, "labels": labels, "source_ids": src}

    def __next__(self) -> dict:
        r = self.row(self.index)
        self.index += self.dp_world
        return r

    def state_dict(self) -> dict:
        return {"index": self.index, "dp_rank": self.dp_rank, "dp_world": self.dp_world}

    def load_state_dict(self, st: dict) -> None:
        if st.get("dp_world", self.dp_world) != self.dp_world:
            raise ValueError(f"data state was saved with {st['dp_world']} data-parallel ranks, this run has {self.dp_world}")
        self.index = st["index"]

    def load_resharded(self, states: list[dict]) -> None:
        """Elastic resume from ALL the ranks' states of a run with another data-parallel size: they took the
        same number of rows k each, so rows [0, k * N) are consumed and this rank continues at k * N + rank."""
        n = len(states)
        taken = {(st["index"] - st["dp_rank"]) // n for st in states}
        if len(taken) != 1 or any(st["dp_world"] != n for st in states):
            raise ValueError(f"the {n} data states to re-shard took different numbers of rows {sorted(taken)}: "
                             "they are not one step's states of one run")
        self.index = taken.pop() * n + self.dp_rank


class CurriculumStream:
    """The recipe's length curriculum: stage after stage of mod_train.data.PackedStream rows; the
    state holds the stage index and the current stage's exact position."""

    def __init__(self, recipe, tokenizer, dp_rank, dp_world_size, seq_len=None):
        self.recipe, self.tok, self.seq_len = recipe, tokenizer, seq_len
        self.dp_rank, self.dp_world = dp_rank, dp_world_size
        self.stage = 0
        self._open()

    def _open(self):
        from mod_train.data.stream import PackedStream
        self.inner = PackedStream(self.recipe, tokenizer=self.tok, stage=self.stage, dp_rank=self.dp_rank,
                                  dp_world_size=self.dp_world, seq_len=self.seq_len)
        self.source_names = self.inner.source_names

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            try:
                return next(self.inner)
            except StopIteration:
                if self.stage + 1 >= len(self.recipe.stages):
                    raise
                self.stage += 1
                self._open()

    def state_dict(self):
        return {"stage": self.stage, "inner": self.inner.state_dict()}

    def load_state_dict(self, st):
        self.stage = st["stage"]
        self._open()
        self.inner.load_state_dict(st["inner"])

    def load_resharded(self, states):
        """Elastic resume from ALL the ranks' states of a run with another data-parallel size (same stage)."""
        from mod_train.data.recipe import DataError
        stages = sorted({st["stage"] for st in states})
        if len(stages) != 1:
            raise DataError(f"the data states to re-shard are in different curriculum stages {stages}: they are "
                            "not one step's states of one run")
        self.stage = stages[0]
        self._open()
        self.inner.load_resharded([st["inner"] for st in states])


def build_stream(recipe: str, *, seq_len: int | None, seed: int, dp_rank: int, dp_world_size: int,
                 vocab_size: int | None = None, tokenizer=None, overrides: dict | None = None):
    """A stream for `recipe`: 'synthetic[:vocab=V,doc=D]' (random tokens) or a data recipe YAML
    (mod_train.data) tokenised by `tokenizer`, the run's tokenizer (see mod_train.train.preflight;
    None: the recipe's own, for tools without a model). `seq_len` overrides the recipe's stage lengths;
    `overrides` are the recipe's dotted-key overrides (RunSpec.data)."""
    if recipe == "synthetic" or recipe.startswith("synthetic:"):
        opts = dict(kv.split("=") for kv in recipe.split(":", 1)[1].split(",")) if ":" in recipe else {}
        return SyntheticStream(seq_len or 2048, int(opts.get("vocab", vocab_size)), seed=int(opts.get("seed", seed)),
                               dp_rank=dp_rank, dp_world_size=dp_world_size, mean_doc_len=int(opts.get("doc", 0)))
    from mod_train.data.recipe import load_recipe
    from mod_train.data.stream import load_tokenizer
    rec = load_recipe(recipe, **(overrides or {}))
    tok = tokenizer if tokenizer is not None else load_tokenizer(rec)
    return CurriculumStream(rec, tok, dp_rank, dp_world_size, seq_len=seq_len)


class StepRows:
    """A stream wrapper that takes one optimizer step's rows up front, so that running out of data is
    known before the step starts (never half-way through a gradient accumulation)."""

    def __init__(self, stream):
        self.stream = stream
        self.buffer: list = []
        self.source_names = getattr(stream, "source_names", None)

    def fill(self, n: int) -> bool:
        """Take `n` rows; False if the data ran out (the rows taken so far are dropped)."""
        try:
            self.buffer = [next(self.stream) for _ in range(n)]
        except StopIteration:
            self.buffer = []
            return False
        return True

    def __iter__(self):
        return self

    def __next__(self):
        return self.buffer.pop(0)

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, st):
        self.stream.load_state_dict(st)

    def load_resharded(self, states):
        self.stream.load_resharded(states)
