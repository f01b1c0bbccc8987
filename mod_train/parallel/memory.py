"""Per-GPU memory estimate of a training plan, printed before anything is allocated, and a refusal
of plans that cannot fit.

Model states (mixed precision, AdamW): 16-bit weights (2 B/param), 16-bit gradients (2 B), fp32
master weights + Adam m + v (12 B). fp32 training: 4 + 4 + 8 B. ZeRO-1 shards the optimizer states
over data-parallel ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights; offload moves
optimizer states (and with offload_param, weights) to CPU RAM. Tensor parallel (AutoTP) and
pipeline stages divide the decoder weights. ZeRO-3 keeps a working set of gathered layers.

Activations (per micro-batch b, sequence S, hidden d, with SDPA/flash attention, no S^2 term):
about 34*b*S*d bytes per layer in 16-bit when everything is kept (Korthikanti et al. 2022), divided
by TP; with activation checkpointing, 2*b*S*d per layer (the layer input) plus one layer's full
activations. Logits + their gradient: b*S*V*(4+4) bytes (fp32 loss). Routed layers are counted as
dense (a conservative plan: converted models start close to dense).
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1024 ** 3

PRESETS = {  # architecture presets (no download needed): Llama-3 family
    "llama3-70b": dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672, vocab_size=128256,
                       num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    "llama3-8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, vocab_size=128256,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, vocab_size=49152,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}


@dataclass
class Estimate:
    params: float
    weights: float
    grads: float
    optim: float
    working_set: float
    activations: float
    logits: float
    overhead: float
    cpu_offload: float
    teacher: float = 0.0

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optim + self.working_set + self.activations + self.logits
                + self.overhead + self.teacher)

    def table(self, gpu_gib: float | None = None) -> str:
        rows = [("parameters (model)", f"{self.params / 1e9:.2f} B"),
                ("weights", _g(self.weights)), ("gradients", _g(self.grads)), ("optimizer states", _g(self.optim)),
                ("ZeRO-3 gathered working set", _g(self.working_set)), ("activations", _g(self.activations)),
                ("logits + grad (fp32)", _g(self.logits)), ("runtime overhead", _g(self.overhead))]
        if self.teacher:
            rows.append(("KD teacher (frozen copy + logits)", _g(self.teacher)))
        rows.append(("TOTAL per GPU", _g(self.total)))
        if self.cpu_offload:
            rows.append(("CPU RAM per GPU (offload)", _g(self.cpu_offload)))
        if gpu_gib:
            rows.append(("GPU memory", f"{gpu_gib:.1f} GiB"))
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"  {a:<{w}}  {b}" for a, b in rows)


def _g(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def count_params(c: dict) -> tuple[float, float, float]:
    """(total, per-layer, embedding+head) parameter counts of a Llama-family config."""
    d, f, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    h, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    hd = c.get("head_dim") or d // h
    attn = d * h * hd * 2 + d * kv * hd * 2
    layer = attn + 3 * d * f + 2 * d + (d + 1)  # + norms + router
    emb = V * d * (1 if c.get("tie_word_embeddings") else 2)
    return L * layer + emb + d, layer, emb


def count_lora_params(c: dict, rank: int, targets) -> float:
    """Adapter parameters (A [r, in] + B [out, r] per adapted projection) of a Llama-family config."""
    d, f, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    h, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    hd = c.get("head_dim") or d // h
    shapes = {"q_proj": (d, h * hd), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd), "o_proj": (h * hd, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    return L * sum(rank * sum(shapes[t]) for t in set(targets) if t in shapes)


def estimate(c: dict, *, zero_stage: int, dp: int, tp: int = 1, pp: int = 1, precision: str = "bf16",
             micro_batch: int = 1, seq_len: int = 4096, grad_ckpt: bool = True, offload_optimizer: bool = False,
             offload_param: bool = False, trainable_fraction: float = 1.0, teacher_copy: bool = False) -> Estimate:
    """Per-GPU memory of one training rank. `teacher_copy`: a frozen copy of the weights for distillation
    (partitioned like the student's under ZeRO-3, no gradients or optimizer state) plus its fp32 logits."""
    total, per_layer, emb = count_params(c)
    d, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    wb, gb, ob = (2, 2, 12) if precision in ("bf16", "fp16") else (4, 4, 8)
    local = (L * per_layer / tp + emb) / pp  # parameters this rank holds before ZeRO (AutoTP leaves embeddings whole)
    train = local * trainable_fraction
    weights = local * wb / (dp if zero_stage >= 3 else 1)
    grads = train * gb / (dp if zero_stage >= 2 else 1)
    optim = train * ob / (dp if zero_stage >= 1 else 1)
    cpu = 0.0
    if offload_optimizer:
        cpu += optim
        optim = 0.0
    if offload_param and zero_stage >= 3:
        cpu += weights
        weights = 0.0
    working = 2 * (per_layer / tp) * wb + (emb * wb / 2 if zero_stage >= 3 else 0) if zero_stage >= 3 else 0.0
    layers_here = L / pp
    act_b = 2 if precision in ("bf16", "fp16") else 4
    full_layer = 17 * act_b * micro_batch * seq_len * d / tp
    if grad_ckpt:
        acts = layers_here * act_b * micro_batch * seq_len * d + full_layer
    else:
        acts = layers_here * full_layer
    if pp > 1:
        acts *= pp  # 1F1B keeps up to `pp` micro-batches in flight on the first stage
    logits = micro_batch * seq_len * V * 8
    overhead = 2 * GiB + 0.05 * (weights + grads + optim)
    teacher = (local * wb / (dp if zero_stage >= 3 else 1) + micro_batch * seq_len * V * 4) if teacher_copy else 0.0
    return Estimate(total, weights, grads, optim, working, acts, logits, overhead, cpu, teacher)


class PlanDoesNotFit(RuntimeError):
    pass


def check(est: Estimate, gpu_gib: float, headroom: float = 0.92) -> None:
    if est.total > gpu_gib * GiB * headroom:
        biggest = max([("weights", est.weights), ("gradients", est.grads), ("optimizer states", est.optim),
                       ("activations", est.activations), ("logits", est.logits)], key=lambda x: x[1])
        raise PlanDoesNotFit(
            f"this plan needs ~{est.total / GiB:.1f} GiB per GPU but a GPU has {gpu_gib:.0f} GiB "
            f"(using at most {headroom:.0%}); the largest item is {biggest[0]} ({biggest[1] / GiB:.1f} GiB). "
            "Try ZeRO-3, CPU offload (ds_configs/zero3_offload.json), tensor parallel, more nodes, "
            "activation checkpointing (--train.grad_checkpointing true) or a shorter --train.seq_len.")


def plan_from(model_cfg: dict, ds: dict, tc, world_size: int) -> Estimate:
    from mod_train.parallel import dsconfig
    tp, pp = dsconfig.tp_size(ds), dsconfig.pp_stages(ds)
    zo = ds.get("zero_optimization", {})
    frac = 1.0
    if tc.trainable != "full":
        total, per_layer, emb = count_params(model_cfg)
        frac = max(1e-6, (model_cfg["hidden_size"] + 1) * model_cfg["num_hidden_layers"] / 2 / total)
        if tc.trainable == "routers+modules":
            frac = max(frac, 0.5)  # rough upper bound for a chosen subset
        if tc.trainable == "lora":  # gradients and optimizer state for the adapters (and routers) only
            frac += count_lora_params(model_cfg, tc.lora_rank, tc.lora_target_modules) / total
    return estimate(model_cfg, zero_stage=int(zo.get("stage", 0)), dp=world_size // (tp * pp), tp=tp, pp=pp,
                    precision=tc.precision, micro_batch=tc.micro_batch_size, seq_len=tc.seq_len or 4096,
                    grad_ckpt=tc.grad_checkpointing,
                    offload_optimizer=zo.get("offload_optimizer", {}).get("device", "none") not in (None, "none"),
                    offload_param=zo.get("offload_param", {}).get("device", "none") not in (None, "none"),
                    trainable_fraction=frac,
                    teacher_copy=getattr(tc, "uses_teacher", False) and tc.trainable not in ("routers", "lora"))
