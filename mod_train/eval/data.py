"""Evaluation text: whole held-out documents of a recipe, and calibration text disjoint from them."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EvalDoc:
    title: str
    source: str
    ids: list[int]
    """Token ids of the document (truncated to max_tokens when asked; `full_tokens` is the whole length)."""
    full_tokens: int


def tokenize_docs(tokenizer, docs, max_tokens: int | None = None) -> list[EvalDoc]:
    out = []
    for title, source, text in docs:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        out.append(EvalDoc(title, source, ids[:max_tokens] if max_tokens else ids, len(ids)))
    return out


def load_eval_docs(recipe, tokenizer, max_docs: int | None, calib_docs: int = 2, max_tokens: int | None = None,
                   calib_tokens: int = 2048, domain: str = "in_domain") -> tuple[list[EvalDoc], list[EvalDoc]]:
    """(evaluated documents, calibration documents): the first `max_docs` held-out documents of the recipe,
    and up to `calib_docs` further held-out documents (never evaluated) for threshold calibration. Without
    spare held-out documents the calibration text comes from the recipe's training split (never evaluated
    either). `domain` 'unseen' reads the recipe's unseen-domain sources instead (heldout.unseen)."""
    from mod_train.data import heldout_documents
    want = None if max_docs is None else max_docs + calib_docs
    docs = heldout_documents(recipe, max_docs=want, domain=domain)
    if not docs:
        raise ValueError(f"recipe {recipe.name!r} has no held-out documents: set heldout.titles or heldout.fraction")
    if max_docs is None or len(docs) <= max_docs:
        ev, cal = docs if max_docs is None else docs[:max_docs], []
        if max_docs is None and len(docs) > 1:  # keep the last held-out documents for calibration
            k = min(calib_docs, len(docs) - 1)
            ev, cal = docs[:-k] if k else docs, docs[-k:] if k else []
    else:
        ev, cal = docs[:max_docs], docs[max_docs:]
    ev_docs = tokenize_docs(tokenizer, ev, max_tokens)
    cal_docs = tokenize_docs(tokenizer, cal, calib_tokens)
    if not cal_docs and calib_docs > 0:
        cal_docs = train_calibration_docs(recipe, tokenizer, calib_docs or 1, calib_tokens)
    return ev_docs, cal_docs


def train_calibration_docs(recipe, tokenizer, n: int, tokens: int) -> list[EvalDoc]:
    """Calibration rows from the recipe's training split (held-out documents are never in it)."""
    from mod_train.data import DataError, PackedStream
    try:
        stream = PackedStream(recipe, tokenizer, split="train", seq_len=tokens, max_rows=n, drop_last=False)
    except DataError:  # longer than the model allows: the recipe's own first-stage length
        stream = PackedStream(recipe, tokenizer, split="train", max_rows=n, drop_last=False)
    out = []
    for k, row in enumerate(stream):
        out.append(EvalDoc(f"train-row-{k}", "train", row["input_ids"].tolist(), tokens))
        out[-1].position_ids = row["position_ids"]  # packed: documents restart their positions
    return out


def calibration_batches(docs: list[EvalDoc], length: int = 1024) -> list[dict]:
    """Batches for calibrate_thresholds: windows of `length` tokens of the calibration documents."""
    out = []
    for d in docs:
        ids = torch.tensor(d.ids, dtype=torch.long)
        pos = getattr(d, "position_ids", None)
        for s in range(0, ids.numel(), length):
            w = ids[s:s + length]
            if w.numel() < 2:
                continue
            b = {"input_ids": w[None]}
            if pos is not None:
                b["position_ids"] = pos[s:s + length][None]  # restarts mark packed documents
            out.append(b)
    return out
