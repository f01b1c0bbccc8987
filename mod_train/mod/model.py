"""The MoD decoder stack, as a mixin over an HF `*ForCausalLM` class.

`MoDMixin.forward` = `mod_embed` -> `mod_layer` for every layer -> `mod_head`; the three pieces are
public so pipeline stages can run contiguous slices of the stack.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, replace

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from mod_train.config import MoDConfig
from mod_train.mod import router as R
from mod_train.mod.attention import Slots
from mod_train.mod.cache import MoDCache
from mod_train.mod.graphs import static_decode_applies, static_decoder
from mod_train.mod.layer import StepMeta, dense_layer, routed_layer_fast, routed_layer_reference, router_input


@dataclass
class MoDCausalLMOutput(CausalLMOutputWithPast):
    """HF causal-LM output plus MoD terms. `loss` = LM loss + `aux_loss` (computed with labels or gradients; zero in
    an inference forward without labels)."""

    aux_loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    routing: dict | None = None


def docs_from_positions(pos: torch.Tensor) -> torch.Tensor | None:
    """Packed rows mark documents by position ids restarting; returns doc ids or None (one document)."""
    restart = torch.zeros_like(pos, dtype=torch.bool)
    restart[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(restart.any()):
        return None
    return restart.long().cumsum(1)


def _distributed() -> bool:
    """More than one rank: every rank must call every sub-module (collectives inside ZeRO-3/TP hooks)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


class MoDMixin:
    """Adds MoD routing to an HF causal LM whose decoder layers are Llama-shaped.

    The model holds its MoD settings as a typed `MoDConfig` (`mod_config`); the HF config's `mod` field
    (the dict saved in config.json) is written from it by `_bind_mod_config` only. Change the settings with
    `set_mod_config(cfg)`, never by assigning `config.mod`."""

    _mod_cfg: MoDConfig | None = None
    _mod_dict: dict | None = None  # the dict written to config.mod, to catch a direct assignment

    # -- configuration -----------------------------------------------------------------------------
    @property
    def mod_config(self) -> MoDConfig:
        if self.config.mod is not self._mod_dict:
            raise RuntimeError("model.config.mod was assigned directly; change MoD settings with "
                               "model.set_mod_config(cfg), e.g. dataclasses.replace(model.mod_config, ...)")
        return self._mod_cfg

    def set_mod_config(self, cfg: MoDConfig) -> None:
        cfg.validate(self.config.num_hidden_layers)
        if cfg.routed_layers(self.config.num_hidden_layers) != self.routed_layers:
            raise ValueError("changing the routed layers of a built model is not supported; call modify() "
                             "on the dense model instead")
        self._bind_mod_config(cfg)

    def _bind_mod_config(self, cfg: MoDConfig) -> None:
        """The one writer of the MoD settings: a private copy (later edits of `cfg` do not reach the model)
        and the HF config's `mod` dict written from it."""
        self._mod_cfg = replace(cfg)
        self._mod_dict = self._mod_cfg.to_dict()
        self.config.mod = self._mod_dict

    _routing_off: bool = False
    _taps: tuple | None = None

    @contextlib.contextmanager
    def hidden_taps(self, layers):
        """Inside this block each forward records the hidden states after decoder layers `layers` (every
        token, skipped ones included) into the yielded dict {layer: [B, S, H]}; the hidden-state KD term."""
        store: dict[int, torch.Tensor] = {}
        before, self._taps = self._taps, (frozenset(layers), store)
        try:
            yield store
        finally:
            self._taps = before

    @contextlib.contextmanager
    def routing_disabled(self):
        """Inside this block every layer runs as the dense original for every token (no router, no gate): the
        distillation teacher is the student's own weights with routing off. The KV cache, if any, is dense."""
        before, self._routing_off = self._routing_off, True
        try:
            yield self
        finally:
            self._routing_off = before

    @property
    def routed_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.model.layers) if hasattr(layer, "router")]

    def _init_weights(self, module):
        if isinstance(module, R.Router):
            module.reset(self.mod_config)
        else:
            super()._init_weights(module)

    # -- the stack -------------------------------------------------------------------------------------
    def mod_embed(self, input_ids=None, attention_mask=None, position_ids=None, doc_ids=None, inputs_embeds=None,
                  cache=None) -> tuple[torch.Tensor, StepMeta]:
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = h.shape[:2]
        valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("MoD models take a 2-D attention_mask [batch, seq] (1 = token, 0 = padding)")
            am = attention_mask.bool()
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -S:]
            am = am[:, -S:]
            if cache is not None and cache.seen > 0:  # decoding takes the mask as it is: no host sync per token
                valid = am
            else:
                valid = None if bool(am.all()) else am
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + S, device=h.device)[None].expand(B, S)
        position_ids = position_ids.expand(B, S)
        if doc_ids is not None:
            doc = doc_ids if bool((doc_ids != doc_ids[:, :1]).any()) else None
        else:
            doc = docs_from_positions(position_ids) if cache is None else None
        if doc is not None and cache is not None:
            raise ValueError("packed documents (doc_ids or restarting position_ids) cannot be used with a KV cache")
        cos, sin = self.model.rotary_emb(h, position_ids)
        return h, StepMeta(Slots(position_ids, doc, valid), cos, sin, cache)

    def _causal_routing(self, meta: StepMeta) -> bool:
        cfg = self.mod_config
        return cfg.routing == "threshold" or meta.cache is not None or (not self.training and cfg.topk_causal_eval)

    def mod_layer(self, i: int, h: torch.Tensor, meta: StepMeta) -> tuple[torch.Tensor, R.RouteTerms | None]:
        """Run decoder layer i. Routing decisions are made here, outside activation checkpointing, so a
        recomputation reuses exactly the same selection."""
        layer = self.model.layers[i]
        ckpt = getattr(self.model, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled()
        if not hasattr(layer, "router") or self._routing_off:
            if ckpt:
                return checkpoint(dense_layer, layer, i, h, meta, self.config, use_reentrant=False), None
            return dense_layer(layer, i, h, meta, self.config), None
        cfg = self.mod_config
        x = router_input(layer, h, cfg.router_input)
        z = layer.router(x)
        # the aux losses read a second evaluation on the detached input (a d-dim dot product per token)
        z_aux = layer.router(x.detach()) if torch.is_grad_enabled() and x.requires_grad else None
        causal = self._causal_routing(meta)
        s, history = meta.slots, None
        if meta.cache is not None and cfg.held_rate(i) is not None:  # decode: earlier logits set the threshold
            history = meta.cache.route_history(i)
            meta.cache.push_route_history(i, z, s.valid, cfg.rate_window)
        sel, p = R.select(z, s.valid, cfg, i, causal, s.pos, s.doc, history)
        w = R.block_weight(z, cfg)
        keep = cfg.skipped_kv == "keep" and not (cfg.routing == "threshold" and cfg.is_off(i))
        if cfg.impl == "reference":
            fn, args = routed_layer_reference, (layer, i, h, meta, sel, w, cfg.gate_mode, self.config, keep)
        else:
            fn, args = routed_layer_fast, (layer, i, h, meta, sel, w, cfg.gate_mode, self.config, _distributed(),
                                           keep)
        h = checkpoint(fn, *args, use_reentrant=False) if ckpt else fn(*args)
        return h, R.RouteTerms(i, z, sel, meta.slots.valid, p, z_aux)

    def mod_stack(self, h: torch.Tensor, meta: StepMeta) -> tuple[torch.Tensor, list[R.RouteTerms]]:
        """All decoder layers; returns the last hidden states (before the final norm) and the routed
        layers' terms."""
        terms = []
        for i in range(self.config.num_hidden_layers):
            h, t = self.mod_layer(i, h, meta)
            if self._taps is not None and i in self._taps[0]:
                self._taps[1][i] = h
            if t is not None:
                terms.append(t)
        return h, terms

    def mod_head(self, h: torch.Tensor, labels=None, meta: StepMeta | None = None, logits_to_keep=0):
        """Final norm + LM head; LM loss where labels are given. Padding and the first token of each
        packed document are never predicted (no loss across a document boundary)."""
        h = self.model.norm(h)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            if meta is not None:
                labels = labels.clone()
                if meta.slots.valid is not None:
                    labels[~meta.slots.valid] = -100
                if meta.slots.doc is not None:
                    labels[:, 1:][meta.slots.doc[:, 1:] != meta.slots.doc[:, :-1]] = -100
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return logits, loss

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, doc_ids=None, past_key_values=None,
                **kwargs) -> MoDCausalLMOutput:
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, MoDCache):
            raise TypeError(f"MoD models need a MoDCache (got {type(cache).__name__}); let generate() create "
                            "it or pass mod_train.MoDCache(model.config.num_hidden_layers)")
        if use_cache and cache is None:
            cache = MoDCache(self.config.num_hidden_layers)
        if static_decode_applies(self, cache, input_ids, inputs_embeds, labels, doc_ids) and not _distributed():
            logits, routing = static_decoder(self, cache).step(input_ids, attention_mask, position_ids)
            return MoDCausalLMOutput(logits=logits, cache=cache, aux_loss=torch.zeros((), device=logits.device),
                                     routing=routing)
        if cache is not None and cache.static is not None:
            cache.static.stale = True  # an eager call writes the cache: the static step re-reads it (or is remade)
        h, meta = self.mod_embed(input_ids, attention_mask, position_ids, doc_ids, inputs_embeds, cache)
        h, terms = self.mod_stack(h, meta)
        if cache is not None:
            cache.seen += h.shape[1]
        logits, lm_loss = self.mod_head(h, labels, meta, logits_to_keep)
        cfg = self.mod_config
        if labels is not None or torch.is_grad_enabled():
            aux = R.aux_loss(terms, cfg, training_topk=not self._causal_routing(meta)).to(h.device)
        else:  # inference without labels (prefill, generation): no loss to add it to, and ~6 kernels per routed layer
            aux = torch.zeros((), device=h.device)
        loss = None if lm_loss is None else lm_loss + aux.to(lm_loss.dtype)
        return MoDCausalLMOutput(loss=loss, logits=logits, cache=cache, aux_loss=aux, lm_loss=lm_loss,
                                 routing=R.routing_stats(terms))

    # -- generation ----------------------------------------------------------------------------------
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        max_length = kwargs.get("max_cache_length", args[-1] if args and isinstance(args[-1], int) else None)
        if model_kwargs.get("cache") is not None:
            cache = model_kwargs["cache"]
            cache._is_user_defined = True  # a fresh one, or one emptied by MoDCache.reset() for this request
            if cache.seen == 0:  # this request's length (a reset cache's buffers keep their size regardless)
                cache.max_length = max_length or cache.max_length
            else:  # continuing the cached tokens: up to the longer of the two
                cache.max_length = max(cache.max_length or 0, max_length or 0) or None
            return
        if generation_config.use_cache is False:
            return
        model_kwargs["cache"] = MoDCache(self.config.num_hidden_layers, max_length=max_length)
