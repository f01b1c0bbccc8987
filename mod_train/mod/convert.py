"""Turning an HF causal LM into a MoD model, and back from disk.

For each supported architecture there is a config subclass (`model_type = "mod_<base>"`, one extra
field `mod` holding the MoDConfig dict) and a model subclass (`MoD<Base>ForCausalLM`: the HF class
plus `MoDMixin`, plus a `router` in every routed decoder layer). Both are registered with the HF Auto
classes when `mod_train` is imported, so a saved MoD directory loads with
`AutoModelForCausalLM.from_pretrained(dir)`. Weight names are the HF ones plus
`model.layers.{i}.router.{weight,bias}`.

`modify(model, cfg)` converts a model in memory without copying weights (it switches the instance to
the MoD subclass and adds routers). `from_pretrained_mod(path, cfg)` loads a dense checkpoint straight
into the MoD class; under DeepSpeed ZeRO-3 (weights loaded already partitioned) pass a `gather` (see
`init_routers`), as mod_train.parallel.zero3.build_model does.

`save_pretrained` also writes `modeling_mod.py` (hf_remote.py) and an `auto_map` into the directory, so it
loads with `trust_remote_code=True` in a process that never imported mod_train (`write_remote_code`).

Threshold calibration, the router probe and random routers live in calibrate.py.
"""
from __future__ import annotations

import json
import math
import shutil
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterable

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama import LlamaConfig, LlamaForCausalLM
from transformers.models.mistral import MistralConfig, MistralForCausalLM
from transformers.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

from mod_train.config import MoDConfig
from mod_train.mod.model import MoDMixin
from mod_train.mod.router import Router

Gather = Callable[[Iterable[torch.nn.Parameter]], AbstractContextManager]
"""gather(params): a context in which partitioned parameters are whole and writable, re-partitioned with
the written values on exit (e.g. mod_train.parallel.zero3.gathered_for_write under ZeRO-3)."""


class UnsupportedModelError(ValueError):
    """The model's architecture has no MoD conversion."""


def _mod_init(self, config):
    super(MoDMixin, self).__init__(config)  # the HF *ForCausalLM class
    self._bind_mod_config(MoDConfig.from_dict(config.mod or {}))
    _add_routers(self, self.mod_config)


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


REMOTE_CODE_FILE = "modeling_mod.py"
"""Name of the modeling file written into every saved MoD directory (a copy of hf_remote.py)."""


def write_remote_code(directory, model_class: type) -> None:
    """Make a saved MoD directory loadable with `trust_remote_code=True` without importing mod_train first:
    copy hf_remote.py in as modeling_mod.py and point config.json's `auto_map` at its classes. A process that
    did import mod_train keeps loading through the registered Auto classes (transformers prefers local code
    when trust_remote_code is not given), so both paths build the same class."""
    d = Path(directory)
    shutil.copyfile(Path(__file__).with_name("hf_remote.py"), d / REMOTE_CODE_FILE)
    cfg_file = d / "config.json"
    config = json.loads(cfg_file.read_text())
    module = REMOTE_CODE_FILE[:-3]
    config["auto_map"] = {"AutoConfig": f"{module}.{model_class.config_class.__name__}",
                          "AutoModelForCausalLM": f"{module}.{model_class.__name__}"}
    cfg_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class _SavesRemoteCode:
    """First base of the MoD model classes: save_pretrained also writes the remote-code loader."""

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        out = super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_remote_code(save_directory, type(self))
        return out


class MoDLlamaForCausalLM(_SavesRemoteCode, MoDMixin, LlamaForCausalLM):
    config_class = MoDLlamaConfig
    __init__ = _mod_init


class MoDMistralForCausalLM(_SavesRemoteCode, MoDMixin, MistralForCausalLM):
    config_class = MoDMistralConfig
    __init__ = _mod_init


class MoDQwen2ForCausalLM(_SavesRemoteCode, MoDMixin, Qwen2ForCausalLM):
    config_class = MoDQwen2Config
    __init__ = _mod_init


class MoDQwen3ForCausalLM(_SavesRemoteCode, MoDMixin, Qwen3ForCausalLM):
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


def init_routers(model, cfg: MoDConfig | None = None, gather: Gather | None = None) -> None:
    """(Re)initialise every router per `cfg.router_init`.

    `gather(params)`: a context manager that makes partitioned router parameters whole for the write and
    re-partitions them on exit, so no rank keeps an empty shard; under DeepSpeed ZeRO-3 pass
    mod_train.parallel.zero3.gathered_for_write. Without it, partitioned (empty) routers are refused."""
    cfg = cfg or model.mod_config
    for i in model.routed_layers:
        r = model.model.layers[i].router
        if gather is not None:
            with gather([r.weight, r.bias]):
                r.reset(cfg)
        elif r.weight.numel() == 0:
            raise ValueError(f"the router of layer {i} is partitioned (empty on this rank): pass "
                             "gather=mod_train.parallel.zero3.gathered_for_write")
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
    model._bind_mod_config(cfg)
    _add_routers(model, model.mod_config)
    if hasattr(model, "generation_config") and model.generation_config is not None:
        model.generation_config.use_cache = True
    return model


ROUTER_KEYS = r"(^|\.)layers\.\d+\.router\.(weight|bias)$"
"""The router parameters' names (a regex, as transformers' `_keys_to_ignore_on_load_missing` takes them)."""


_UNSET = object()


@contextmanager
def _routers_expected_missing(cls):
    """While loading a dense checkpoint into `cls`, its routers are expected to be missing: they are left out of
    transformers' load report (via `_keys_to_ignore_on_load_missing`, read when the model is built), while
    anything else missing or unexpected is still reported. The class is restored on exit."""
    own = cls.__dict__.get("_keys_to_ignore_on_load_missing", _UNSET)
    inherited = getattr(cls, "_keys_to_ignore_on_load_missing", None) or ()
    cls._keys_to_ignore_on_load_missing = [*inherited, ROUTER_KEYS]
    try:
        yield
    finally:
        if own is _UNSET:
            del cls._keys_to_ignore_on_load_missing
        else:
            cls._keys_to_ignore_on_load_missing = own


def _layer_ranges(ix: list[int]) -> str:
    """[2, 3, 4, 7] -> '2..4, 7' (runs of consecutive layers as a..b)."""
    runs: list[list[int]] = []
    for i in ix:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _say_routers_initialised(model, cfg: MoDConfig) -> None:
    """One line (rank 0 of a distributed world) instead of transformers' MISSING rows for the new routers."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return
    b, ix = cfg.init_logit(), model.routed_layers
    print(f"[mod_train] {len(ix)} routers initialised (router_init={cfg.router_init!r}: w=0, b={b:.3g}, gate "
          f"{1 / (1 + math.exp(-b)):.3g}) in layers {_layer_ranges(ix)}: new, a dense checkpoint has none",
          flush=True)


def from_pretrained_mod(path, cfg: MoDConfig | None = None, gather: Gather | None = None, **hf_kwargs):
    """Load a checkpoint as a MoD model: a dense HF checkpoint with `cfg` (routers freshly initialised,
    through `gather` when partitioned: see `init_routers`, and said so in one line rather than as transformers'
    MISSING rows), or a saved MoD checkpoint (its own MoD settings unless `cfg` is given)."""
    config = AutoConfig.from_pretrained(path, **{k: v for k, v in hf_kwargs.items() if k in ("revision",)})
    if cfg is None:
        cfg = MoDConfig.from_dict(config.mod) if getattr(config, "mod", None) else MoDConfig()
    new_config = mod_hf_config(config, cfg)
    _, cls = _classes_for(config)
    dense = not config.model_type.startswith("mod_")
    with _routers_expected_missing(cls) if dense else nullcontext():
        model = cls.from_pretrained(path, config=new_config, **hf_kwargs)
    if dense:
        model._keys_to_ignore_on_load_missing.discard(ROUTER_KEYS)  # the instance's copy: later loads report them
        init_routers(model, cfg, gather)  # fresh routers: never left to a generic initialiser
        _say_routers_initialised(model, cfg)
    return model
