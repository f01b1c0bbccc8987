"""Long-context retrieval, dense vs MoD: passkey retrieval and key-value needle-in-a-haystack.

Skipping is most dangerous here: a needle token skipped by a routed layer writes no KV there, so a question
thousands of tokens later may find nothing to attend to. Each probe hides a needle in held-out text at a depth
(0 = start of the haystack, 1 = end), asks for it at the end, and records

- whether the model retrieves it: greedy exact match, scored teacher-forced in one forward of prompt + answer
  (routing decides per token from that token's state, so the greedy continuation starts with the answer iff
  every answer token is the arg-max given the prompt and the answer tokens before it), and its log-probability;
- for the MoD model, the routed layers' execution rate at the needle sentence's tokens, at the value's tokens
  (the digits the question needs) and over the whole input: was the needle skipped?

- `passkey`: "The pass key is 52817. Remember it. 52817 is the pass key." (Mohtashami & Jaggi, 2023).
- `kv`: "The special magic number for quiet-river is: 4913370." plus `distractors` other keys' needles at random
  depths (RULER's multi-key needle-in-a-haystack); the question names one key.

Probes are deterministic for a seed: the haystack offset, the keys, values and distractor depths come from
`random.Random(seed, task, length, depth, trial)`; lengths count tokens of prompt + answer (the forward).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from mod_train.config import ConfigError

TASKS = ("passkey", "kv")

_INTRO = {
    "passkey": "There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about it.\n\n",
    "kv": "Special magic numbers for several keys are hidden inside the following text. Memorize them. I will "
          "quiz you about one of them.\n\n",
}
_ADJ = "quiet bright hollow silver rapid golden frozen gentle crimson ancient hidden humble".split()
_NOUN = "river lantern meadow falcon harbor cedar comet garden anchor quarry willow beacon".split()
MIN_FILLER = 32
"""Fewest haystack tokens a probe may have (shorter lengths are refused)."""


class RetrievalLengthError(ConfigError):
    """A retrieval length the model cannot take (beyond its window) or too short for a haystack."""


@dataclass
class Probe:
    task: str
    length: int
    depth: float
    trial: int
    prompt: list[int]
    """Token ids up to and including the question; the answer follows."""
    answer: list[int]
    needle: tuple[int, int]
    """[start, end) of the target needle sentence in `prompt`."""
    value: tuple[int, int]
    """[start, end) of the needle's value (the tokens the answer copies) in `prompt`."""

    @property
    def ids(self) -> torch.Tensor:
        return torch.tensor([self.prompt + self.answer])


def check_lengths(lengths: list[int], model, where: str = "model") -> None:
    """Refuse lengths beyond the model's window (max_position_embeddings) in one line naming the field."""
    window = getattr(model.config, "max_position_embeddings", None)
    beyond = [n for n in lengths if window is not None and n > window]
    if beyond:
        raise RetrievalLengthError(
            f"EvalConfig.retrieval_lengths={lengths}: {beyond} exceed the window of the {where} "
            f"(max_position_embeddings {window}); use lengths <= {window}")


def check_fits(tasks, tok, lengths: list[int], distractors: int = 3) -> None:
    """Refuse, before any measurement, lengths too short for a probe's fixed text (intro, needles, question) plus
    MIN_FILLER tokens of haystack: a probe over a one-token haystack raises what the real one would."""
    for task in tasks:
        make_probe(task, tok, [0], min(lengths), 0.5, 0, distractors=distractors)


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _needle_text(task: str, rng: random.Random, key: str | None = None) -> tuple[str, str, str, str]:
    """(key, text before the value, value, text after it) of one needle."""
    if task == "passkey":
        v = str(rng.randrange(10_000, 100_000))
        return "", "\n\nThe pass key is", f" {v}", f". Remember it. {v} is the pass key.\n\n"
    return key, f"\n\nThe special magic number for {key} is:", f" {rng.randrange(1_000_000, 10_000_000)}", ".\n\n"


def _question(task: str, key: str) -> str:
    if task == "passkey":
        return "\n\nWhat is the pass key? The pass key is"
    return f"\n\nWhat is the special magic number for {key}? The special magic number for {key} is:"


def make_probe(task: str, tok, haystack: list[int], length: int, depth: float, trial: int, seed: int = 0,
               distractors: int = 3) -> Probe:
    """One probe of exactly `length` tokens (prompt + answer), its needle at `depth` of the haystack."""
    rng = random.Random(f"{seed}/{task}/{length}/{depth}/{trial}")
    keys = rng.sample([f"{a}-{n}" for a in _ADJ for n in _NOUN], 1 + (distractors if task == "kv" else 0))
    needles = [_needle_text(task, rng, k) for k in keys]
    key, pre, value, post = needles[0]
    answer = _enc(tok, value)
    intro, question = _enc(tok, _INTRO[task]), _enc(tok, _question(task, key))
    parts = [[_enc(tok, p) for p in n[1:]] for n in needles]  # [pre, value, post] ids of each needle
    fill = length - len(answer) - len(intro) - len(question) - sum(len(x) for p in parts for x in p)
    if fill < MIN_FILLER:
        raise RetrievalLengthError(f"EvalConfig.retrieval_lengths: {length} tokens leave {fill} tokens of "
                                   f"haystack for a {task} probe; use lengths of at least {length - fill + 256}")
    filler = _filler(haystack, fill, rng)
    at = [round(depth * fill)] + [rng.randrange(fill + 1) for _ in needles[1:]]
    prompt, spans = list(intro), {}
    last = 0
    for k in sorted(range(len(needles)), key=lambda k: (at[k], k)):
        prompt += filler[last:at[k]]
        last = at[k]
        start = len(prompt)
        pre_ids, value_ids, post_ids = parts[k]
        prompt += pre_ids + value_ids + post_ids
        spans[k] = ((start, len(prompt)), (start + len(pre_ids), start + len(pre_ids) + len(value_ids)))
    prompt += filler[last:] + question
    return Probe(task, length, depth, trial, prompt, answer, *spans[0])


def _filler(haystack: list[int], n: int, rng: random.Random) -> list[int]:
    """`n` haystack tokens from a seeded offset (the haystack repeated if it is shorter)."""
    if not haystack:
        raise ConfigError("retrieval needs held-out text for its haystack: the recipe has no held-out documents")
    reps = (n // len(haystack)) + 2
    start = rng.randrange(len(haystack))
    return (haystack * reps)[start:start + n]


def score(logits: torch.Tensor, answer: list[int]) -> tuple[bool, float]:
    """(greedy exact match, log-probability) of `answer` from the logits predicting each answer token [n, V]."""
    lp = torch.log_softmax(logits.double(), -1)
    tgt = torch.tensor(answer)
    return bool((lp.argmax(-1) == tgt).all()), float(lp[torch.arange(len(answer)), tgt].sum())


@torch.no_grad()
def run_probe(model, probe: Probe) -> dict:
    """One forward of prompt + answer: exact match, log-probability, and for a MoD model the execution rate of
    the routed layers at the needle sentence, at its value tokens and over all tokens."""
    from mod_train.eval.metrics import is_mod
    ids = probe.ids
    n = len(probe.answer)
    if is_mod(model):
        h, terms = model.mod_stack(*model.mod_embed(ids))
        h = model.model.norm(h)
        sel = torch.stack([t.selected[0] for t in terms]).float()  # [routed layers, tokens]
    else:
        h, sel = model.model(input_ids=ids).last_hidden_state, None
    ok, logprob = score(model.lm_head(h[0, -n - 1:-1]).float(), probe.answer)
    out = {"correct": ok, "logprob": logprob}
    if sel is not None and sel.numel():
        (ns, ne), (vs, ve) = probe.needle, probe.value
        out.update(needle_rate=float(sel[:, ns:ne].mean()), value_rate=float(sel[:, vs:ve].mean()),
                   rate=float(sel.mean()))
    return out


def haystack_ids(tok, docs: list[tuple[str, str, str]]) -> list[int]:
    """Held-out documents (title, source, text) as one token stream, separated by blank lines."""
    ids = []
    for _title, _src, text in docs:
        ids += _enc(tok, text + "\n\n")
    return ids


def evaluate(models: dict, tok, haystack: list[int], tasks, lengths, depths, trials: int, seed: int = 0,
             distractors: int = 3, progress: bool = False) -> dict:
    """Every probe on every model: {task: {model name: {length: {depth: cell}}}}, a cell holding accuracy, mean
    log-probability and (MoD) the mean execution rates over its trials. Keys are strings (JSON)."""
    from tqdm.auto import tqdm
    out = {t: {m: {} for m in models} for t in tasks}
    total = len(tasks) * len(lengths) * len(depths) * trials * len(models)
    with tqdm(total=total, desc="retrieval", disable=not progress, leave=False) as bar:
        for task in tasks:
            for L in lengths:
                for d in depths:
                    probes = [make_probe(task, tok, haystack, L, d, k, seed, distractors) for k in range(trials)]
                    for name, model in models.items():
                        runs = [run_probe(model, p) for p in probes]
                        out[task][name].setdefault(str(L), {})[str(d)] = _cell(runs)
                        bar.update(trials)
    return out


def _cell(runs: list[dict]) -> dict:
    cell = {"acc": sum(r["correct"] for r in runs) / len(runs),
            "logprob": sum(r["logprob"] for r in runs) / len(runs), "trials": len(runs)}
    for k in ("needle_rate", "value_rate", "rate"):
        if k in runs[0]:
            cell[k] = sum(r[k] for r in runs) / len(runs)
    return cell


def table(res: dict) -> list[str]:
    """Markdown rows: task x length x depth, dense vs MoD accuracy and the MoD's rates at the needle."""
    L = ["| task | length | depth | dense acc | MoD acc | MoD rate at needle | MoD rate at value | MoD rate overall "
         "| dense / MoD answer log-prob | trials |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task, by_model in res.items():
        for length, row in by_model["mod"].items():
            for depth, m in row.items():
                d = by_model["dense"][length][depth]
                L.append(f"| {task} | {length} | {depth} | {d['acc']:.2f} | {m['acc']:.2f} | "
                         f"{m.get('needle_rate', float('nan')):.3f} | {m.get('value_rate', float('nan')):.3f} | "
                         f"{m.get('rate', float('nan')):.3f} | {d['logprob']:.2f} / {m['logprob']:.2f} | "
                         f"{m['trials']} |")
    return L


def heatmaps(res: dict, out_dir) -> dict[str, str]:
    """One PNG per model: accuracy over needle depth (rows) x length (columns), a panel per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = {}
    models = list(next(iter(res.values())))
    for name in models:
        fig, axes = plt.subplots(1, len(res), figsize=(4.2 * len(res), 3.4), squeeze=False)
        for k, (ax, (task, by_model)) in enumerate(zip(axes[0], res.items())):
            lengths = list(by_model[name])
            depths = list(by_model[name][lengths[0]])
            grid = [[by_model[name][L][d]["acc"] for L in lengths] for d in depths]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), lengths)
            ax.set_yticks(range(len(depths)), depths)
            ax.set_xlabel("length (tokens)")
            if k == 0:
                ax.set_ylabel("needle depth")
            ax.set_title(f"{task}: {'MoD' if name == 'mod' else name}")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=axes[0].tolist(), label="exact-match accuracy")
        path = Path(out_dir) / f"retrieval_{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files[name] = path.name
    return files
