"""CUDA checks (skipped without a GPU; CI has none): the routed layers in bf16 on CUDA agree with the
reference path and with the fp32 CPU model, cached decoding matches a full forward, and flash-attn's
varlen kernel (when installed) agrees with SDPA."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mod_train import MoDCache, MoDConfig, modify
from mod_train.mod import attention as A

from conftest import randomize_routers, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(dtype, **kw):
    m = randomize_routers(modify(tiny_model(layers=4, hidden_size=128, intermediate_size=256,
                                            num_attention_heads=4, num_key_value_heads=2),
                                 MoDConfig(layers="odd", **kw)), std=1.5)
    return m.to("cuda", dtype)


def test_cuda_bf16_fast_equals_reference_and_cpu():
    ids = torch.randint(1, 128, (2, 256), generator=torch.Generator().manual_seed(0))
    cpu = _model(torch.float32).to("cpu")
    with torch.no_grad():
        ref_cpu = cpu(input_ids=ids, labels=ids).lm_loss
    fast = copy.deepcopy(cpu).to("cuda", torch.bfloat16)
    refm = copy.deepcopy(fast)
    refm.set_mod_config(dataclasses.replace(refm.mod_config, impl="reference"))
    ids = ids.cuda()
    with torch.no_grad():
        a = fast(input_ids=ids, labels=ids)
        b = refm(input_ids=ids, labels=ids)
    assert torch.isfinite(a.loss)
    assert abs(a.lm_loss.item() - b.lm_loss.item()) < 2e-2
    assert abs(a.lm_loss.item() - ref_cpu.item()) < 5e-2


def test_cuda_cached_decoding_equals_full_forward():
    m = _model(torch.float32)
    ids = torch.randint(1, 128, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        full = m(input_ids=ids).logits
        cache = MoDCache(m.config.num_hidden_layers)
        steps = [m(input_ids=ids[:, :16], cache=cache).logits]
        steps += [m(input_ids=ids[:, t:t + 1], cache=cache).logits for t in range(16, 64)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-4, rtol=2e-4)
    out = m.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 16)


@pytest.mark.skipif(A.flash_attn_varlen_func is None, reason="flash-attn not installed")
def test_flash_varlen_equals_sdpa():
    B, H, L, D = 2, 4, 128, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pos = torch.cat([torch.arange(50), torch.arange(78)]).cuda()[None].repeat(B, 1)
    doc = torch.cat([torch.zeros(50), torch.ones(78)]).long().cuda()[None].repeat(B, 1)
    s = A.Slots(pos, doc, None)
    flash = A._flash_varlen(q, k, v, s, D ** -0.5, None)
    mask = A.build_mask(s, s)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5).transpose(1, 2)
    torch.testing.assert_close(flash.float(), sdpa.float(), atol=2e-2, rtol=2e-2)
