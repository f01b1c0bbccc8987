"""Pipeline parallelism: the MoD model as a DeepSpeed PipelineModule (ZeRO 0/1 only).

Stages are thin wrappers around the model's own per-layer API (`mod_embed`, `mod_layer`, and the final
norm + LM head), so the pipelined model computes exactly what `model.forward` computes:

    EmbedPipe:  (input_ids, position_ids, doc_ids) -> (h, position_ids, doc_ids, aux)
    LayerPipe i: rebuilds RoPE cos/sin and document slots from (position_ids, doc_ids), runs
                 mod_layer(i), adds layer i's auxiliary loss to the carried `aux`
    HeadPipe:   final norm + LM head -> (logits, doc_ids, aux); loss_fn = LM loss + aux

The auxiliary loss travels with the activations so the last stage adds it to the LM loss; the
pipeline engine scales the total by the accumulation steps like any loss. Routing statistics are
recorded on the stage that owns the layer (`StageStats`); the trainer all-reduces them after each step.
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
            rec = self._stats.layers.setdefault(self.i, [0.0, 0.0, 0])
            rec[0] += float(st["rate"])
            rec[1] += float(st["gate"])
            rec[2] += 1
        return h, pos, doc, aux


class HeadPipe(_Stage):
    def __init__(self, model, stats):
        super().__init__(model, stats)
        self.norm = model.model.norm
        self.lm_head = model.lm_head

    def forward(self, inputs):
        h, pos, doc, aux = inputs
        return self.lm_head(self.norm(h)), doc, aux


class StageStats:
    """What this rank's stages saw since `clear()`: LM/aux loss sums (last stage only) and, per layer owned
    here, the sums of realised rate and mean gate over micro-batches. The trainer reduces them over ranks."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.lm, self.aux, self.n_loss = 0.0, 0.0, 0
        self.layers: dict[int, list] = {}  # layer -> [rate sum, gate sum, micro-batches]


def build_pipeline_module(model, num_stages: int, partition: str = "uniform", act_ckpt_interval: int = 0):
    """The MoD model as a DeepSpeed PipelineModule of `num_stages` stages; its `mod_stats` (StageStats)
    collects losses and routing statistics of this rank's stages."""
    from deepspeed.pipe import PipelineModule

    if getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("pipeline parallelism with tied input/output embeddings is not supported yet "
                         "(the embedding and LM head would live on different stages); use ZeRO-3 or AutoTP")
    stats = StageStats()
    layers = [EmbedPipe(model, stats)] + [LayerPipe(model, stats, i) for i in range(model.config.num_hidden_layers)]
    layers.append(HeadPipe(model, stats))
    vocab = model.config.vocab_size

    def loss_fn(outputs, labels):
        logits, doc, aux = outputs
        labels = labels.clone()
        if doc is not None and doc.numel():
            labels[:, 1:][doc[:, 1:] != doc[:, :-1]] = -100  # never predict across a document boundary
        lm = model.loss_function(logits=logits, labels=labels, vocab_size=vocab)
        aux = aux.reshape(()).to(lm.dtype)
        stats.lm += float(lm)
        stats.aux += float(aux)
        stats.n_loss += 1
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
