"""Preview / build a recipe: statistics of the packed stream, and optional packed shards on disk.

Used by `launch/build_data.py`. Shards are a convenience for inspection or for other tools; training
reads the stream directly (it resumes exactly from `PackedStream.state_dict()`).
Shard layout in OUT/: `shard_00000.npz` ... (arrays input_ids, position_ids, doc_ids, labels,
source_ids: int32 [rows, seq_len]) and `index.json` (seq_len, source names, rows per shard, the
recipe fingerprint and the stream state after each shard, so the stream can continue where the
shards stop). A rebuild removes the old index.json first and writes the new one last: an
interrupted build leaves no index, never one that describes other shards.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from mod_train.data.recipe import DataError, Recipe
from mod_train.data.stream import TENSOR_KEYS, PackedStream, load_tokenizer

LONG_THRESHOLDS = (4096, 16384)


def _hist(values, edges) -> list[tuple[str, int]]:
    values = np.asarray(values, dtype=np.int64)
    out = []
    lo = 0
    for hi in list(edges) + [None]:
        n = int(((values >= lo) & (values < hi)).sum()) if hi is not None else int((values >= lo).sum())
        out.append((f"[{lo}, {hi})" if hi is not None else f">= {lo}", n))
        lo = hi
    return out


def _pow2_edges(max_value: int, start: int = 256) -> list[int]:
    edges, e = [], start
    while e <= max(max_value, start):
        edges.append(e)
        e *= 2
    return edges


def build(recipe: Recipe, stage: int = 0, rows: Optional[int] = None, dp_rank: int = 0, dp_world_size: int = 1,
          split: str = "train", out: Optional[os.PathLike] = None, shard_rows: int = 256, progress: bool = True,
          tokenizer=None) -> dict:
    """Run the stream for `rows` rows (default: the stage's budget for this rank) and return statistics;
    with `out`, also write packed shards there."""
    from tqdm import tqdm

    tok = tokenizer if tokenizer is not None else load_tokenizer(recipe)
    stream = PackedStream(recipe, tok, stage=stage, dp_rank=dp_rank, dp_world_size=dp_world_size, split=split,
                          max_rows=rows)
    stream.doc_log = []
    total = stream.max_rows
    seg_lens: list[int] = []
    docs_per_row: list[int] = []
    src_tokens = np.zeros(len(recipe.sources) + 1, dtype=np.int64)  # last slot: padding
    buf: dict[str, list] = {k: [] for k in TENSOR_KEYS}
    shards = []
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "index.json").unlink(missing_ok=True)  # the old index would describe shards being overwritten

    def flush():
        if not buf["input_ids"]:
            return
        name = f"shard_{len(shards):05d}.npz"
        np.savez(out / name, **{k: np.stack(v).astype(np.int32) for k, v in buf.items()})
        shards.append({"file": name, "rows": len(buf["input_ids"]), "state": stream.state_dict()})
        for v in buf.values():
            v.clear()

    t0 = time.perf_counter()
    n = 0
    with tqdm(total=total, unit="row", disable=not progress, desc=f"{recipe.name} stage {stage}") as bar:
        for row in stream:
            n += 1
            d = row["doc_ids"].numpy()
            seg_lens.extend(np.bincount(d).tolist())
            docs_per_row.append(int(d[-1]) + 1)
            sid = row["source_ids"].numpy()
            src_tokens += np.bincount(np.where(sid < 0, len(src_tokens) - 1, sid), minlength=len(src_tokens))
            if out is not None:
                for k in TENSOR_KEYS:
                    buf[k].append(row[k].numpy())
                if len(buf["input_ids"]) >= shard_rows:
                    flush()
            bar.update(1)
    seconds = time.perf_counter() - t0
    if out is not None:
        flush()
        index = {"recipe": recipe.name, "recipe_path": recipe.path, "fingerprint": stream.fingerprint(),
                 "stage": stage, "seq_len": stream.seq_len, "split": split, "dp_rank": dp_rank,
                 "dp_world_size": dp_world_size, "sources": stream.source_names, "rows": n, "shards": shards}
        tmp = out / f"index.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(index))
        os.replace(tmp, out / "index.json")  # last, and atomically: an index exists only for a finished build
        for old in set(p.name for p in out.glob("shard_*.npz")) - {s["file"] for s in shards}:
            (out / old).unlink()  # shards of an earlier, longer build

    names = stream.source_names
    weights = recipe.normalised_weights()
    packed_total = int(src_tokens[:-1].sum()) or 1
    doc_lens = [L for _, L in stream.doc_log]
    doc_tokens = int(sum(doc_lens)) or 1
    per_source = []
    for i, nm in enumerate(names):
        per_source.append({"source": nm, "tokens": int(src_tokens[i]), "requested": weights[i],
                           "realised": int(src_tokens[i]) / packed_total,
                           "realised_before_packing": stream.tokens[i] / max(1, sum(stream.tokens)),
                           "documents": stream.docs[i]})
    stats = {
        "recipe": recipe.name, "stage": stage, "seq_len": stream.seq_len, "split": split, "rows": n,
        "tokens": int(src_tokens.sum()), "padding_tokens": int(src_tokens[-1]), "seconds": seconds,
        "tokens_per_s": n * stream.seq_len / seconds if seconds > 0 else float("nan"),
        "per_source": per_source, "documents": len(doc_lens),
        "frac_tokens_in_docs_ge": {str(t): sum(L for L in doc_lens if L >= t) / doc_tokens for t in LONG_THRESHOLDS},
        "doc_length_hist": _hist(doc_lens, _pow2_edges(max(doc_lens, default=0))),
        "segment_length_hist": _hist(seg_lens, _pow2_edges(stream.seq_len)),
        "docs_per_row_hist": _hist(docs_per_row, [2, 3, 5, 9, 17, 33]),
        "shards": str(out) if out is not None else None,
    }
    return stats


def format_stats(st: dict) -> str:
    L = [f"recipe {st['recipe']}  stage {st['stage']}  seq_len {st['seq_len']}  split {st['split']}",
         f"rows {st['rows']}  tokens {st['tokens']:,}  padding {st['padding_tokens']:,}  "
         f"documents {st['documents']:,}  {st['tokens_per_s']:,.0f} tokens/s ({st['seconds']:.1f} s)", "",
         f"{'source':16s} {'tokens':>12s} {'docs':>7s} {'requested':>9s} {'realised':>9s} {'diff':>7s}"]
    for s in st["per_source"]:
        L.append(f"{s['source']:16s} {s['tokens']:12,d} {s['documents']:7d} {s['requested']:9.3f} "
                 f"{s['realised']:9.3f} {s['realised'] - s['requested']:+7.3f}")
    L.append("")
    L.append("fraction of tokens in documents >= 4k tokens: "
             f"{st['frac_tokens_in_docs_ge']['4096']:.3f}, >= 16k tokens: {st['frac_tokens_in_docs_ge']['16384']:.3f}")
    for title, key in (("document length (tokens, after filters)", "doc_length_hist"),
                       ("packed segment length (tokens per document piece in a row)", "segment_length_hist"),
                       ("documents per packed row", "docs_per_row_hist")):
        h = st[key]
        top = max((c for _, c in h), default=1) or 1
        L.append("")
        L.append(title)
        for label, c in h:
            L.append(f"  {label:>18s} {c:8d} {'#' * round(40 * c / top)}")
    if st.get("shards"):
        L.append(f"\nshards written to {st['shards']}")
    return "\n".join(L)


def load_shard(path: os.PathLike) -> dict:
    """A written shard as a dict of LongTensor[rows, seq_len]."""
    import torch
    with np.load(path) as z:
        return {k: torch.from_numpy(z[k].astype(np.int64)) for k in TENSOR_KEYS}


def stream_bench(recipe: Recipe, tokens: int, stages: Optional[list[int]] = None) -> list[dict]:
    """Per stage: stream `tokens` tokens (read + tokenise + pack) and time it, then time an exact resume of
    the next row from the state (checked equal to the uninterrupted stream's). Prints one JSON line each."""
    tok = load_tokenizer(recipe)
    results = []
    for stage in stages if stages is not None else range(len(recipe.stages)):
        s = PackedStream(recipe, tok, stage=stage, max_rows=10**12)
        n_rows = max(1, tokens // s.seq_len)
        t0 = time.perf_counter()
        first = None
        for i, _row in zip(range(n_rows), s):
            if i == 0:
                first = time.perf_counter() - t0
        dt = time.perf_counter() - t0
        state = s.state_dict()
        t1 = time.perf_counter()
        s2 = PackedStream(recipe, tok, stage=stage, max_rows=10**12)
        s2.load_state_dict(state)
        a_row, b_row = next(s), next(s2)
        resume = time.perf_counter() - t1
        if not (a_row["input_ids"] == b_row["input_ids"]).all():
            raise DataError(f"stage {stage}: the resumed stream's next row differs from the uninterrupted one")
        res = {"stage": stage, "seq_len": s.seq_len, "rows": n_rows, "tokens": n_rows * s.seq_len,
               "seconds": round(dt, 2), "tokens_per_s": round(n_rows * s.seq_len / dt),
               "first_row_s": round(first, 3), "resume_next_row_s": round(resume, 3),
               "state_bytes": len(json.dumps(state)),
               "shares": {k: round(v, 4) for k, v in s.realised_shares().items()}}
        results.append(res)
        print(json.dumps(res), flush=True)
    return results
