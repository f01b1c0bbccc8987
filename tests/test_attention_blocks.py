"""Attention in blocks of queries (mod/attention._blocked): above MASK_ELEMS mask elements no whole boolean mask is
built; each block of queries attends to the keys up to its last visible one. Checked against the whole-mask call
(the hand-built rule of `build_mask`) for self-attention with padding, packed documents and a window, for a 'keep'
layer's selected queries over every token, for queries over a ragged cache, with gradients, and through the
model (prefill and generation) with the limit forced low."""
from __future__ import annotations

import pytest
import torch

from mod_train import MoDCache, MoDConfig, modify, random_routers
from mod_train.mod import attention as A

from conftest import tiny_model

D = 8


def _qkv(B, H, Lq, Lk, Hkv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv or H, Lk, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv or H, Lk, D, generator=g, requires_grad=True)
    return q, k, v


def _whole(q, k, v, qs, ks, window=None):
    mask = A.build_mask(qs, ks, window)
    gqa = q.shape[1] != k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5, enable_gqa=gqa)
    return out.transpose(1, 2)


@pytest.fixture
def small_limit(monkeypatch):
    """A limit of 64 mask elements and blocks of 4 queries: every call below is blocked; records the masks built."""
    shapes = []
    build = A.build_mask

    def recording(qs, ks, window=None):
        m = build(qs, ks, window)
        shapes.append(tuple(m.shape))
        return m

    monkeypatch.setattr(A, "MASK_ELEMS", 64)
    monkeypatch.setattr(A, "MIN_BLOCK", 4)
    monkeypatch.setattr(A, "build_mask", recording)
    return shapes


def _check(q, k, v, qs, ks, self_attention, window=None, shapes=None):
    """Blocked == whole on valid queries, outputs and gradients."""
    shapes.clear()
    out = A.attend(q, k, v, qs, ks, D ** -0.5, self_attention, window)
    assert shapes, "the blocked path built no mask: it was not taken"
    assert len(shapes) > 1 and max(s[2] for s in shapes) <= 4, shapes
    assert min(s[3] for s in shapes) < k.shape[2], shapes  # early blocks take fewer keys
    ok = qs.valid if qs.valid is not None else torch.ones_like(qs.pos, dtype=torch.bool)
    seen = A.build_mask(qs, ks, window)[:, 0].any(-1) & ok  # queries with a visible key: exact
    shapes.clear()
    ref = _whole(q, k, v, qs, ks, window)
    torch.testing.assert_close(out[seen], ref[seen], atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref)
    g1 = torch.autograd.grad((out[seen] * w[seen]).sum(), (q, k, v))
    g2 = torch.autograd.grad((ref[seen] * w[seen]).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_self_attention_with_padding_documents_and_window(small_limit):
    B, H, L = 2, 4, 24
    q, k, v = _qkv(B, H, L, L, Hkv=2)
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None].repeat(B, 1)
    doc = torch.cat([torch.zeros(10), torch.ones(14)]).long()[None].repeat(B, 1)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :5] = False
    pos[1, :5] = 0
    s = A.Slots(pos, doc, valid)
    _check(q, k, v, s, s, True, shapes=small_limit)
    _check(q, k, v, s, s, True, window=4, shapes=small_limit)
    from test_decode_syncs import count_syncs  # self-attention: the blocks' keys are known on the host
    assert count_syncs(lambda: A.attend(q, k, v, s, s, D ** -0.5, True)) == 0


def test_keep_layer_queries_over_every_token(small_limit):
    """A 'keep' layer at batch 1: the selected tokens' queries (a sorted subset of positions) over every token."""
    L = 40
    g = torch.Generator().manual_seed(1)
    sel = torch.sort(torch.randperm(L, generator=g)[:15]).values
    sel[0] = 0  # the sink
    q, k, v = _qkv(1, 2, len(sel), L)
    ks = A.Slots(torch.arange(L)[None])
    qs = A.Slots(sel[None])
    _check(q, k, v, qs, ks, False, shapes=small_limit)
    from test_decode_syncs import count_syncs  # every block's keys read in one sync
    assert count_syncs(lambda: A.attend(q, k, v, qs, ks, D ** -0.5, False)) == 1


def test_queries_over_a_ragged_cache(small_limit):
    """Rows of different stored lengths (trailing slots invalid, position 0) and left padding, new queries after."""
    B, Lk, Lq = 3, 30, 12
    q, k, v = _qkv(B, 2, Lq, Lk, seed=2)
    kpos = torch.arange(Lk)[None].repeat(B, 1)
    kvalid = torch.ones(B, Lk, dtype=torch.bool)
    kvalid[1, 20:] = False
    kpos[1, 20:] = 0
    kvalid[2, :3] = False
    qpos = torch.stack([torch.arange(18, 30), torch.arange(8, 20), torch.arange(18, 30)])
    kvalid[0, 18:] = True
    ks = A.Slots(kpos, None, kvalid)
    qs = A.Slots(qpos, None, torch.ones(B, Lq, dtype=torch.bool))
    _check(q, k, v, qs, ks, False, shapes=small_limit)


@pytest.mark.parametrize("cfg", [MoDConfig(layers=[1, 2], skipped_kv="keep", sink_tokens=1),
                                 MoDConfig(layers=[1, 2])])
def test_model_prefill_and_generation_equal_with_blocks(monkeypatch, cfg):
    m = random_routers(modify(tiny_model(layers=4), cfg), std=1.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (2, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).logits
        gen_ref = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        monkeypatch.setattr(A, "MASK_ELEMS", 256)
        monkeypatch.setattr(A, "MIN_BLOCK", 4)
        out = m(input_ids=ids, attention_mask=mask).logits
        gen = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        cache = MoDCache(4)  # a prefill in two calls: the second attends over the cache in blocks
        m(input_ids=ids[:, :30], attention_mask=mask[:, :30], cache=cache)
        tail = m(input_ids=ids[:, 30:], attention_mask=mask, cache=cache).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tail[valid[:, 30:]], ref[:, 30:][valid[:, 30:]], atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, gen_ref)


def test_a_single_block_is_never_split_and_makes_no_host_sync(small_limit):
    """A decode query over a long cache (a sliding-window model takes the mask path): one block, no sync."""
    from test_decode_syncs import count_syncs
    q, k, v = _qkv(2, 2, 3, 40)
    ks = A.Slots(torch.arange(40)[None].repeat(2, 1))
    qs = A.Slots(torch.tensor([[40, 41, 42]] * 2))
    assert count_syncs(lambda: A.attend(q, k, v, qs, ks, D ** -0.5, False, window=8)) == 0
    assert small_limit == [(2, 1, 3, 40)]
