"""Building the (MoD) model so that it fits: under ZeRO-3 the weights load already partitioned
(HfDeepSpeedConfig + from_pretrained), and the routers, which the dense checkpoint lacks, are
initialised through GatheredParameters so they are never left uninitialised or saved empty."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from mod_train.parallel import dsconfig


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's logical shape, also when ZeRO-3 has partitioned it to an empty tensor."""
    return getattr(p, "ds_shape", p.shape)


@contextmanager
def gathered_for_write(params):
    """Context for writing `params` on rank 0: ZeRO-3 partitioned ones are gathered whole and, on exit,
    rank 0's values are re-partitioned to every rank; other parameters are written as they are. The
    `gather` that mod_train.mod.convert.init_routers / from_pretrained_mod take."""
    params = list(params)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
    else:
        yield


def build_model(model_path: str, mod_cfg, ds: dict, dtype=torch.float32):
    """Returns (model, keepalive). `keepalive` (the HfDeepSpeedConfig) must live as long as the model.

    mod_cfg=None builds the dense model (the baseline for benchmarks)."""
    keep = None
    if dsconfig.zero_stage(ds) == 3:
        from transformers.integrations import HfDeepSpeedConfig
        keep = HfDeepSpeedConfig(dsconfig.for_hf(ds))  # from_pretrained now yields partitioned params
    if mod_cfg is None:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    else:
        from mod_train.mod.convert import from_pretrained_mod
        # a dense checkpoint gets freshly initialised routers (gathered under ZeRO-3); a MoD checkpoint
        # (e.g. routers fitted by fit_routers_to_importance, or a trained model) keeps its own
        model = from_pretrained_mod(model_path, mod_cfg, gather=gathered_for_write, dtype=dtype)
    return model, keep


def gathered_state(model, names_filter=None) -> dict:
    """Full (gathered) copies of the selected parameters; works with and without ZeRO-3. Collective."""
    import deepspeed
    out = {}
    for n, p in model.named_parameters():
        if names_filter is not None and not names_filter(n):
            continue
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p]):
                out[n] = p.detach().clone().float().cpu()
        else:
            out[n] = p.detach().clone().float().cpu()
    return out
