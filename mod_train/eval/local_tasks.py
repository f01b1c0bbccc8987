"""lm-evaluation-harness tasks built from a recipe's held-out text, for machines without the dataset hub.

Hub tasks (hellaswag, arc, mmlu, ...) need their datasets downloaded; these need only the offline corpus, so
the lm-eval integration runs in the tests and in the main job. Each task is a YAML + JSONL pair that lm-eval's
`--include_path` reads (`dataset_path: json`), generated from whole held-out documents, deterministic for a seed:

- `mod_lastword`: LAMBADA-style. A passage ends just before a word of 4+ letters that already occurred in the
  passage; the model must predict that word (loglikelihood: acc = the word is the greedy continuation, perplexity).
- `mod_choice`: continuation choice, 4-way. A passage, then the true next ~100 characters and three equally long
  pieces from elsewhere in the same document (multiple_choice: acc, acc_norm).
- `*_unseen`: the same on the recipe's unseen-domain sources (heldout.unseen), text no training mixture contains.

Texts are cut in characters, not tokens, so the files serve any tokenizer. Every target and choice starts with
the space that separated it from the passage (`target_delimiter: ""`), so lm-eval scores exactly the raw text.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from mod_train.config import ConfigError


@dataclass(frozen=True)
class LocalTask:
    kind: str
    """'lastword' or 'choice'."""
    domain: str
    """'in_domain' (held-out documents of the training sources) or 'unseen' (heldout.unseen sources)."""


LOCAL_TASKS = {
    "mod_lastword": LocalTask("lastword", "in_domain"),
    "mod_choice": LocalTask("choice", "in_domain"),
    "mod_lastword_unseen": LocalTask("lastword", "unseen"),
    "mod_choice_unseen": LocalTask("choice", "unseen"),
}
"""The shipped local tasks by name."""

CONTEXT_CHARS = {"lastword": 800, "choice": 600}
"""Passage length in characters (~150-200 tokens of English: long enough that the passage matters, short
enough that a 135M model on a CPU scores an example in under a second)."""
CHOICE_CHARS = 100
"""Length of each continuation of mod_choice, in characters (cut at the next word end)."""
N_CHOICES = 4
MAX_DOCS = 12
"""Held-out documents read per domain (balanced over sources by heldout_documents)."""

_WORD = re.compile(r"(?<= )[A-Za-z]{4,}(?=[\s.,;:!?)'\"]|$)")

_METRICS = {
    "lastword": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                 {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "choice": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
               {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
}


def write_local_tasks(recipe, out_dir, names, examples: int, seed: int) -> Path:
    """Write `<name>.yaml` + `<name>.jsonl` for each local task in `names` into `out_dir` (the --include_path
    directory, returned). The same recipe, `examples` and `seed` give byte-identical files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = {}
    for name in names:
        task = LOCAL_TASKS[name]
        if task.domain not in texts:
            texts[task.domain] = _texts(recipe, task.domain, name)
        rows = make_examples(task.kind, texts[task.domain], examples, _task_seed(seed, name))
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (out / f"{name}.yaml").write_text(yaml.safe_dump(task_yaml(name, task.kind, data), sort_keys=False))
    return out


def _task_seed(seed: int, name: str) -> int:
    """One seed per task, stable across processes (str hashes are salted per process)."""
    return seed * 1_000_003 + sum(ord(c) * 31 ** k for k, c in enumerate(name)) % 1_000_003


def _texts(recipe, domain: str, name: str) -> list[str]:
    from mod_train.data import heldout_documents
    docs = heldout_documents(recipe, max_docs=MAX_DOCS, domain=domain)
    texts = [t for _title, _src, t in docs if len(t) > 4 * max(CONTEXT_CHARS.values())]
    if not texts:
        raise ConfigError(f"EvalConfig.tasks: local task {name!r} needs {domain} held-out documents of at least "
                          f"{4 * max(CONTEXT_CHARS.values())} characters in recipe {recipe.name!r}: set its heldout "
                          "section (titles/fraction, or unseen sources), or drop the task")
    return texts


def task_yaml(name: str, kind: str, data: Path) -> dict:
    """The lm-eval task config of one local task reading `data` (an absolute path: the YAML is generated next
    to it, and lm-eval resolves data files from the working directory, not from the YAML)."""
    common = {"task": name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(Path(data).resolve())}},
              "test_split": "test", "doc_to_text": "{{context}}", "target_delimiter": "",
              "metric_list": _METRICS[kind], "metadata": {"version": 1.0}}
    if kind == "lastword":
        return {**common, "output_type": "loglikelihood", "doc_to_target": "{{target}}"}
    return {**common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}"}


def make_examples(kind: str, texts: list[str], n: int, seed: int) -> list[dict]:
    """`n` examples of task kind `kind` from `texts`, round-robin over the documents, at seeded positions."""
    rng = random.Random(seed)
    make = _lastword if kind == "lastword" else _choice
    rows, seen, tries = [], set(), 0
    while len(rows) < n and tries < 50 * n:
        k = tries % len(texts)
        tries += 1
        row = make(texts[k], rng)
        # a passage ending in whitespace would have it moved into the continuation by lm-eval: skip those
        if row is not None and row["context"] not in seen and not row["context"][-1:].isspace():
            seen.add(row["context"])
            rows.append({**row, "doc": k})
    return rows


def _passage_before(text: str, end: int, chars: int) -> str:
    """The `chars` characters before `end`, starting at a word start (no cut word at the front)."""
    start = max(0, end - chars)
    cut = text.find(" ", start, end)
    return text[cut + 1 if cut >= 0 and start > 0 else start:end]


def _lastword(text: str, rng: random.Random) -> dict | None:
    """The first word of 4+ letters after a random point that also occurs earlier in its passage."""
    ctx_chars = CONTEXT_CHARS["lastword"]
    pos = rng.randrange(ctx_chars + 1, len(text) - 1)
    for m in _WORD.finditer(text, pos, min(len(text), pos + 4000)):
        context = _passage_before(text, m.start() - 1, ctx_chars)
        if re.search(rf"\b{m.group()}\b", context):
            return {"context": context, "target": " " + m.group()}
    return None


def _piece_at(text: str, space: int) -> str:
    """From the space at `space`, CHOICE_CHARS characters extended to the end of the word."""
    end = text.find(" ", space + CHOICE_CHARS)
    return text[space:end if end > 0 else len(text)]


def _choice(text: str, rng: random.Random) -> dict | None:
    """A passage, its true continuation and N_CHOICES - 1 pieces from other, distant points of the document."""
    ctx_chars = CONTEXT_CHARS["choice"]
    at = text.find(" ", rng.randrange(ctx_chars, len(text) - 2 * CHOICE_CHARS))
    if at < 0:
        return None
    true = _piece_at(text, at)
    pieces = []
    for _ in range(20 * N_CHOICES):
        s = text.find(" ", rng.randrange(0, len(text) - 2 * CHOICE_CHARS))
        if s >= 0 and abs(s - at) > 2 * ctx_chars and all(abs(s - t) > 2 * CHOICE_CHARS for t, _ in pieces):
            pieces.append((s, _piece_at(text, s)))
        if len(pieces) == N_CHOICES - 1:
            break
    if len(pieces) < N_CHOICES - 1 or len({true, *(p for _, p in pieces)}) < N_CHOICES:
        return None
    choices = [p for _, p in pieces]
    label = rng.randrange(N_CHOICES)
    choices.insert(label, true)
    return {"context": _passage_before(text, at, ctx_chars), "choices": choices, "label": label}
