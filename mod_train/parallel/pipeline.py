"""Pipeline parallelism: the MoD model as a DeepSpeed PipelineModule (ZeRO 0/1 only).

Stages are thin wrappers around the model's own per-layer API (`mod_embed`, `mod_layer`, and the final
norm + LM head), so the pipelined model computes exactly what `model.forward` computes:

    EmbedPipe:  (input_ids, position_ids, doc_ids) -> (h, position_ids, doc_ids, aux)
    LayerPipe i: rebuilds RoPE cos/sin and document slots from (position_ids, doc_ids), runs
                 mod_layer(i), adds layer i's auxiliary loss to the carried `aux`
    HeadPipe:   final norm + LM head -> (logits, doc_ids, aux); loss_fn = LM loss + aux

The auxiliary loss travels with the activations so the last stage adds it to the LM loss; the
pipeline engine scales the total by the accumulation steps like any loss. Routing statistics are
recorded on the stage that owns the layer and all-reduced after each step.
"""
from __future__ import annotations

import glob
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn


class _Stage(nn.Module):
    def __init__(self, model, stats):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: each stage registers only its part
        object.__setattr__(self, "_stats", stats)

    def meta(self, h, pos, doc):
        m = self._model
        return m.mod_embed(inputs_embeds=h, position_ids=pos, doc_ids=doc)[1]


class EmbedPipe(_Stage):
    def __init__(self, model, stats):
        super().__init__(model, stats)
        self.embed_tokens = model.model.embed_tokens

    def forward(self, inputs):
        ids, pos, doc = inputs
        h = self.embed_tokens(ids)
        return h, pos, doc, h.new_zeros(1, dtype=torch.float32)


class LayerPipe(_Stage):
    def __init__(self, model, stats, i):
        super().__init__(model, stats)
        self.i = i
        self.layer = model.model.layers[i]

    def forward(self, inputs):
        h, pos, doc, aux = inputs
        m = self._model
        meta = self.meta(h, pos, doc)
        h, term = m.mod_layer(self.i, h, meta)
        if term is not None:
            from mod_train.mod import router as R
            a = R.aux_loss([term], m.mod_config, training_topk=not m._causal_routing(meta))
            aux = aux + a.float().reshape(1)
            st = R.routing_stats([term])[self.i]
            rec = self._stats.setdefault(self.i, [0.0, 0.0, 0])
            rec[0] += float(st["rate"]); rec[1] += float(st["gate"]); rec[2] += 1
        return h, pos, doc, aux


class HeadPipe(_Stage):
    def __init__(self, model, stats):
        super().__init__(model, stats)
        self.norm = model.model.norm
        self.lm_head = model.lm_head

    def forward(self, inputs):
        h, pos, doc, aux = inputs
        return self.lm_head(self.norm(h)), doc, aux


class MoDPipelineModule:
    """Factory (the DeepSpeed class is imported lazily)."""


def build_pipeline_module(model, num_stages: int, partition: str = "uniform", act_ckpt_interval: int = 0):
    from deepspeed.pipe import PipelineModule

    if getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("pipeline parallelism with tied input/output embeddings is not supported yet "
                         "(the embedding and LM head would live on different stages); use ZeRO-3 or AutoTP")
    stats: dict = {}
    layers = [EmbedPipe(model, stats)] + [LayerPipe(model, stats, i) for i in range(model.config.num_hidden_layers)]
    layers.append(HeadPipe(model, stats))
    vocab = model.config.vocab_size
    last = {}

    def loss_fn(outputs, labels):
        logits, doc, aux = outputs
        labels = labels.clone()
        if doc is not None and doc.numel():
            labels[:, 1:][doc[:, 1:] != doc[:, :-1]] = -100  # never predict across a document boundary
        lm = model.loss_function(logits=logits, labels=labels, vocab_size=vocab)
        aux = aux.reshape(()).to(lm.dtype)
        last["lm"], last["aux"] = lm.detach(), aux.detach()
        stats.setdefault("_loss", [0.0, 0.0])
        stats["_loss"][0] += float(lm); stats["_loss"][1] += float(aux)
        return lm + aux

    class _PM(PipelineModule):
        def get_additional_losses(self):
            return None

    pm = _PM(layers=layers, num_stages=num_stages, loss_fn=loss_fn, partition_method=partition,
             activation_checkpoint_interval=act_ckpt_interval)
    # free the parameters of layers owned by other stages (every rank loaded the full model)
    local = {id(m) for m in pm.modules()}
    for lay in layers:
        if id(lay) not in local:
            for p in lay.parameters():
                p.data = torch.empty(0, dtype=p.dtype)
    pm.mod_stats = stats
    return pm


def build_pipeline_engine(trainer, ds: dict):
    """(engine, pipeline module) for `trainer` (mod_train.train.trainer.Trainer)."""
    import deepspeed
    from mod_train.train.trainer import lr_lambda, param_groups, set_trainable

    if trainer.mod_cfg is None:
        raise ValueError("pipeline training is implemented for MoD models (use ZeRO for the dense baseline)")
    from mod_train.mod.convert import from_pretrained_mod
    model = from_pretrained_mod(trainer.spec.model, trainer.mod_cfg, dtype=torch.float32)
    tc = trainer.tc
    pcfg = ds.get("pipeline", {})
    pm = build_pipeline_module(model, dsconfig_stages(ds), pcfg.get("partition", "uniform"),
                               int(pcfg.get("activation_checkpoint_interval", 0) or 0))
    trainer.n_trainable, trainer.n_params = set_trainable(pm, tc)
    groups = param_groups(pm, tc)
    trainer.group_names = [g["name"] for g in groups]
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))  # noqa: E731
    from mod_train.parallel import dsconfig
    engine, _, _, _ = deepspeed.initialize(model=pm, model_parameters=groups, lr_scheduler=sched,
                                           config=dsconfig.for_engine(ds))
    trainer.accepts_doc_ids = True
    return engine, pm


def dsconfig_stages(ds):
    from mod_train.parallel import dsconfig
    return dsconfig.pp_stages(ds)


def pipeline_step(trainer) -> dict:
    """One optimizer step through the pipeline; returns metrics (averaged over DP and micro-batches)."""
    import torch.distributed as dist
    from mod_train.train.data import collate

    tc = trainer.tc
    pm = trainer.model
    stats = pm.mod_stats
    stats.clear()

    def batches():
        for _ in range(tc.grad_accum):
            b = collate([next(trainer.stream) for _ in range(tc.micro_batch_size)])
            trainer._last_seq_len = b["input_ids"].shape[1]
            yield (b["input_ids"], b["position_ids"], b["doc_ids"]), b["labels"]

    eng = trainer.engine
    if eng.is_first_stage() or eng.is_last_stage():
        it = batches()
    else:
        it = None
        trainer._last_seq_len = trainer._last_seq_len if hasattr(trainer, "_last_seq_len") else tc.seq_len or 0
    eng.train_batch(data_iter=it)
    L = pm._model_layers if hasattr(pm, "_model_layers") else None  # noqa: F841
    n_layers = trainer.hf_cfg.num_hidden_layers
    vec = torch.zeros(2 + 3 * n_layers, dtype=torch.float64)
    if "_loss" in stats:
        vec[0], vec[1] = stats["_loss"]
    for i, (r, g, c) in ((k, v) for k, v in stats.items() if isinstance(k, int)):
        vec[2 + i], vec[2 + n_layers + i], vec[2 + 2 * n_layers + i] = r, g, c
    dist.all_reduce(vec)
    # seq len may be unknown on middle stages: take the max over ranks
    sl = torch.tensor([getattr(trainer, "_last_seq_len", 0) or 0], dtype=torch.long)
    dist.all_reduce(sl, op=dist.ReduceOp.MAX)
    trainer._last_seq_len = int(sl.item())
    n = trainer.dp * tc.grad_accum
    m = {"loss/lm": vec[0].item() / n, "loss/aux": vec[1].item() / n}
    routed = [i for i in range(n_layers) if vec[2 + 2 * n_layers + i] > 0]
    for i in routed:
        c = vec[2 + 2 * n_layers + i].item()
        m[f"routing/rate_l{i}"] = vec[2 + i].item() / c
        m[f"routing/gate_l{i}"] = vec[2 + n_layers + i].item() / c
    if routed:
        m["routing/rate_mean"] = sum(m[f"routing/rate_l{i}"] for i in routed) / len(routed)
    return m


def state_dict_from_pipeline_checkpoint(ckpt_dir) -> dict:
    """HF-named state dict from the per-layer files of a pipeline checkpoint."""
    files = sorted(glob.glob(str(Path(ckpt_dir) / "layer_*-model_states.pt")))
    idxs = sorted({int(re.search(r"layer_(\d+)", f).group(1)) for f in files})
    last = idxs[-1]
    out = OrderedDict()
    for f in files:
        idx = int(re.search(r"layer_(\d+)", f).group(1))
        sd = torch.load(f, map_location="cpu", weights_only=False)
        for k, v in sd.items():
            if idx == 0:
                out["model." + k] = v  # embed_tokens.weight
            elif idx == last:
                out[k if k.startswith("lm_head") else "model." + k] = v
            else:
                out[f"model.layers.{idx - 1}." + k.removeprefix("layer.")] = v
    return out
