"""One optimizer step, for both engine kinds, and the one reduction of its metrics over ranks.

Each step fills a `StepSums` with this rank's sums (losses, routing rate/gate per layer, per-source loss);
`StepSums.reduce` all-reduces them in one collective and divides by the counts, so a plain engine (every
rank computes the loss) and a pipeline engine (only the last stage does) report the same averages.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mod_train.data import collate
from mod_train.train.objective import capture_hidden, combine, hidden_loss, kd_loss

MAX_SOURCES = 16


@dataclass
class StepSums:
    """This rank's sums over one optimizer step's micro-batches."""

    n_layers: int
    """Decoder layers of the model (fixes the layout of the reduced vector on every rank)."""
    lm: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    """Sum of LM losses over the micro-batches whose loss this rank computed."""
    aux: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    """Sum of auxiliary (routing) losses, same micro-batches."""
    kd: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    """Sum of distillation losses, same micro-batches (0 without a teacher)."""
    kd_hidden: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    """Sum of the hidden-state distillation terms, same micro-batches (0 when off)."""
    with_hidden: bool = False
    """Whether the hidden-state term was computed (then `loss/kd_hidden` is reported)."""
    with_kd: bool = False
    """Whether a teacher was used (then `loss/kd` is reported)."""
    n_loss: int = 0
    """Micro-batches whose loss this rank computed."""
    layers: dict = field(default_factory=dict)
    """layer -> [rate sum, mean-gate sum, micro-batches] of the routed layers this rank ran."""
    src_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(MAX_SOURCES, dtype=torch.float64))
    """Per-source sum of token losses."""
    src_cnt: torch.Tensor = field(default_factory=lambda: torch.zeros(MAX_SOURCES, dtype=torch.float64))
    """Per-source token count."""
    seq_len: int = 0
    """Row length of this step (ranks that see no batch report 0; the maximum is taken)."""

    def add_routing(self, routing: dict) -> None:
        for j, r in (routing or {}).items():
            rec = self.layers.setdefault(int(j), [0.0, 0.0, 0])
            rec[0] += float(r["rate"])
            rec[1] += float(torch.as_tensor(r["gate"]).float().mean())
            rec[2] += 1

    def reduce(self, source_names=()) -> dict:
        """Averages over every rank and micro-batch (collective)."""
        import torch.distributed as dist

        L = self.n_layers
        per_layer = torch.zeros(3 * L, dtype=torch.float64)
        for j, (r, g, c) in self.layers.items():
            per_layer[j], per_layer[L + j], per_layer[2 * L + j] = r, g, c
        vec = torch.cat([torch.stack([self.lm, self.aux]).double(), torch.tensor([float(self.n_loss)],
                         dtype=torch.float64), per_layer, self.src_loss, self.src_cnt, self.kd_hidden.double().reshape(1),
                         self.kd.double().reshape(1)])
        dev = comm_device()
        vec = vec.to(dev)
        dist.all_reduce(vec)
        vec = vec.cpu()
        sl = torch.tensor([self.seq_len], dtype=torch.long, device=dev)
        dist.all_reduce(sl, op=dist.ReduceOp.MAX)
        self.seq_len = int(sl.item())
        n = max(vec[2].item(), 1.0)
        m = {"loss/lm": vec[0].item() / n, "loss/aux": vec[1].item() / n}
        if self.with_kd:
            m["loss/kd"] = vec[-1].item() / n
        if self.with_hidden:
            m["loss/kd_hidden"] = vec[-2].item() / n
        routed = [j for j in range(L) if vec[3 + 2 * L + j] > 0]
        for j in routed:
            c = vec[3 + 2 * L + j].item()
            m[f"routing/rate_l{j}"] = vec[3 + j].item() / c
            m[f"routing/gate_l{j}"] = vec[3 + L + j].item() / c
        if routed:
            m["routing/rate_mean"] = sum(m[f"routing/rate_l{j}"] for j in routed) / len(routed)
        sl_, sc = vec[3 + 3 * L:3 + 3 * L + MAX_SOURCES], vec[3 + 3 * L + MAX_SOURCES:-2]
        names = list(source_names or [])
        for s in range(MAX_SOURCES):
            if sc[s] > 0:
                m[f"loss/source_{names[s] if s < len(names) else s}"] = (sl_[s] / sc[s]).item()
        return m


def comm_device() -> torch.device:
    """Where collective tensors must live: the GPU under NCCL, else the CPU (gloo)."""
    import torch.distributed as dist
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def plain_step(engine, stream, tc, n_layers: int, accepts_doc_ids: bool, per_source: bool,
               teacher=None) -> StepSums:
    """`tc.grad_accum` forward/backward passes and one optimizer step on a DeepSpeed engine. `teacher(kw)`
    returns the dense original's logits for the same inputs (objective 'kd' / 'lm+kd')."""
    sums = StepSums(n_layers)
    for _ in range(tc.grad_accum):
        batch = collate([next(stream) for _ in range(tc.micro_batch_size)])
        sums.seq_len = batch["input_ids"].shape[1]
        kw = {"input_ids": batch["input_ids"], "labels": batch["labels"], "position_ids": batch["position_ids"]}
        if accepts_doc_ids and "doc_ids" in batch:
            kw["doc_ids"] = batch["doc_ids"]
        kw = {k: v.to(engine.device) for k, v in kw.items()}
        t_logits, layers = None, getattr(teacher, "hidden_layers", [])
        if teacher is not None:  # before the student: a routing-off teacher is the student's own module
            with torch.no_grad(), capture_hidden(teacher.model, layers) as t_hidden:
                t_logits = teacher({k: v for k, v in kw.items() if k != "labels"})
        with capture_hidden(engine.module, layers) as s_hidden:
            out = engine(**kw)
        aux_t = out.aux_loss if isinstance(getattr(out, "aux_loss", None), torch.Tensor) else None
        aux = aux_t.detach().float() if aux_t is not None else torch.zeros(())
        kd = None
        if t_logits is not None:
            kd = kd_loss(out.logits, t_logits, kw["labels"], tc.kd_temperature, kw.get("doc_ids"))
            sums.kd += kd.detach().float().cpu()
            sums.with_kd = True
        hid = None
        if layers:
            hid = hidden_loss(s_hidden, t_hidden, kw["labels"], kw.get("doc_ids"))
            sums.kd_hidden += hid.detach().float().cpu()
            sums.with_hidden = True
        if kd is None and tc.lm_weight == 1.0:
            loss = out.loss  # LM + aux as the model returns it
        else:
            zero = out.loss.new_zeros(())
            loss = combine(tc, out.loss - (aux_t if aux_t is not None else zero), aux_t if aux_t is not None
                           else zero, kd, hid)
        engine.backward(loss)
        engine.step()
        sums.lm += out.loss.detach().float().cpu() - aux.cpu()
        sums.aux += aux.cpu()
        sums.n_loss += 1
        sums.add_routing(getattr(out, "routing", None))
        if per_source and "source_ids" in batch and getattr(out, "logits", None) is not None:
            _add_source_loss(sums, out.logits, batch)
    return sums


def _add_source_loss(sums: StepSums, logits: torch.Tensor, batch: dict) -> None:
    with torch.no_grad():
        logits = logits[:, :-1].float()
        tgt = batch["labels"][:, 1:].to(logits.device)
        tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                                ignore_index=-100, reduction="none").cpu().double()
        src = batch["source_ids"][:, 1:].reshape(-1)
        valid = ((tgt.reshape(-1).cpu() != -100) & (src >= 0) & (src < MAX_SOURCES)).double()
        src = src.clamp(0, MAX_SOURCES - 1)
        sums.src_loss.index_add_(0, src, tok * valid)
        sums.src_cnt.index_add_(0, src, valid)


def pipeline_step(engine, module, stream, tc, n_layers: int) -> StepSums:
    """One `train_batch` of a pipeline engine; the first and last stages read the batches."""
    stats = module.mod_stats
    stats.clear()
    sums = StepSums(n_layers)

    def batches():
        for _ in range(tc.grad_accum):
            b = collate([next(stream) for _ in range(tc.micro_batch_size)])
            sums.seq_len = b["input_ids"].shape[1]
            yield (b["input_ids"], b["position_ids"], b["doc_ids"]), b["labels"]

    engine.train_batch(data_iter=batches() if engine.is_first_stage() or engine.is_last_stage() else None)
    sums.lm += stats.lm
    sums.aux += stats.aux
    sums.n_loss = stats.n_loss
    sums.layers = {j: list(v) for j, v in stats.layers.items()}
    return sums
