"""The training loop on a DeepSpeed engine: build, resume, step, log, checkpoint, stop on signals.

    result = train(RunSpec(model="path/or/id", recipe="data_recipes/x.yaml", out="runs/x",
                           ds="ds_configs/zero3.json"), TrainConfig(...), MoDConfig(...))

The engine comes from train/engine.py (plain or pipeline), one optimizer step from train/step.py.
Losses: the model returns LM + auxiliary loss; `engine.backward` divides it by the accumulation
steps, so both terms are scaled identically under gradient accumulation.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from mod_train.config import RunSpec, TrainConfig
from mod_train.data import build_stream
from mod_train.parallel import dist as pdist
from mod_train.parallel import dsconfig
from mod_train.train import checkpoint as ckpt
from mod_train.train.engine import build_engine, build_teacher
from mod_train.train.logger import MetricsLogger
from mod_train.train.rate import RateController
from mod_train.train.step import pipeline_step, plain_step

__all__ = ["RunSpec", "Trainer", "train"]

# -- signals ---------------------------------------------------------------------------------------

class StopFlag:
    """SIGTERM/SIGUSR1 (SLURM preemption, scancel) ask for a checkpoint and a clean exit."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum

    def agreed(self) -> int:
        """Collective: the signal number if any rank got one (ranks receive it at different times)."""
        import torch.distributed as dist
        t = torch.tensor([self.signum], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


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

    # ---- setup ----
    def setup(self):
        from transformers import AutoConfig

        tc = self.tc
        self._seed(tc.seed)
        hf_cfg = AutoConfig.from_pretrained(self.spec.model)
        self.hf_cfg = hf_cfg
        ds = dsconfig.fill(dsconfig.load(self.spec.ds), tc, self.world, hidden_size=hf_cfg.hidden_size)
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
        self.teacher = build_teacher(self.spec, tc, self.mod_cfg, ds, self.built, tp=self.tp)
        self.rate = RateController.maybe(self.model, tc)
        self.group_names = self.built.group_names
        self.n_trainable, self.n_params = self.built.n_trainable, self.built.n_params
        # data: ranks of one TP group (consecutive global ranks) read the same shard
        self.dp_rank = self.rank // self.tp if self.pp == 1 else self.engine.grid.get_data_parallel_id()
        self.stream = self._stream()
        self.step = 0
        self.tokens = 0

    def _stream(self):
        return build_stream(self.spec.recipe, seq_len=self.tc.seq_len, seed=self.tc.seed, dp_rank=self.dp_rank,
                            dp_world_size=self.dp, vocab_size=self.hf_cfg.vocab_size,
                            overrides=getattr(self.spec, "data", None))

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
            "trainable": {"mode": tc.trainable, "modules": sorted(tc.train_modules)},
            "precision": tc.precision,
            "zero_stage": dsconfig.zero_stage(self.ds),
            "tensor_parallel": self.tp,
            "pipeline_stages": self.pp,
            "world_size": self.world,
            "seq_len": tc.seq_len,
            "global_batch": tc.micro_batch_size * tc.grad_accum * self.dp,
            "recipe": self.spec.recipe,
        }

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
                "tokenizer": str(self.spec.tokenizer or self.spec.model), "dense": self.spec.dense,
                "ds": self.ds, "time": time.time()}
        state = {"step": self.step, "tokens": self.tokens, "data": self.stream.state_dict(), "rng": ckpt.rng_state(),
                 "mod": self._live_mod()}
        path = ckpt.save(self.engine, self.ckpt_root, self.step, rank=self.rank, trainer_state=state, meta=meta,
                         keep_last=self.tc.keep_last, extra_rank0=extra)
        self.logger.event("checkpoint", step=self.step, path=str(path))
        return path

    def maybe_resume(self):
        tag = ckpt.find_resume(self.ckpt_root)
        if tag is None:
            return None
        d = self.ckpt_root / tag
        meta = ckpt.load_meta(d)
        diffs = ckpt.compare_fingerprints(meta["fingerprint"], self.fingerprint())
        if diffs:
            raise ckpt.IncompatibleCheckpoint(
                f"refusing to resume from {d}: it was written by an incompatible configuration:\n  - "
                + "\n  - ".join(diffs) + "\nUse a new --out directory, or restore the settings above.")
        load_path, _ = self.engine.load_checkpoint(str(self.ckpt_root), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {d}")
        st = torch.load(d / f"trainer_rank{self.rank}.pt", weights_only=False)
        self.step, self.tokens = st["step"], st["tokens"]
        self.stream.load_state_dict(st["data"])
        ckpt.set_rng_state(st["rng"])
        if st.get("mod") and hasattr(self.model, "set_mod_config"):  # thresholds moved by the rate controller
            from mod_train.config import MoDConfig
            self.model.set_mod_config(MoDConfig.from_dict(st["mod"]))
        return tag

    def _live_mod(self):
        """The model's MoD settings as they are now (the rate controller moves thresholds and the target)."""
        cfg = getattr(self.model, "mod_config", None)
        return cfg.to_dict() if cfg is not None else self.fingerprint()["mod"]

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
        tc = self.tc
        self.setup()
        if self.after_setup is not None:
            self.after_setup(self)
        self.logger = MetricsLogger(self.out, tc, rank=self.rank, start_step=0,
                                    config={"train": tc.to_dict(), "fingerprint": self.fingerprint()})
        resumed = self.maybe_resume()
        if resumed:
            self.logger.event("resumed", tag=resumed, step=self.step)
            if self.rank == 0:
                print(f"[mod_train] resumed from {self.ckpt_root / resumed} at step {self.step}", flush=True)
            self.logger.advance(self.step)
        status, steps_here = "completed", 0
        while self.step < tc.max_steps:
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
            tokens_per_step = tc.micro_batch_size * tc.grad_accum * self.dp * self._last_seq_len
            self.tokens += tokens_per_step
            if want or self.step == tc.max_steps:
                gn = self.engine.get_global_grad_norm()
                lrs = dict(zip(getattr(self, "group_names", []), self.engine.get_lr()))
                m.update({"loss": m["loss/lm"] + m["loss/aux"], "lr": self.engine.get_lr()[0],
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
        if status == "completed":
            if not (self.ckpt_root / ckpt.tag_for(self.step)).is_dir() or ckpt.check_complete(
                    self.ckpt_root / ckpt.tag_for(self.step)):
                self.save()
        self.logger.event(status, step=self.step)
        self.logger.close()
        return {"status": status, "step": self.step, "rank": self.rank}


def train(spec: RunSpec, tc: TrainConfig, mod_cfg=None, after_setup=None) -> dict:
    return Trainer(spec, tc, mod_cfg, after_setup=after_setup).run()
