"""Atomic, resumable checkpoints on top of DeepSpeed's engine checkpoints.

Layout under `<out>/checkpoints/`:
    step_000040/            DeepSpeed files (model/optimizer shards) written by engine.save_checkpoint
        trainer_rank{r}.pt  per-rank state: data position, RNG states
        meta.json           step, run fingerprint (what must match to resume), configs
        hf/                 the dense model's HF config and the run's tokenizer (export needs nothing else)
        MANIFEST.json       written last, by rank 0 after a barrier: every file, its size, its xxh3-128
                            checksum and the rank that wrote (and hashed) it
    latest                  name of the newest complete checkpoint; replaced with os.replace only
                            after MANIFEST.json exists, so a crash mid-save never moves it
    step_000040_universal/  only after an elastic resume onto another world size: DeepSpeed's universal
                            checkpoint of step_000040 (train/elastic.py); removed with its checkpoint

A checkpoint is "good" if MANIFEST.json exists and every listed file has the listed size and
checksum. Resume takes `latest` if good, else falls back (loudly) to the newest good older one; each
rank verifies the checksums of the files it wrote, and the ranks agree on the verdict.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mod_train.config import UserError

log = logging.getLogger("mod_train.checkpoint")
TAG_RE = re.compile(r"^step_(\d{6,})$")
UNIVERSAL_SUFFIX = "_universal"  # <tag>_universal: the universal checkpoint of <tag> (elastic resume)


class IncompatibleCheckpoint(UserError, RuntimeError):
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

HASH = "xxh3_128"
_CHUNK = 8 << 20


def file_hash(path: Path) -> str:
    """xxh3-128 of a file's bytes (several GB/s, so hashing stays a small part of a save)."""
    import xxhash
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def describe_files(ckpt: Path, paths, rank: int) -> dict:
    """{relative path: {size, xxh3_128, rank}} for files of `ckpt` written by `rank`."""
    out = {}
    for p in paths:
        p = Path(p)
        out[str(p.relative_to(ckpt))] = {"size": p.stat().st_size, HASH: file_hash(p), "rank": rank}
    return out


def write_manifest(ckpt: Path, described: dict | None = None) -> None:
    """MANIFEST.json: every file of `ckpt`; those not in `described` (the ranks' own lists; the rest was
    written by rank 0 or by DeepSpeed outside its checkpoint engine) are hashed here."""
    files = dict(described or {})
    rest = [p for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name != "MANIFEST.json" and str(p.relative_to(ckpt)) not in files]
    files.update(describe_files(ckpt, rest, rank=0))
    _atomic_write_text(ckpt / "MANIFEST.json", json.dumps({"files": dict(sorted(files.items()))}, indent=1))


def check_complete(ckpt: Path, hashes: str | tuple = "all") -> str | None:
    """None if `ckpt` is a complete checkpoint, else the reason it is not.

    Every listed file must exist with its size; checksums are verified for `hashes`: "all", None
    (sizes only: cheap), or (rank, world) = the files that rank wrote (owner rank modulo world)."""
    man = ckpt / "MANIFEST.json"
    if not ckpt.is_dir():
        return "directory missing"
    if not man.is_file():
        return "no MANIFEST.json (the save did not complete)"
    try:
        files = json.loads(man.read_text())["files"]
    except Exception as e:  # noqa: BLE001
        return f"unreadable MANIFEST.json ({e})"
    for rel, entry in files.items():
        entry = entry if isinstance(entry, dict) else {"size": entry}  # manifests before checksums
        p = ckpt / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != entry["size"]:
            return f"file {rel} has {p.stat().st_size} bytes, manifest says {entry['size']} (truncated/corrupt)"
        mine = hashes == "all" or (hashes is not None and entry.get("rank", 0) % hashes[1] == hashes[0])
        if mine and HASH in entry and file_hash(p) != entry[HASH]:
            return f"file {rel} does not match its checksum (corrupt: same size, different bytes)"
    return None


def list_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)), key=step_of)


def find_resume(root: Path, check=check_complete) -> str | None:
    """The tag to resume from: `latest` if complete, else the newest complete older one (warned).

    `check(dir)` -> None or the reason a checkpoint is unusable (default: sizes and every checksum;
    the trainer passes a collective check in which each rank verifies the files it wrote)."""
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
    first_why = None if wanted in candidates else "directory missing"
    for t in reversed(candidates):
        why = check(root / t)
        if why is None:
            if t != wanted:
                msg = (f"!!! checkpoint '{wanted}' is unusable ({first_why}); "
                       f"FALLING BACK to the previous good checkpoint '{t}' !!!")
                log.error(msg)
                print(msg, flush=True)
            return t
        first_why = first_why or why
        log.error("checkpoint %s is not usable: %s", t, why)
    raise RuntimeError(f"no usable checkpoint under {root} (latest={wanted!r}); delete the directory to start over")


def remove_universal(root: Path, tag: str) -> None:
    """The universal checkpoint of `tag` (elastic resume) and the traces of a partial or failed conversion."""
    for p in Path(root).glob(tag + UNIVERSAL_SUFFIX + "*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def prune(root: Path, keep_last: int) -> None:
    tags = [t for t in list_tags(root) if check_complete(root / t, hashes=None) is None]
    for t in tags[:-keep_last]:
        shutil.rmtree(root / t, ignore_errors=True)
        remove_universal(root, t)


# -- fingerprint -----------------------------------------------------------------------------------

# TrainConfig fields a resume applies as given (and logs as changed). The learning-rate schedule is
# rebuilt from them; the others are read afresh every step or only at start-up.
MAY_CHANGE = ("lr", "router_lr", "min_lr_ratio", "warmup_steps", "max_steps", "save_every", "keep_last",
              "log_every", "grad_clip", "grad_checkpointing", "micro_batch_size", "grad_accum", "exit_after_steps",
              "per_source_loss", "wandb", "wandb_project", "run_name", "progress", "objective", "lm_weight",
              "kd_weight", "kd_temperature", "kd_hidden_weight", "kd_hidden_layers", "rate_control", "rate_warmup_steps", "rate_start",
              "elastic", "router_stage_steps")
# TrainConfig fields the optimizer state or the data order has baked in: part of the fingerprint
# (together with precision, trainable/train_modules and seq_len, recorded under their own keys).
TRAIN_FIXED = ("seed", "weight_decay", "betas", "eps")


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


def changed_settings(saved_train: dict, current_train: dict) -> dict:
    """{field: [checkpoint's value, this run's value]} for the MAY_CHANGE fields that differ."""
    return {k: [saved_train.get(k), current_train[k]] for k in MAY_CHANGE if saved_train.get(k) != current_train[k]}


# -- save / load -----------------------------------------------------------------------------------

class CheckpointSaveError(UserError, OSError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous one is intact."""


@contextmanager
def recording_writes(engine):
    """Collect the paths DeepSpeed's checkpoint engine writes on this rank during the block."""
    ce = engine.checkpoint_engine
    orig, own = ce.save, "save" in vars(ce)
    written = []

    def save(state_dict, path, *a, **k):
        out = orig(state_dict, path, *a, **k)
        written.append(Path(path))
        return out

    ce.save = save
    try:
        yield written
    finally:
        if own:
            ce.save = orig
        else:
            del ce.save


def agree_max(value: int) -> int:
    """Collective: the largest `value` over all ranks (on the accelerator when the backend needs it)."""
    import torch.distributed as dist
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(value)], dtype=torch.long, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _save_error(ckpt: Path, e: OSError) -> CheckpointSaveError:
    free = ""
    try:
        free = f" ({shutil.disk_usage(ckpt.parent).free / 2**30:.1f} GiB free there now)"
    except OSError:
        pass
    return CheckpointSaveError(e.errno, f"could not write checkpoint {ckpt}: {e.strerror or e}{free}; the previous "
                                        "checkpoint ('latest') is intact and the partial one was removed; free disk "
                                        "space (or raise the quota, or fix the permissions), then re-run the same "
                                        "command to resume")


def save(engine, root: Path, step: int, *, rank: int, trainer_state: dict, meta: dict, keep_last: int,
         extra_rank0=None, files_rank0=None) -> Path:
    """Collective: every rank must call it. Returns the checkpoint directory.

    Each rank hashes the files it wrote (DeepSpeed shards through its checkpoint engine, its own
    trainer state) while they are in its page cache; rank 0 merges them into MANIFEST.json.
    `files_rank0(ckpt)` writes extra files on rank 0 (HF config, tokenizer). A failed write (disk
    full) on any rank raises CheckpointSaveError on every rank after removing the partial directory."""
    import torch.distributed as dist

    root = Path(root)
    tag = tag_for(step)
    ckpt = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if ckpt.exists():  # a partial save of the same step from an earlier, killed attempt
            shutil.rmtree(ckpt)
        remove_universal(root, tag)  # converted from an older save of this step
    dist.barrier()
    error, described = None, {}
    try:
        with recording_writes(engine) as written:
            engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        torch.save(trainer_state, ckpt / f"trainer_rank{rank}.pt")
        written.append(ckpt / f"trainer_rank{rank}.pt")
        if extra_rank0 is not None:
            extra_rank0(ckpt)  # collective (e.g. consolidated 16-bit weights for TP)
        if rank == 0:
            if files_rank0 is not None:
                files_rank0(ckpt)
            _atomic_write_text(ckpt / "meta.json", json.dumps(meta, indent=1, default=str))
        described = describe_files(ckpt, written, rank)
    except OSError as e:
        error = e
    except RuntimeError as e:  # torch.save reports a failed write as "PytorchStreamWriter failed writing file"
        if "write" not in str(e).lower():
            raise
        error = OSError(errno.EIO, f"torch.save failed: {str(e).splitlines()[0]}")
    if agree_max(0 if error is None else 1):
        if rank == 0:
            shutil.rmtree(ckpt, ignore_errors=True)
        dist.barrier()
        raise _save_error(ckpt, error or OSError(errno.EIO, "another rank failed to write its part"))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, described)
    if rank == 0:
        write_manifest(ckpt, {k: v for part in gathered for k, v in part.items()})
        _atomic_write_text(root / "latest", tag)
        prune(root, keep_last)
    dist.barrier()
    return ckpt


def load_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())
