"""The real SmolLM2-135M (offline, converted once and cached): MoDification before any training keeps
the original loss, and no routing/dtype/batch/length setting produces NaN or inf."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mod_train import MoDConfig, modify

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense_losses(smollm2_dir, real_text_ids):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = real_text_ids[:, :1024]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    return model, ids, loss


def test_dense_init_keeps_original_loss(dense_losses):
    model, ids, dense = dense_losses
    assert 0.5 < dense < 4.0  # a real pretrained model on real code
    mod = modify(model, MoDConfig(routing="threshold", router_init="dense"))
    with torch.no_grad():
        out = mod(input_ids=ids, labels=ids)
    assert abs(out.lm_loss.item() - dense) / dense < 0.01, (out.lm_loss.item(), dense)
    assert all(v["rate"].item() == 1.0 for v in out.routing.values())
    assert len(out.routing) == 15  # odd layers of 30


@pytest.mark.parametrize("routing", ["threshold", "topk"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch, length", [(1, 2048), (4, 1024)])
def test_no_nan_in_any_setting(smollm2_dir, real_text_ids, routing, dtype, batch, length):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=getattr(torch, dtype))
    mod = modify(model, MoDConfig(routing=routing, router_init="dense", capacity=0.125))
    mod.train()  # top-k selects by top-k in training mode
    need = batch * length
    ids = real_text_ids[0, :need]
    ids = torch.cat([ids, real_text_ids[0, : need - ids.numel()]]).view(batch, length)
    with torch.no_grad():
        out = mod(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits.float()).all()
    if routing == "threshold":  # dense init: every token runs, the original model's quality
        assert out.lm_loss.item() < 4.0
    rates = [v["rate"].item() for v in out.routing.values()]
    assert rates == [1.0] * 15 if routing == "threshold" else all(abs(r - 0.125) < 0.01 for r in rates)
