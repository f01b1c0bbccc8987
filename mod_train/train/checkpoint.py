"""Atomic, resumable checkpoints on top of DeepSpeed's engine checkpoints.

Layout under `<out>/checkpoints/`:
    step_000040/            DeepSpeed files (model/optimizer shards) written by engine.save_checkpoint
        trainer_rank{r}.pt  per-rank state: data position, RNG states
        meta.json           step, run fingerprint (what must match to resume), configs
        MANIFEST.json       written last, by rank 0 after a barrier: every file and its size
    latest                  name of the newest complete checkpoint; replaced with os.replace only
                            after MANIFEST.json exists, so a crash mid-save never moves it

A checkpoint is "good" if MANIFEST.json exists and every listed file has the listed size. Resume
takes `latest` if good, else falls back (loudly) to the newest good older one.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("mod_train.checkpoint")
TAG_RE = re.compile(r"^step_(\d{6,})$")


class IncompatibleCheckpoint(RuntimeError):
    """The checkpoint was written by a run whose configuration differs in a way that cannot resume."""


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def step_of(tag: str) -> int:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else -1


# -- RNG -----------------------------------------------------------------------------------------

def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# -- manifest / validity ---------------------------------------------------------------------------

def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(ckpt: Path) -> None:
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != "MANIFEST.json":
            files[str(p.relative_to(ckpt))] = p.stat().st_size
    _atomic_write_text(ckpt / "MANIFEST.json", json.dumps({"files": files}, indent=1))


def check_complete(ckpt: Path) -> str | None:
    """None if `ckpt` is a complete checkpoint, else the reason it is not."""
    man = ckpt / "MANIFEST.json"
    if not ckpt.is_dir():
        return "directory missing"
    if not man.is_file():
        return "no MANIFEST.json (the save did not complete)"
    try:
        files = json.loads(man.read_text())["files"]
    except Exception as e:  # noqa: BLE001
        return f"unreadable MANIFEST.json ({e})"
    for rel, size in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != size:
            return f"file {rel} has {p.stat().st_size} bytes, manifest says {size} (truncated/corrupt)"
    return None


def list_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)), key=step_of)


def find_resume(root: Path) -> str | None:
    """The tag to resume from: `latest` if complete, else the newest complete older one (warned)."""
    root = Path(root)
    latest_file = root / "latest"
    tags = list_tags(root)
    wanted = latest_file.read_text().strip() if latest_file.is_file() else (tags[-1] if tags else None)
    if wanted is None:
        return None
    candidates = [t for t in tags if step_of(t) <= step_of(wanted)]
    # newer-than-latest dirs are partial saves by definition: never used, but announce them
    for t in tags:
        if step_of(t) > step_of(wanted):
            log.warning("checkpoint %s is newer than 'latest' (%s) and incomplete: ignored", t, wanted)
    for t in reversed(candidates):
        why = check_complete(root / t)
        if why is None:
            if t != wanted:
                msg = (f"!!! checkpoint '{wanted}' is unusable ({check_complete(root / wanted)}); "
                       f"FALLING BACK to the previous good checkpoint '{t}' !!!")
                log.error(msg)
                print(msg, flush=True)
            return t
        log.error("checkpoint %s is not usable: %s", t, why)
    raise RuntimeError(f"no usable checkpoint under {root} (latest={wanted!r}); delete the directory to start over")


def prune(root: Path, keep_last: int) -> None:
    tags = [t for t in list_tags(root) if check_complete(root / t) is None]
    for t in tags[:-keep_last]:
        shutil.rmtree(root / t, ignore_errors=True)


# -- fingerprint -----------------------------------------------------------------------------------

def compare_fingerprints(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two run fingerprints (empty if compatible)."""
    diffs = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}.{k}" if prefix else k)
        elif a != b:
            diffs.append(f"{prefix}: checkpoint has {a!r}, this run has {b!r}")

    walk(saved, current, "")
    return diffs


# -- save / load -----------------------------------------------------------------------------------

def save(engine, root: Path, step: int, *, rank: int, trainer_state: dict, meta: dict, keep_last: int,
         extra_rank0=None) -> Path:
    """Collective: every rank must call it. Returns the checkpoint directory."""
    import torch.distributed as dist

    root = Path(root)
    tag = tag_for(step)
    ckpt = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if ckpt.exists():  # a partial save of the same step from an earlier, killed attempt
            shutil.rmtree(ckpt)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(trainer_state, ckpt / f"trainer_rank{rank}.pt")
    if extra_rank0 is not None:
        extra_rank0(ckpt)  # collective (e.g. consolidated 16-bit weights for TP)
    if rank == 0:
        _atomic_write_text(ckpt / "meta.json", json.dumps(meta, indent=1, default=str))
    dist.barrier()
    if rank == 0:
        write_manifest(ckpt)
        _atomic_write_text(root / "latest", tag)
        prune(root, keep_last)
    dist.barrier()
    return ckpt


def load_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())
