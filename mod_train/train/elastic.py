"""Elastic resume (`--train.elastic true`): a run saved at one world size continues at another.

    p = elastic.plan(ckpt_dir, meta, tc, world=4, tp=1, pp=1)  # None: resumes as saved; a refusal raises
    elastic.convert(root, tag, rank)          # collective: <tag>_universal beside the checkpoint, converted once
    elastic.load_universal(engine, root, tag)  # engine built with "checkpoint": {"load_universal": true}
    mine, data_states = elastic.trainer_states(ckpt_dir, p, rank, tp)

What moves, and how:
- Model, optimizer and lr-scheduler state: DeepSpeed's universal checkpoint. Rank 0 runs
  `deepspeed.checkpoint.ds_to_universal` once into `<tag>_universal/` beside the checkpoint (written under a
  temporary name, renamed when complete; SOURCE.json holds the checksum of the checkpoint's MANIFEST.json, so a
  re-written checkpoint of the same step is converted afresh); the engine is built with
  `"checkpoint": {"load_universal": true}` and loads that folder. Frozen parameters (LoRA's base weights,
  `routers` runs) are not in the optimizer and are not loaded: they are the --model weights the engine was
  just built from, unchanged by training. ZeRO-0 keeps full optimizer states on every rank and needs no
  conversion.
- The data position: every new rank reads ALL the old ranks' data states and takes its share of what they
  had not consumed (`StepRows.load_resharded`: the global document order is the contract).
- The global batch (micro_batch_size x grad_accum x data-parallel size) is kept: grad_accum is recomputed
  from it, and the same rule applies at the same world size (a later plain restart after an elastic resume).
- RNG states: new rank r takes old rank r mod N's (every rank seeds alike; dropout streams differ anyway).

Refused, in one line that says what would work: any layout change with pipeline stages or tensor parallelism
(DeepSpeed 0.19.8's universal checkpoint cannot re-shard our pipeline stages, and its converter fails on an
AutoTP x ZeRO-3 checkpoint: the embedding's recorded shape is the full one, its saved partitions are TP shards),
and a global batch the new size cannot keep.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from mod_train.config import TrainConfig
from mod_train.train import checkpoint as ckpt


@dataclass
class Plan:
    """How a checkpoint written at `saved_world` ranks resumes at this run's size."""

    tag: str
    saved_world: int
    world: int
    saved_dp: int
    dp: int
    global_batch: int
    grad_accum_before: int
    grad_accum: int
    universal: bool
    """Whether model and optimizer state go through the universal checkpoint (ZeRO 1-3 on another size)."""

    @property
    def reshard(self) -> bool:
        return self.saved_dp != self.dp

    def line(self) -> str:
        how = ("model and optimizer state from the universal checkpoint " + self.tag + ckpt.UNIVERSAL_SUFFIX
               if self.universal else "model and optimizer state as saved (replicated)")
        return (f"elastic resume from {self.tag}: {self.saved_world} -> {self.world} ranks ({self.saved_dp} -> "
                f"{self.dp} data-parallel); grad_accum {self.grad_accum_before} -> {self.grad_accum} keeps the global "
                f"batch of {self.global_batch} rows; {how}" + ("; data re-sharded by document" if self.reshard else ""))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def plan(d: Path, meta: dict, tc: TrainConfig, *, world: int, tp: int, pp: int) -> Plan | None:
    """The elastic plan for checkpoint `d` (its meta.json): None when it resumes as saved (same world size and
    global batch); IncompatibleCheckpoint in one line when it cannot be kept."""
    fp = meta["fingerprint"]
    saved_world = int(fp.get("world_size", world))
    saved_tp, saved_pp = int(fp.get("tensor_parallel", 1)), int(fp.get("pipeline_stages", 1))
    dp, saved_dp = world // (tp * pp), saved_world // (saved_tp * saved_pp)
    mb = tc.micro_batch_size
    g = int(fp.get("global_batch", mb * tc.grad_accum * dp))
    if saved_world == world and g == mb * tc.grad_accum * dp:
        return None
    refuse = ckpt.IncompatibleCheckpoint
    if (saved_tp, saved_pp, saved_dp) != (tp, pp, dp) and max(saved_tp, tp, saved_pp, pp) > 1:
        what = ("pipeline stages" if max(saved_pp, pp) > 1 else
                "tensor-parallel states (measured: its converter mis-sizes the AutoTP-sharded embedding of a "
                "ZeRO-3 checkpoint; TP with ZeRO-1/2 is untested and refused too)")
        raise refuse(f"train.elastic: checkpoint {d} has {saved_tp} tensor-parallel x {saved_pp} pipeline x "
                     f"{saved_dp} data-parallel ranks, this run {tp} x {pp} x {dp}: DeepSpeed 0.19.8's universal "
                     f"checkpoint cannot re-shard {what}; resume on {saved_world} ranks with the same layout, or "
                     "train with autotp_size 1 and no pipeline stages to resume elastically")
    if g % (mb * dp):
        sizes = ", ".join(map(str, _divisors(g // mb))) if g % mb == 0 else "none at this micro_batch_size"
        alt = f", or a --train.micro_batch_size that divides {g // dp}" if g % dp == 0 else ""
        was = meta.get("train", {})
        raise refuse(f"train.elastic: the global batch of {g} rows (micro_batch_size {was.get('micro_batch_size')} "
                     f"x grad_accum {was.get('grad_accum')} x {saved_dp} data-parallel ranks) cannot be kept on {dp} "
                     f"data-parallel ranks at micro_batch_size {mb} ({g} is not a multiple of {mb * dp}); resume on "
                     f"{sizes} data-parallel rank(s){alt}")
    return Plan(tag=d.name, saved_world=saved_world, world=world, saved_dp=saved_dp, dp=dp, global_batch=g,
                grad_accum_before=tc.grad_accum, grad_accum=g // (mb * dp),
                universal=saved_dp != dp and int(fp.get("zero_stage", 1)) > 0)


# -- universal checkpoint --------------------------------------------------------------------------------

def convert(root: Path, tag: str, rank: int, poll_s: float = 1.0) -> Path:
    """Collective: `<root>/<tag>_universal`, converted by rank 0 unless a conversion of this very checkpoint is
    there; a failed conversion raises on every rank. The other ranks wait by watching the folder, not in a
    collective: a large model converts for longer than NCCL's default 10-minute timeout."""
    src, out = Path(root) / tag, Path(root) / (tag + ckpt.UNIVERSAL_SUFFIX)
    failed = out.with_name(out.name + ".failed")
    source = {"checkpoint": tag, "manifest": ckpt.file_hash(src / "MANIFEST.json")}
    if rank == 0:
        failed.unlink(missing_ok=True)  # an earlier attempt's verdict
    ckpt.agree_max(0)  # a barrier: nobody reads a verdict before the stale one is gone
    error = None
    if rank == 0:
        try:
            _convert_once(src, out, source)
        except ckpt.IncompatibleCheckpoint as e:
            error = e
            failed.write_text(str(e))
    else:
        while not failed.is_file() and not _converted(out, source):
            time.sleep(poll_s)
    if ckpt.agree_max(error is not None or failed.is_file()):
        raise error or ckpt.IncompatibleCheckpoint(failed.read_text())
    return out


def _converted(out: Path, source: dict) -> bool:
    marker = out / "SOURCE.json"
    return marker.is_file() and json.loads(marker.read_text()) == source


def _convert_once(src: Path, out: Path, source: dict) -> None:
    from deepspeed.checkpoint import ds_to_universal

    if _converted(out, source):
        return
    tmp = out.with_name(out.name + ".tmp")
    for p in (tmp, out):
        shutil.rmtree(p, ignore_errors=True)
    tmp.mkdir(parents=True)
    args = SimpleNamespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = tmp / "convert.log"
    try:
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001 -- whatever DeepSpeed raises, the user gets one line and the log
        first = (str(e).strip().splitlines() or [""])[0]
        raise ckpt.IncompatibleCheckpoint(
            f"train.elastic: DeepSpeed's ds_to_universal could not convert {src} ({type(e).__name__}: {first}; "
            f"log: {log}); resume on the checkpoint's world size without --train.elastic") from None
    finally:
        (src.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's own pointer: unused
    (tmp / "SOURCE.json").write_text(json.dumps(source))
    os.replace(tmp, out)


def load_universal(engine, root: Path, tag: str) -> None:
    """engine.load_checkpoint of `<tag>_universal`, with two defects of DeepSpeed 0.19.8's ZeRO-3 universal load
    undone: every sub-group's Adam state gets the same `step` tensor, which torch's AdamW then increments once per
    group and step (with 3 groups the count runs 3x fast and the bias correction drifts: measured 8e-4 on the
    loss two steps later), and every param group gets group 0's hyperparameters (the no_decay and router groups'
    weight decay and name). The groups' settings come back from the engine as built (the fingerprint holds the
    fixed ones), their learning rates from the restored scheduler."""
    opt = engine.optimizer.optimizer
    built = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    load_path, _ = engine.load_checkpoint(str(root), tag=tag + ckpt.UNIVERSAL_SUFFIX, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {tag}{ckpt.UNIVERSAL_SUFFIX} "
                           f"under {root}")
    for st in opt.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()
    for g, settings, lr in zip(opt.param_groups, built, engine.lr_scheduler.get_last_lr()):
        g.update(settings, lr=lr)


def trainer_states(d: Path, p: Plan, rank: int, tp: int) -> tuple[dict, list[dict]]:
    """(the trainer state this rank continues from: step, tokens, RNG of old rank `rank` mod N; the data states
    of all N old data-parallel ranks in rank order, for `load_resharded`)."""
    mine = torch.load(d / f"trainer_rank{rank % p.saved_world}.pt", weights_only=False)
    data = [torch.load(d / f"trainer_rank{r * tp}.pt", weights_only=False)["data"] for r in range(p.saved_dp)]
    return mine, data
