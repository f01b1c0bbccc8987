"""A probe-initialised start point for adaptation: the dense model converted to MoD with each router fitted
to the token-importance probe (mod_train.fit_routers_to_importance) on the first training rows, saved as a
MoD checkpoint that the trainer starts from (it keeps a MoD checkpoint's routers). Used by the main job and
the ablation; the held-out documents stay unseen until evaluation."""
from __future__ import annotations

from pathlib import Path

import torch


def probe_start(model_path: str, mod_cfg, recipe_path: str, seq_len: int, out, rate: float | None = None,
                rows: int = 4) -> tuple[str, dict[int, float]]:
    """Fit the routers on `rows` packed training rows of `seq_len` tokens (document boundaries kept), centred
    at execution `rate` (None: at the dense init gate); save model and tokenizer to `out`. Returns the
    directory and the probe's R^2 per routed layer."""
    from transformers import AutoModelForCausalLM

    from mod_train import fit_routers_to_importance, modify
    from mod_train.data import PackedStream, load_recipe, load_tokenizer
    recipe = load_recipe(recipe_path)
    tok = load_tokenizer(recipe)
    stream = PackedStream(recipe, tok, seq_len=seq_len, split="train")
    batches = [{k: v[None] for k, v in next(stream).items() if k in ("input_ids", "position_ids")}
               for _ in range(rows)]
    model = modify(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), mod_cfg)
    r2 = fit_routers_to_importance(model, batches, rate=rate)
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), r2
