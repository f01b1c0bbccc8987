"""Rank-0 metrics: progress bar (tokens/s, loss, execution rate, ETA), JSONL file, wandb.

wandb runs offline by default (a local run under <out>/wandb that `wandb sync` uploads later);
online when `--train.wandb online`. A resumed run continues the same wandb run id.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, out: Path, tc, *, rank: int, start_step: int, config: dict):
        self.rank, self.tc = rank, tc
        self.active = rank == 0
        self.bar = None
        self.wandb = None
        if not self.active:
            return
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        if tc.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=tc.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc=tc.run_name or out.name)
        if tc.wandb != "disabled":
            try:
                import wandb
                id_file = out / "wandb_id.txt"
                run_id = id_file.read_text().strip() if id_file.is_file() else _new_id()
                id_file.write_text(run_id)
                self.wandb = wandb.init(project=tc.wandb_project, name=tc.run_name or out.name, id=run_id,
                                        resume="allow", dir=str(out), mode=tc.wandb, config=config)
            except Exception as e:  # noqa: BLE001 - logging must never kill training
                print(f"[mod_train] wandb disabled: {e}", flush=True)
                self.wandb = None

    def event(self, kind: str, **kw) -> None:
        if self.active:
            self.jsonl.write(json.dumps({"event": kind, "time": time.time(), **kw}) + "\n")

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        rec = {"step": step, **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log(rec, step=step)
        if self.bar is not None:
            post = {"loss": f"{rec.get('loss/lm', float('nan')):.4f}", "tok/s": f"{rec.get('tokens_per_s', 0):.0f}"}
            if "routing/rate_mean" in rec:
                post["rate"] = f"{rec['routing/rate_mean']:.3f}"
            self.bar.set_postfix(post, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()


def _new_id() -> str:
    import secrets
    import string
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def read_metrics(path) -> dict[int, dict]:
    """The last record of each step in a metrics.jsonl (a resumed run re-logs the replayed steps)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if "step" in r and "event" not in r:
            out[r["step"]] = r
    return out
