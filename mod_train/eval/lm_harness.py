"""lm-evaluation-harness on the dense and the MoD model, the runner everyone reports conversions with.

    tm = task_manager(include_path, names)              # lm-eval's task index + our local task folder
    check_tasks(["mod_choice", "hellaswag"], tm)        # unknown names: one line (UnknownTaskError)
    res = evaluate(mod_model, tokenizer, ["mod_choice"], tm, limit=50)
    res["mod_choice"]["metrics"]["acc"], res["mod_choice"]["rate"]

The already-loaded model is wrapped as an `HFLM` instance (no second load, the exact weights and MoD settings
under evaluation) and `lm_eval.simple_evaluate` runs one task at a time, so the MoD model's realised execution
rate is recorded per task: a forward hook sums each forward's per-layer rates, token weighted. Batch size 1: no
padding tokens, so the rates are those of the task's own tokens. The stock command does the same from a saved
directory (it carries its modeling file, see mod_train/mod/hf_remote.py):

    lm_eval --model hf --model_args pretrained=<dir>,trust_remote_code=True --include_path <tasks dir> --tasks <name>
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import time
from pathlib import Path

import torch

from mod_train.config import ConfigError
from mod_train.eval.local_tasks import LOCAL_TASKS


class UnknownTaskError(ConfigError):
    """A task name neither lm-eval nor the local task folder defines."""


def task_manager(include_path: str | Path | None, names: list[str]):
    """lm-eval's TaskManager over the YAML files under `include_path`, plus lm-eval's own tasks unless every name
    is a local task (indexing lm-eval's thousands of task files takes ~15 s on a small CPU)."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(include_path) if include_path else None,
                       include_defaults=any(n not in LOCAL_TASKS for n in names))


def check_tasks(names: list[str], tm) -> None:
    """Refuse unknown task names in one line, with the closest known name and the local tasks."""
    known = set(tm.all_tasks) | set(LOCAL_TASKS)
    for name in names:
        if name not in known:
            hint = difflib.get_close_matches(name, sorted(known), n=1)
            raise UnknownTaskError(
                f"EvalConfig.tasks: unknown task {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; local tasks: {', '.join(LOCAL_TASKS)}; hub tasks need a connected machine, "
                "see `lm_eval ls tasks` for the names")


class RateMeter:
    """Token-weighted realised execution rate of a MoD model over every forward inside the `with` block (the mean
    over routed layers of the share of tokens that ran them). A dense model records nothing (rate None)."""

    def __init__(self, model):
        self.model, self.tokens, self.executed, self._handle = model, 0, 0.0, None

    def __enter__(self):
        self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def _hook(self, _module, args, kwargs, output):
        routing = getattr(output, "routing", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if routing and ids is not None:
            rate = sum(float(r["rate"]) for r in routing.values()) / len(routing)
            self.tokens += ids.numel()
            self.executed += rate * ids.numel()

    @property
    def rate(self) -> float | None:
        return self.executed / self.tokens if self.tokens else None


def evaluate(model, tokenizer, names: list[str], tm, limit: int | None = None, samples: bool = False) -> dict:
    """Run lm-eval task by task on an already-loaded model: {task: {"metrics": {metric: value}, "rate": realised
    execution rate or None, "examples": n, "seconds": s}}, plus "samples" (lm-eval's per-example log, with the
    log-likelihoods it scored) when `samples`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=1)
    out = {}
    for name in names:
        t0 = time.time()
        with RateMeter(model) as meter, torch.no_grad(), _dataset_errors(name):
            res = simple_evaluate(model=lm, tasks=[name], task_manager=tm, limit=limit, bootstrap_iters=0,
                                  log_samples=samples, verbosity="ERROR")
        rows = res["results"]  # a group (mmlu, ruler) brings its subtasks' rows, and its own if it aggregates
        metrics = _metrics(rows[name]) if name in rows else \
            {f"{t}/{k}": v for t, row in rows.items() for k, v in _metrics(row).items()}
        out[name] = {"metrics": metrics, "rate": meter.rate, "seconds": time.time() - t0,
                     "examples": sum(int(n["effective"]) for n in res["n-samples"].values())}
        if samples:
            out[name]["samples"] = res["samples"][name]
    return out


class TaskDataError(ConfigError):
    """A task's dataset could not be loaded (offline, a hub task cannot download it)."""


@contextlib.contextmanager
def _dataset_errors(name: str):
    """A hub task without network fails deep inside `datasets`; say so in one line instead."""
    try:
        yield
    except (ConnectionError, OSError) as e:
        if name in LOCAL_TASKS:
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TaskDataError(f"EvalConfig.tasks: task {name!r} could not load its dataset ({first}); hub tasks need a "
                            f"connected machine (docs/evaluation.md); offline, use the local tasks "
                            f"{', '.join(LOCAL_TASKS)}") from None


def _metrics(row: dict) -> dict:
    """lm-eval's 'acc,none' keys as {'acc': value}, without stderr entries (bootstrap is off)."""
    return {k.split(",")[0]: float(v) for k, v in row.items()
            if "," in k and "_stderr" not in k and isinstance(v, (int, float))}


def compare(dense, mod, tokenizer, names: list[str], tm, limit: int | None = None) -> dict:
    """The same tasks on both models: {task: {"dense": ..., "mod": ...}} as `evaluate` returns them."""
    d = evaluate(dense, tokenizer, names, tm, limit)
    m = evaluate(mod, tokenizer, names, tm, limit)
    return {name: {"dense": d[name], "mod": m[name]} for name in names}


def table(res: dict) -> list[str]:
    """Markdown rows: one per task and metric, dense vs MoD, with the MoD's realised execution rate."""
    L = ["| task | metric | dense | MoD | MoD - dense | MoD realised rate | examples |",
         "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        for metric, dv in r["dense"]["metrics"].items():
            mv = r["mod"]["metrics"].get(metric, float("nan"))
            rate = r["mod"]["rate"]
            L.append(f"| {name} | {metric} | {dv:.4g} | {mv:.4g} | {mv - dv:+.4g} | "
                     f"{'-' if rate is None else f'{rate:.3f}'} | {r['mod']['examples']} |")
    return L
