"""Turning an HF causal LM into a MoD model, and back from disk.

For each supported architecture there is a config subclass (`model_type = "mod_<base>"`, one extra
field `mod` holding the MoDConfig dict) and a model subclass (`MoD<Base>ForCausalLM`: the HF class
plus `MoDMixin`, plus a `router` in every routed decoder layer). Both are registered with the HF Auto
classes when `mod_train` is imported, so a saved MoD directory loads with
`AutoModelForCausalLM.from_pretrained(dir)`. Weight names are the HF ones plus
`model.layers.{i}.router.{weight,bias}`.

`modify(model, cfg)` converts a model in memory without copying weights (it switches the instance to
the MoD subclass and adds routers). `from_pretrained_mod(path, cfg)` loads a dense checkpoint straight
into the MoD class; use it under DeepSpeed ZeRO-3 so the weights load already partitioned.
"""
from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama import LlamaConfig, LlamaForCausalLM
from transformers.models.mistral import MistralConfig, MistralForCausalLM
from transformers.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

from mod_train.config import MoDConfig
from mod_train.mod.model import MoDMixin
from mod_train.mod.router import Router, logit, rate_quantile


class UnsupportedModelError(ValueError):
    """The model's architecture has no MoD conversion."""


def _mod_init(self, config):
    super(MoDMixin, self).__init__(config)  # the HF *ForCausalLM class
    _add_routers(self, MoDConfig.from_dict(config.mod or {}))


@strict
class MoDLlamaConfig(LlamaConfig):
    model_type = "mod_llama"
    mod: dict | None = None


@strict
class MoDMistralConfig(MistralConfig):
    model_type = "mod_mistral"
    mod: dict | None = None


@strict
class MoDQwen2Config(Qwen2Config):
    model_type = "mod_qwen2"
    mod: dict | None = None


@strict
class MoDQwen3Config(Qwen3Config):
    model_type = "mod_qwen3"
    mod: dict | None = None


class MoDLlamaForCausalLM(MoDMixin, LlamaForCausalLM):
    config_class = MoDLlamaConfig
    __init__ = _mod_init


class MoDMistralForCausalLM(MoDMixin, MistralForCausalLM):
    config_class = MoDMistralConfig
    __init__ = _mod_init


class MoDQwen2ForCausalLM(MoDMixin, Qwen2ForCausalLM):
    config_class = MoDQwen2Config
    __init__ = _mod_init


class MoDQwen3ForCausalLM(MoDMixin, Qwen3ForCausalLM):
    config_class = MoDQwen3Config
    __init__ = _mod_init


# base model_type -> (MoD config class, MoD model class)
SUPPORTED = {
    "llama": (MoDLlamaConfig, MoDLlamaForCausalLM),
    "mistral": (MoDMistralConfig, MoDMistralForCausalLM),
    "qwen2": (MoDQwen2Config, MoDQwen2ForCausalLM),
    "qwen3": (MoDQwen3Config, MoDQwen3ForCausalLM),
}


def register_auto_classes() -> None:
    for cfg_cls, model_cls in SUPPORTED.values():
        try:
            AutoConfig.register(cfg_cls.model_type, cfg_cls)
            AutoModelForCausalLM.register(cfg_cls, model_cls)
        except ValueError:  # already registered (re-import)
            pass


def _classes_for(config):
    mt = config.model_type
    if mt.startswith("mod_") and mt[4:] in SUPPORTED:
        return SUPPORTED[mt[4:]]
    if mt not in SUPPORTED:
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported by MoDification; supported: {', '.join(sorted(SUPPORTED))} "
            "(Llama-family decoders). Convert one of those, or add the architecture in mod_train/mod/convert.py.")
    return SUPPORTED[mt]


def mod_hf_config(config, cfg: MoDConfig):
    """The MoD config of a dense HF config (or of an already MoD one, with new MoD settings)."""
    cfg_cls, _ = _classes_for(config)
    cfg.validate(config.num_hidden_layers)
    d = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "mod"):
        d.pop(key, None)
    new = cfg_cls(**d, mod=cfg.to_dict())
    new.architectures = [SUPPORTED[cfg_cls.model_type[4:]][1].__name__]
    new._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    return new


def _add_routers(model, cfg: MoDConfig) -> None:
    routed = set(cfg.routed_layers(model.config.num_hidden_layers))
    for i, layer in enumerate(model.model.layers):
        if i in routed and not hasattr(layer, "router"):
            dev = layer.input_layernorm.weight.device
            router = Router(model.config.hidden_size)
            if dev.type != "meta" and router.weight.device != dev:
                router = router.to(dev)
            router.reset(cfg)
            layer.router = router


def init_routers(model, cfg: MoDConfig | None = None) -> None:
    """(Re)initialise every router per `cfg.router_init`. Under ZeRO-3 the partitioned router
    parameters are gathered, written on rank 0 and re-partitioned, so no rank keeps an empty shard."""
    cfg = cfg or model.mod_config
    for i in model.routed_layers:
        r = model.model.layers[i].router
        params = [r.weight, r.bias]
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                r.reset(cfg)
        else:
            r.reset(cfg)


def modify(model, cfg: MoDConfig | None = None):
    """Convert an HF causal LM (Llama, Mistral, Qwen2, Qwen3) into a MoD model, in place.

    The weights are shared, not copied; routers are added to the routed layers and initialised per
    `cfg.router_init`. Returns the model (now an instance of the MoD subclass)."""
    cfg = cfg or MoDConfig()
    if isinstance(model, MoDMixin):
        raise ValueError("model is already a MoD model; change settings with model.set_mod_config(cfg)")
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a decoder-only *ForCausalLM model; "
                                    f"supported model types: {', '.join(sorted(SUPPORTED))}")
    new_config = mod_hf_config(model.config, cfg)
    _, cls = _classes_for(model.config)
    old_config = model.config
    for m in model.modules():
        if getattr(m, "config", None) is old_config:
            m.config = new_config
    model.__class__ = cls
    _add_routers(model, cfg)
    if hasattr(model, "generation_config") and model.generation_config is not None:
        model.generation_config.use_cache = True
    return model


def from_pretrained_mod(path, cfg: MoDConfig | None = None, **hf_kwargs):
    """Load a checkpoint as a MoD model: a dense HF checkpoint with `cfg` (routers freshly initialised),
    or a saved MoD checkpoint (its own MoD settings unless `cfg` is given)."""
    config = AutoConfig.from_pretrained(path, **{k: v for k, v in hf_kwargs.items() if k in ("revision",)})
    if cfg is None:
        cfg = MoDConfig.from_dict(config.mod) if getattr(config, "mod", None) else MoDConfig()
    new_config = mod_hf_config(config, cfg)
    _, cls = _classes_for(config)
    model = cls.from_pretrained(path, config=new_config, **hf_kwargs)
    if not config.model_type.startswith("mod_"):
        init_routers(model, cfg)  # fresh routers: never left to a generic initialiser
    return model


@torch.no_grad()
def calibrate_thresholds(model, batches, target_rate: float, layers: list[int] | None = None) -> dict[int, float]:
    """Post-hoc calibration: per routed layer, the threshold p_j that makes the layer run `target_rate`
    of the valid tokens of the held-out `batches` (dicts with input_ids and optional attention_mask).

    Layers are calibrated in order in a single pass: layer j's gates are measured on hidden states
    produced with layers < j already at their calibrated thresholds. Writes `layer_thresholds` into the
    model's MoD config (threshold routing) and returns it."""
    if not (0.0 < target_rate <= 1.0):
        raise ValueError(f"target_rate {target_rate} must lie in (0, 1]")
    cfg = model.mod_config
    if cfg.routing != "threshold":
        raise ValueError("post-hoc calibration applies to threshold routing; for top-k set capacity instead")
    was_training = model.training
    model.eval()
    batches = list(batches)
    states = [model.mod_embed(b["input_ids"], b.get("attention_mask"), b.get("position_ids")) for b in batches]
    hs = [s[0] for s in states]
    metas = [s[1] for s in states]
    thresholds = dict(cfg.layer_thresholds)
    for i in range(model.config.num_hidden_layers):
        layer = model.model.layers[i]
        if hasattr(layer, "router") and (layers is None or i in layers):
            logits = []
            for h, meta in zip(hs, metas):
                z = layer.router(layer.input_layernorm(h) if cfg.router_input == "norm" else h)
                logits.append(z[meta.slots.valid] if meta.slots.valid is not None else z.reshape(-1))
            z = torch.cat(logits).double()
            # the (1 - target) quantile of the logits (not of the gates, which saturate in fp32), as p in
            # float64; selection compares logits, so p this close to 0 or 1 keeps its meaning
            q = rate_quantile(z, target_rate)
            thresholds[i] = min(max(1.0 / (1.0 + math.exp(-q)), 1e-15), 1 - 1e-15)
            cfg = MoDConfig.from_dict({**cfg.to_dict(), "layer_thresholds": thresholds})
            model.set_mod_config(cfg)
        hs = [model.mod_layer(i, h, meta)[0] for h, meta in zip(hs, metas)]
    model.train(was_training)
    return thresholds


@torch.no_grad()
def fit_routers_to_importance(model, batches, ridge: float = 1e-3, rate: float | None = None) -> dict[int, float]:
    """Data-driven router initialisation (ours; the paper leaves router init open).

    For each routed layer, in order, the router becomes a ridge-regression probe of how much the layer
    changes each token: y = log(||f(h)|| / ||h||), f = the layer's full (unrouted) update. Tokens the layer
    barely changes get low gates, so a threshold skips them first. The probe output is standardised and
    centred on the configured init logit, so at p = 0.5 nearly every token still runs and the model starts
    close to the original; training and `calibrate_thresholds` then set the rate.

    `rate`: start at this execution rate instead: each probe is centred so that its (1 - rate) quantile on
    these tokens sits at the layer's threshold (layers in order, each measured on hidden states routed by
    the layers before it). Training then begins at the target rate and spends its steps adapting the model
    to the skipping rather than moving router biases (Adam moves a bias by about lr per step: 30 steps at
    1e-3 move it by 0.03, while dense-init gates sit at logit 2.9, far above a p = 0.5 threshold).
    Returns the probe's R^2 per layer. `batches`: dicts with input_ids (optional attention_mask, and
    position_ids restarting at 0 at each packed document)."""
    if rate is not None and not (0.0 < rate <= 1.0):
        raise ValueError(f"rate {rate} must lie in (0, 1]")
    from mod_train.mod.layer import dense_layer
    cfg = model.mod_config
    was_training = model.training
    model.eval()
    states = [model.mod_embed(b["input_ids"], b.get("attention_mask"), b.get("position_ids")) for b in batches]
    hs, metas = [s[0] for s in states], [s[1] for s in states]
    fit = {}
    for i in range(model.config.num_hidden_layers):
        layer = model.model.layers[i]
        if hasattr(layer, "router"):
            xs, ys = [], []
            for h, meta in zip(hs, metas):
                upd = dense_layer(layer, i, h, meta, model.config) - h
                y = torch.log(upd.float().norm(dim=-1) / h.float().norm(dim=-1).clamp(min=1e-6))
                x = layer.input_layernorm(h) if cfg.router_input == "norm" else h
                keep = meta.slots.valid if meta.slots.valid is not None else torch.ones_like(y, dtype=torch.bool)
                xs.append(x.float()[keep].double())
                ys.append(y[keep].double())
            X, y = torch.cat(xs), torch.cat(ys)
            mx, my = X.mean(0), y.mean()
            Xc, yc = X - mx, y - my
            A = Xc.T @ Xc + ridge * Xc.pow(2).sum() / X.shape[1] * torch.eye(X.shape[1], dtype=X.dtype)
            w = torch.linalg.solve(A, Xc.T @ yc)
            pred = Xc @ w
            fit[i] = float(1 - (yc - pred).pow(2).sum() / yc.pow(2).sum().clamp(min=1e-12))
            scale = 1.0 / pred.std().clamp(min=1e-6)
            r = layer.router
            r.weight.copy_((w * scale).to(r.weight.dtype)[None])
            if rate is None:
                r.bias.fill_(float(cfg.init_logit() - (mx @ w) * scale))
            else:  # standardised probe output, its (1 - rate) quantile moved onto logit(p_j)
                q = rate_quantile((pred * scale).float(), rate)
                r.bias.fill_(float(logit(cfg.threshold_for(i)) - q - (mx @ w) * scale))
        hs = [model.mod_layer(i, h, meta)[0] for h, meta in zip(hs, metas)]
    model.train(was_training)
    return fit
