"""Static depth pruning: the baseline a MoD conversion must beat at matched compute.

ShortGPT (arXiv 2403.03853): the block influence of decoder layer l on calibration text is
BI_l = 1 - mean_t cos(h_in_t, h_out_t) (how much the layer turns the hidden state); delete the layers of lowest
BI. It gives the same KV and latency savings as skipping those layers for every token, with no router and no
gather, so a MoD model skipping the same share of compute has to be better than it to be worth serving.

    bi = block_influence(model, batches)                      # {layer: BI}, any HF causal LM (dense or MoD)
    drop = lowest_influence(bi, n=7, keep_first=2, keep_last=2)
    prune_layers(model, drop)                                 # in place; saves and reloads as a plain HF model

`matched_layers(routed, rate)`: how many whole layers a MoD model skips, n_routed * (1 - realised rate).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def block_influence(model, batches) -> dict[int, float]:
    """BI_l = 1 - mean cos(h_in, h_out) over the valid tokens of `batches` (dicts with input_ids and optional
    attention_mask / position_ids), for every decoder layer l; the model runs as it is (a MoD model routes)."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    captured: dict[int, torch.Tensor] = {}

    def hook(i):
        def f(module, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            captured[i] = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
        return f

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            captured.clear()
            kw = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids") if k in b}
            model(**kw)
            mask = b.get("attention_mask")
            valid = torch.ones_like(b["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
            if len(captured) != len(layers):
                raise RuntimeError("block_influence: not every decoder layer ran its forward (are some layers "
                                   "called through another path?)")
            for i, cos in captured.items():
                sums[i] += cos[valid].sum()
            count += int(valid.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {i: float(1.0 - sums[i] / max(count, 1)) for i in range(len(layers))}


def lowest_influence(bi: dict[int, float], n: int, keep_first: int = 0, keep_last: int = 0) -> list[int]:
    """The `n` layers of lowest block influence, never one of the first `keep_first` / last `keep_last`."""
    L = len(bi)
    candidates = [i for i in bi if keep_first <= i < L - keep_last]
    if not 0 <= n <= len(candidates):
        raise ValueError(f"cannot delete {n} layers: {len(candidates)} of {L} are deletable "
                         f"(keep_first={keep_first}, keep_last={keep_last})")
    return sorted(sorted(candidates, key=lambda i: (bi[i], i))[:n])


def prune_layers(model, drop: list[int]):
    """Delete decoder layers `drop` in place (a plain HF causal LM); the config, the layers' cache indices and
    per-layer config lists follow, so save_pretrained / from_pretrained and generate() keep working."""
    L = model.config.num_hidden_layers
    bad = [i for i in drop if not 0 <= i < L]
    if bad or len(set(drop)) >= L:
        raise ValueError(f"prune_layers: cannot delete {sorted(drop)} from a model with {L} layers")
    keep = [i for i in range(L) if i not in set(drop)]
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    for new, layer in enumerate(model.model.layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new
    cfg = model.config
    # the original's indices of every deleted layer (also over repeated pruning): the hidden-state KD term
    # maps the teacher's layers to the student's through it
    orig = original_layers(cfg)
    cfg.pruned_layers = sorted(set(getattr(cfg, "pruned_layers", None) or []) | {orig[i] for i in drop})
    cfg.num_hidden_layers = len(keep)
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == L:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    return model


def original_layers(config) -> list[int]:
    """The original (unpruned) model's index of each decoder layer a model has now, through
    config.pruned_layers (prune_layers records it)."""
    deleted = set(getattr(config, "pruned_layers", None) or [])
    return [i for i in range(config.num_hidden_layers + len(deleted)) if i not in deleted]


def matched_layers(n_routed: int, realised_rate: float) -> int:
    """Whole layers' worth of compute a MoD model skips: round(n_routed * (1 - realised_rate))."""
    return int(round(n_routed * (1.0 - realised_rate)))


def allocate_budget(bi: dict[int, float], routed: list[int], rate: float) -> dict[int, float]:
    """One execution budget over the routed layers (their mean rate = `rate`), spent where block influence is
    highest: the least influential layers get rate 0 (skipped whole: static depth pruning), the others 1, and
    the fractional remainder goes to one partly-run layer. A MoD model started here contains static pruning,
    and can only improve on it by choosing tokens."""
    if not 0 < rate <= 1:
        raise ValueError(f"rate {rate} must lie in (0, 1]")
    skip = len(routed) * (1.0 - rate)
    full = int(skip + 1e-9)
    order = sorted(routed, key=lambda j: (bi[j], j))
    alloc = {j: 1.0 for j in routed}
    for j in order[:full]:
        alloc[j] = 0.0
    if skip - full > 1e-9:
        alloc[order[full]] = 1.0 - (skip - full)
    return alloc
