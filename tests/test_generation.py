"""Generation with the ragged MoD KV cache: incremental decoding == full forward, cache == no cache,
batched == one by one, chunked prefill == one-shot prefill, KV bytes == bytes of the selected tokens."""
from __future__ import annotations

import pytest
import torch

from mod_train import MoDCache, MoDConfig, kv_cache_bytes, modify, random_routers

from conftest import tiny_model


def _model(routing="threshold", **kw):
    return random_routers(modify(tiny_model(layers=4), MoDConfig(routing=routing, layers="odd", **kw)), std=1.5)


def _left_padded(B=3, S=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for b in range(B):
        mask[b, : 2 * b] = 0
        ids[b, : 2 * b] = 0
    return ids, mask


@pytest.mark.parametrize("routing", ["threshold", "topk"])
def test_incremental_decoding_equals_full_forward(routing):
    m = _model(routing)
    ids, mask = _left_padded(S=24)
    with torch.no_grad():
        full = m(input_ids=ids, attention_mask=mask).logits
        cache = MoDCache(m.config.num_hidden_layers)
        steps = [m(input_ids=ids[:, :6], attention_mask=mask[:, :6], cache=cache).logits]
        for t in range(6, 24):
            steps.append(m(input_ids=ids[:, t:t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    inc = torch.cat(steps, 1)
    valid = mask.bool()
    torch.testing.assert_close(inc[valid], full[valid], atol=1e-5, rtol=1e-5)
    lengths = cache.layer_lengths()
    assert lengths[0] == [24, 24, 24]  # dense layer: every slot
    assert lengths[1] != lengths[0] and all(n <= 24 for n in lengths[1])  # routed: ragged, fewer


@pytest.mark.parametrize("routing", ["threshold", "topk"])
def test_generate_with_cache_equals_without(routing):
    m = _model(routing)
    ids, _ = _left_padded(B=1)
    a = m.generate(ids, max_new_tokens=12, do_sample=False)
    b = m.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert a.shape[1] == ids.shape[1] + 12
    assert torch.equal(a, b)


def test_batched_generation_equals_one_at_a_time():
    m = _model()
    ids, mask = _left_padded(B=3)
    batched = m.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for b in range(3):
        alone = m.generate(ids[b:b + 1, 2 * b:], max_new_tokens=10, do_sample=False)
        assert torch.equal(batched[b, 2 * b:], alone[0]), b


def test_sampling_runs_and_is_seeded():
    m = _model()
    ids, _ = _left_padded(B=1)
    torch.manual_seed(3)
    a = m.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(3)
    b = m.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8)
    assert torch.equal(a, b) and a.shape[1] == ids.shape[1] + 8


def test_chunked_prefill_equals_one_shot():
    m = _model()
    ids = torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        one = MoDCache(4)
        lo = m(input_ids=ids, cache=one).logits
        chunked = MoDCache(4)
        lc = torch.cat([m(input_ids=ids[:, s:s + 7], cache=chunked).logits for s in range(0, 30, 7)], 1)
    torch.testing.assert_close(lc, lo, atol=1e-5, rtol=1e-5)
    assert one.layer_lengths() == chunked.layer_lengths()
    for a, b in zip(one.layers, chunked.layers):
        n = int(a.length.max())
        for r in range(2):
            k = int(a.length[r])
            torch.testing.assert_close(a.k[r, :, :k], b.k[r, :, :k], atol=1e-6, rtol=1e-5)
            assert torch.equal(a.pos[r, :k], b.pos[r, :k])
        assert n == int(b.length.max())
    # and HF's own chunked prefill inside generate() gives the same tokens
    g1 = m.generate(ids[:1], max_new_tokens=6, do_sample=False)
    g2 = m.generate(ids[:1], max_new_tokens=6, do_sample=False, prefill_chunk_size=8)
    assert torch.equal(g1, g2)


def test_kv_bytes_of_routed_layer_equal_selected_tokens():
    m = _model()
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = m(input_ids=ids)
        cache = MoDCache(4)
        m(input_ids=ids, cache=cache)
    info = kv_cache_bytes(cache)
    attn = m.model.layers[0].self_attn
    per_token = 2 * m.config.num_key_value_heads * attn.head_dim * 4  # K and V, fp32
    assert info["per_layer"][0] == 2 * 40 * per_token
    for i in m.routed_layers:
        selected = round(full.routing[i]["rate"].item() * 80)
        assert 0 < selected < 80
        assert info["per_layer"][i] == selected * per_token
    assert info["total"] == sum(info["per_layer"]) < 4 * 80 * per_token


def test_generate_from_saved_model(tmp_path):
    from transformers import AutoModelForCausalLM
    m = _model()
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids, _ = _left_padded(B=1)
    assert torch.equal(m.generate(ids, max_new_tokens=6, do_sample=False),
                       loaded.generate(ids, max_new_tokens=6, do_sample=False))


def test_a_prefill_stores_k_and_v_in_one_dtype():
    """Under autocast K (RoPE'd with fp32 cos/sin) and V can come out in different dtypes: the cache stores both in
    K's, as a grown buffer does, so its byte counts are those of the tensors it holds."""
    from mod_train.mod.attention import Slots
    cache = MoDCache(1)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8).to(torch.bfloat16)
    cache.update(0, k, v, Slots(torch.arange(5)[None].expand(2, 5)), None)
    L = cache.layers[0]
    assert L.k.dtype == L.v.dtype == torch.float32
    assert cache.total_bytes() == L.k.numel() * 4 + L.v.numel() * 4
