"""The training loop on a DeepSpeed engine: build, resume, step, log, checkpoint, stop on signals.

    result = train(RunSpec(model="path/or/id", recipe="data_recipes/x.yaml", out="runs/x",
                           ds="ds_configs/zero3.json"), TrainConfig(...), MoDConfig(...))

The engine comes from train/engine.py (plain or pipeline), one optimizer step from train/step.py, the
rate schedule from train/rate.py; cheap checks (train/preflight.py) and the run lock come first.

Losses: the model returns LM + auxiliary loss; `engine.backward` divides it by the accumulation
steps, so both terms are scaled identically under gradient accumulation.
"""
from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch

from mod_train.config import RunSpec, TrainConfig, UserError
from mod_train.data import StepRows, build_stream
from mod_train.parallel import dist as pdist
from mod_train.parallel import dsconfig
from mod_train.train import checkpoint as ckpt
from mod_train.train import elastic
from mod_train.train.engine import build_engine, build_teacher
from mod_train.train.lock import RunLock, RunLocked
from mod_train.train.logger import MetricsLogger
from mod_train.train.objective import objective_total
from mod_train.train.preflight import preflight
from mod_train.train.rate import RateController
from mod_train.train.step import pipeline_step, plain_step

__all__ = ["RunSpec", "Trainer", "train", "NonFiniteLoss"]


# -- signals ---------------------------------------------------------------------------------------

class StopFlag:
    """SIGTERM/SIGUSR1 (SLURM preemption, scancel) and SIGINT (Ctrl-C) ask for a checkpoint and a clean
    exit; a second SIGINT aborts at once (KeyboardInterrupt, no checkpoint)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def restore(self):
        """Give the signals back (a process that goes on after training, e.g. to evaluate, gets its Ctrl-C back)."""
        for s, h in self.previous.items():
            signal.signal(s, h)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            print("[mod_train] Ctrl-C: finishing this step, then checkpointing (Ctrl-C again aborts without "
                  "a checkpoint)", flush=True)
        self.signum = signum

    def agreed(self) -> int:
        """Collective: the signal number if any rank got one (ranks receive it at different times)."""
        return ckpt.agree_max(self.signum)


class NonFiniteLoss(UserError, FloatingPointError):
    """A loss term or the gradient norm became NaN/Inf; the run stopped without saving that state."""


# -- the trainer -----------------------------------------------------------------------------------

class Trainer:
    def __init__(self, spec: RunSpec, tc: TrainConfig, mod_cfg=None, after_setup=None, before_engine=None):
        tc.validate()
        self.after_setup = after_setup  # callback(trainer) after the engine exists (tests, probes)
        # callback(trainer, model) before deepspeed.initialize: the place to change parameters (ZeRO-1/2
        # keep fp32 master copies taken at initialize time; later in-place edits would be overwritten)
        self.before_engine = before_engine
        self.spec, self.tc = spec, tc
        self.mod_cfg = None if spec.dense else mod_cfg
        if not spec.dense and mod_cfg is None:
            from mod_train import MoDConfig
            self.mod_cfg = MoDConfig()
        self.out = Path(spec.out)
        self.ckpt_root = self.out / "checkpoints"
        self.rank, self.world, self.local_rank = pdist.init()
        self.stop = StopFlag()
        self.elastic = None  # train.elastic: the plan of this resume (set in setup)
        self._resume_tag = None

    # ---- setup ----
    def setup(self):
        tc = self.tc
        self.plan = preflight(self.spec, tc)  # cheap checks first: nothing below runs on a bad setting
        self._lock()
        self._seed(tc.seed)
        hf_cfg = self.plan.hf_config
        self.hf_cfg = hf_cfg
        raw_ds = dsconfig.load(self.spec.ds)
        self.elastic = self._elastic_plan(raw_ds)  # may recompute tc.grad_accum: before the batch sizes are filled
        ds = dsconfig.fill(raw_ds, tc, self.world, hidden_size=hf_cfg.hidden_size)
        if self.elastic is not None and self.elastic.universal:
            ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
        self.ds = ds
        self.tp, self.pp = dsconfig.tp_size(ds), dsconfig.pp_stages(ds)
        self.dp = self.world // (self.tp * self.pp)
        if torch.cuda.is_available():  # print the plan and refuse what cannot fit, before allocating
            from mod_train.parallel import memory
            est = memory.plan_from(hf_cfg.to_dict(), ds, tc, self.world)
            gib = torch.cuda.get_device_properties(self.local_rank).total_memory / memory.GiB
            if self.rank == 0:
                print("[mod_train] per-GPU memory estimate:\n" + est.table(gib), flush=True)
            memory.check(est, gib)
        hook = None
        if self.before_engine is not None and self.pp == 1:
            def hook(model):
                self.dp_rank = self.rank // self.tp
                self.stream = self._stream()
                self.before_engine(self, model)
        self.built = build_engine(self.spec, tc, self.mod_cfg, ds, tp=self.tp, before_engine=hook)
        self.engine, self.model = self.built.engine, self.built.model
        self.group_names = self.built.group_names
        self.n_trainable, self.n_params = self.built.n_trainable, self.built.n_params
        self.teacher = build_teacher(self.spec, tc, self.mod_cfg, ds, self.built, tp=self.tp)
        self.rate = RateController.maybe(self.model, tc)
        # data: ranks of one TP group (consecutive global ranks) read the same shard
        self.dp_rank = self.rank // self.tp if self.pp == 1 else self.engine.grid.get_data_parallel_id()
        self.stream = StepRows(self._stream())
        self.step = 0
        self.tokens = 0

    def _stream(self):
        return build_stream(self.spec.recipe, seq_len=self.tc.seq_len, seed=self.tc.seed, dp_rank=self.dp_rank,
                            dp_world_size=self.dp, vocab_size=self.hf_cfg.vocab_size, tokenizer=self.plan.tokenizer,
                            overrides=getattr(self.spec, "data", None))

    def _lock(self):
        """Global rank 0 takes the run lock on --out; every rank learns whether it got it."""
        err = None
        if self.rank == 0:
            self.lock = RunLock(self.out)
            try:
                self.lock.acquire()
            except RunLocked as e:
                err = e
        if ckpt.agree_max(err is not None):
            raise err or RunLocked(f"{self.out} is in use by another run (see rank 0's message)")

    def _unlock(self):
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None

    def _seed(self, seed):
        import random
        import numpy as np
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def fingerprint(self) -> dict:
        c = self.hf_cfg
        arch = {k: getattr(c, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                                                "num_attention_heads", "num_key_value_heads", "intermediate_size")}
        tc = self.tc
        return {
            "model": arch,
            "mod": None if self.mod_cfg is None else self.mod_cfg.to_dict(),
            "trainable": self._trainable_fingerprint(),
            "precision": tc.precision,
            "zero_stage": dsconfig.zero_stage(self.ds),
            "tensor_parallel": self.tp,
            "pipeline_stages": self.pp,
            "world_size": self.world,
            "seq_len": tc.seq_len,
            "global_batch": tc.micro_batch_size * tc.grad_accum * self.dp,
            "recipe": self.plan.recipe,
            "tokenizer": self.plan.tokenizer_id,
            "train": {k: v for k, v in tc.to_dict().items() if k in ckpt.TRAIN_FIXED},
        }

    def _trainable_fingerprint(self) -> dict:
        """What trains; under lora also the adapters' shape and scale (a resume must rebuild the same ones)."""
        tc = self.tc
        fp = {"mode": tc.trainable, "modules": sorted(tc.train_modules)}
        if tc.trainable == "lora":
            fp["lora"] = {"rank": tc.lora_rank, "alpha": tc.lora_alpha, "dropout": tc.lora_dropout,
                          "targets": sorted(tc.lora_target_modules)}
        return fp

    # ---- checkpoint ----
    def save(self):
        extra = None
        if self.tp > 1:
            def extra(ckdir):  # zero_to_fp32 cannot read TP checkpoints: keep a consolidated copy
                sd = self.engine._consolidated_16bit_state_dict()
                if self.rank == 0:
                    torch.save(sd, ckdir / "consolidated_16bit.pt")
        meta = {"step": self.step, "tokens": self.tokens, "fingerprint": self.fingerprint(),
                "train": self.tc.to_dict(), "mod": self._live_mod(), "model_path": str(self.spec.model),
                "tokenizer": self.plan.tokenizer_source, "dense": self.spec.dense,
                "changed_on_resume": getattr(self, "changed_on_resume", {}), "ds": self.ds, "time": time.time()}
        state = {"step": self.step, "tokens": self.tokens, "data": self.stream.state_dict(), "rng": ckpt.rng_state(),
                 "mod": self._live_mod()}
        path = ckpt.save(self.engine, self.ckpt_root, self.step, rank=self.rank, trainer_state=state, meta=meta,
                         keep_last=self.tc.keep_last, extra_rank0=extra, files_rank0=self._save_hf_files)
        self._event("checkpoint", step=self.step, path=str(path))
        return path

    def _save_hf_files(self, ckdir):
        """The dense model's HF config and the run's tokenizer, so export needs only the checkpoint."""
        self.hf_cfg.save_pretrained(ckdir / "hf")
        if self.plan.tokenizer is not None:
            self.plan.tokenizer.save_pretrained(ckdir / "hf")

    def _event(self, kind, **kw):
        if getattr(self, "logger", None) is not None:
            self.logger.event(kind, **kw)

    def _say(self, msg):
        if self.rank == 0:
            print(f"[mod_train] {msg}", flush=True)

    def _check_checkpoint(self, d):
        """Collective: None if every rank finds its own files of checkpoint `d` intact, else the first reason."""
        import torch.distributed as dist
        why = ckpt.check_complete(d, hashes=(self.rank, self.world))
        reasons = [None] * self.world
        dist.all_gather_object(reasons, why)
        return next((r for r in reasons if r is not None), None)

    def _elastic_plan(self, raw_ds):
        """train.elastic: the plan for the checkpoint this run resumes (elastic.plan), made before the engine
        exists, announced in one line, its universal checkpoint converted once; None without the flag or when the
        checkpoint resumes as saved."""
        if not self.tc.elastic:
            return None
        self._resume_tag = ckpt.find_resume(self.ckpt_root, check=self._check_checkpoint)
        if self._resume_tag is None:
            return None
        d = self.ckpt_root / self._resume_tag
        p = elastic.plan(d, ckpt.load_meta(d), self.tc, world=self.world, tp=dsconfig.tp_size(raw_ds),
                         pp=dsconfig.pp_stages(raw_ds))
        if p is None:
            return None
        self._say(p.line())
        self.tc.grad_accum = p.grad_accum
        if p.universal:
            elastic.convert(self.ckpt_root, p.tag, self.rank)
        return p

    def maybe_resume(self):
        tag = self._resume_tag if self.tc.elastic else ckpt.find_resume(self.ckpt_root, check=self._check_checkpoint)
        if tag is None:
            return None
        d = self.ckpt_root / tag
        meta = ckpt.load_meta(d)
        diffs = ckpt.compare_fingerprints(*self._comparable_fingerprints(meta["fingerprint"]))
        if diffs:
            hints = {"world_size": "--train.elastic true resumes on another world size",
                     "global_batch": "--train.elastic true recomputes grad_accum to keep it"}
            diffs = [f"{x} ({hints[x.split(':')[0]]})" if x.split(":")[0] in hints else x for x in diffs]
            raise ckpt.IncompatibleCheckpoint(
                f"refusing to resume from {d}: it was written by an incompatible configuration:\n  - "
                + "\n  - ".join(diffs) + "\nUse a new --out directory, or restore the settings above.")
        p = self.elastic
        if p is not None and p.universal:
            elastic.load_universal(self.engine, self.ckpt_root, tag)
        else:
            load_path, _ = self.engine.load_checkpoint(str(self.ckpt_root), tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {d}")
        if p is not None and p.reshard:
            st, data = elastic.trainer_states(d, p, self.rank, self.tp)
            self.stream.load_resharded(data)
        else:
            st = torch.load(d / f"trainer_rank{self.rank}.pt", weights_only=False)
            self.stream.load_state_dict(st["data"])
        self.step, self.tokens = st["step"], st["tokens"]
        ckpt.set_rng_state(st["rng"])
        if st.get("mod") and hasattr(self.model, "set_mod_config"):  # thresholds moved by the rate controller
            from mod_train.config import MoDConfig
            self.model.set_mod_config(MoDConfig.from_dict(st["mod"]))
        self._apply_changes(meta)
        return tag

    def _live_mod(self):
        """The model's MoD settings as they are now (the rate controller moves thresholds and the target)."""
        cfg = getattr(self.model, "mod_config", None)
        return cfg.to_dict() if cfg is not None else self.fingerprint()["mod"]

    def _comparable_fingerprints(self, saved: dict) -> tuple[dict, dict]:
        """(checkpoint's, this run's) fingerprints to compare: keys an older checkpoint did not record are
        announced and left out; an older, relative recipe path is compared resolved."""
        fp = self.fingerprint()
        unrecorded = [k for k in fp if k not in saved]
        if unrecorded:
            self._say(f"the checkpoint predates the {', '.join(unrecorded)} check(s): not verified on this resume")
        saved = dict(saved)
        if self.elastic is not None:  # the plan checked the layout and kept the global batch
            saved.pop("world_size", None)
        rec = saved.get("recipe")
        if isinstance(rec, str) and not rec.startswith("synthetic") and not os.path.isabs(rec):
            saved["recipe"] = str(Path(rec).resolve())
        return saved, {k: v for k, v in fp.items() if k in saved}

    def _apply_changes(self, meta):
        """Settings that may change on resume are applied (the lr schedule is rebuilt from this run's
        TrainConfig) and announced; meta.json records them."""
        changed = ckpt.changed_settings(meta.get("train", {}), self.tc.to_dict())
        self.changed_on_resume = {**meta.get("changed_on_resume", {}), **{f"step {self.step}": changed}} \
            if changed else meta.get("changed_on_resume", {})
        if not changed:
            return
        if {"lr", "router_lr", "min_lr_ratio", "warmup_steps", "max_steps"} & set(changed):
            self._rebuild_lr_schedule()
        self._say("resumed with changed settings (applied): "
                  + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        self._event("changed_on_resume", step=self.step, changed=changed)

    def _rebuild_lr_schedule(self):
        """The scheduler's base learning rates come from the checkpoint: replace them with this run's
        peaks and recompute the current rates (the schedule function already reads this run's tc)."""
        sched = self.engine.lr_scheduler
        peaks = {"decay": self.tc.lr, "no_decay": self.tc.lr, "router": self.tc.router_lr or self.tc.lr}
        sched.base_lrs = [peaks[n] for n in self.group_names]
        for g, base, f in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            g["initial_lr"] = base
            g["lr"] = base * f(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]

    # ---- one optimizer step ----
    def train_step(self, want_metrics: bool) -> dict:
        """One optimizer step (plain or pipeline engine); metrics averaged over ranks and micro-batches."""
        n_layers = self.hf_cfg.num_hidden_layers
        if self.built.pipeline:
            sums = pipeline_step(self.engine, self.model, self.stream, self.tc, n_layers)
        else:
            sums = plain_step(self.engine, self.stream, self.tc, n_layers, self.built.accepts_doc_ids,
                              per_source=want_metrics and self.tc.per_source_loss, teacher=self.teacher)
        m = sums.reduce(getattr(self.stream, "source_names", None))
        self._last_seq_len = sums.seq_len
        return m

    # ---- main loop ----
    def run(self) -> dict:
        """Train to max_steps. Status: completed, preempted (signal), exited (exit_after_steps) or
        data_exhausted; each ends with a complete checkpoint except exited. NonFiniteLoss is raised."""
        try:
            return self._run()
        finally:
            self._unlock()
            self.stop.restore()

    def _reads_data(self) -> bool:
        return self.pp == 1 or self.engine.is_first_stage() or self.engine.is_last_stage()

    def _data_for_step(self) -> bool:
        """Collective: take this step's rows; False on every rank if any rank's data ran out."""
        tc = self.tc
        ok = self.stream.fill(tc.micro_batch_size * tc.grad_accum) if self._reads_data() else True
        return not ckpt.agree_max(not ok)

    def _check_finite(self, m: dict) -> None:
        """Stop on a NaN/Inf loss term or gradient norm, before anything of this step is saved."""
        gn = self.engine.get_global_grad_norm()
        terms = {k: m[k] for k in ("loss/lm", "loss/aux", "loss/kd") if k in m}
        if gn is not None:
            terms["grad_norm"] = float(gn)
        bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
        if not bad:
            return
        latest = self.ckpt_root / "latest"
        kept = latest.read_text().strip() if latest.is_file() else "none"
        msg = (f"non-finite {', '.join(f'{k} = {v}' for k, v in bad.items())} at step {self.step} "
               f"({', '.join(f'{k} = {v:.6g}' for k, v in terms.items() if k not in bad)}); stopped without saving "
               f"this state; last good checkpoint: {kept}. Lower --train.lr, check the data, or use fp32")
        self._event("non_finite", step=self.step, **{k: str(v) for k, v in terms.items()})
        raise NonFiniteLoss(msg)

    def _run(self) -> dict:
        tc = self.tc
        self.setup()
        if self.after_setup is not None:
            self.after_setup(self)
        self.logger = MetricsLogger(self.out, tc, rank=self.rank, start_step=0,
                                    config={"train": tc.to_dict(), "fingerprint": self.fingerprint()})
        try:
            return self._loop()
        finally:
            self.logger.close()

    def _loop(self) -> dict:
        tc = self.tc
        resumed = self.maybe_resume()
        if resumed:
            self.logger.event("resumed", tag=resumed, step=self.step)
            self._say(f"resumed from {self.ckpt_root / resumed} at step {self.step}")
            self.logger.advance(self.step)
            if tc.max_steps < self.step:
                self._say(f"max_steps {tc.max_steps} is below the checkpoint's step {self.step}: nothing to "
                          f"train, the run stays at step {self.step}; raise --train.max_steps to continue")
        status, steps_here = "completed", 0
        while self.step < tc.max_steps:
            if not self._data_for_step():
                status = "data_exhausted"
                self._say(f"the data ran out at step {self.step} (max_steps {tc.max_steps}): every stage's token "
                          "budget or every source's passes are used up; ending with a checkpoint")
                break
            t0 = time.perf_counter()
            want = (self.step + 1) % tc.log_every == 0
            if self.rate is not None:
                self.rate.begin(self.step)
            m = self.train_step(want)
            if self.rate is not None:
                self.rate.end(self.step)
                m["routing/target"] = self.model.mod_config.target_rate
            dt = time.perf_counter() - t0
            self.step += 1
            steps_here += 1
            self._check_finite(m)
            tokens_per_step = tc.micro_batch_size * tc.grad_accum * self.dp * self._last_seq_len
            self.tokens += tokens_per_step
            if want or self.step == tc.max_steps:
                gn = self.engine.get_global_grad_norm()
                lrs = dict(zip(getattr(self, "group_names", []), self.engine.get_lr()))
                m.update({"loss": objective_total(tc, m), "lr": self.engine.get_lr()[0],
                          "grad_norm": float(gn) if gn is not None else float("nan"),
                          "tokens_per_s": tokens_per_step / dt, "step_time_s": dt, "tokens": self.tokens})
                if "router" in lrs:
                    m["lr_router"] = lrs["router"]
                    m["lr"] = next((v for k, v in lrs.items() if k != "router"), lrs["router"])
                self.logger.log(self.step, m)
            self.logger.advance()
            sig = self.stop.agreed()
            if sig:
                self.save()
                self.logger.event("preempted", step=self.step, signal=sig)
                status = "preempted"
                break
            if tc.save_every and self.step % tc.save_every == 0 and self.step < tc.max_steps:
                self.save()
            if tc.exit_after_steps and steps_here >= tc.exit_after_steps:
                status = "exited"
                break
        if status in ("completed", "data_exhausted"):
            d = self.ckpt_root / ckpt.tag_for(self.step)
            if not d.is_dir() or ckpt.check_complete(d, hashes=None):
                self.save()
        self.logger.event(status, step=self.step)
        return {"status": status, "step": self.step, "rank": self.rank}


def train(spec: RunSpec, tc: TrainConfig, mod_cfg=None, after_setup=None) -> dict:
    return Trainer(spec, tc, mod_cfg, after_setup=after_setup).run()
