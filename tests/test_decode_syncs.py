"""Host syncs of one decode step, counted on CPU with the torch profiler (a sync on the GPU is a
`aten::_local_scalar_dense` (from .item(), int(), bool() of a tensor) or an `aten::nonzero`): none in a dense layer,
at most one per routed layer at batch 1 (run it or skip it), none from the cache, the masks or the positions."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mod_train import MoDCache, MoDConfig, modify, random_routers
from mod_train.eval.bench import SYNC_OPS  # the ops the serving benchmark counts as syncs, defined once
from mod_train.mod.layer import dense_layer

from conftest import tiny_model


def count_syncs(fn) -> int:
    """Host syncs of fn(): the profiler's SYNC_OPS, plus Tensor.tolist() calls (one device-to-host copy each on a GPU,
    which the CPU profiler does not record)."""
    lists = []
    tolist = torch.Tensor.tolist

    def counted(self):
        lists.append(1)
        return tolist(self)
    torch.Tensor.tolist = counted
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.Tensor.tolist = tolist
    return sum(e.count for e in prof.key_averages() if e.key in SYNC_OPS) + len(lists)


def _prefilled(cfg: MoDConfig, B=1, S=12, layers=6, pad=False):
    m = random_routers(modify(tiny_model(layers=layers), cfg), std=1.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (B, S + 1), generator=g)
    mask = torch.ones(B, S + 1, dtype=torch.long)
    if pad:
        for b in range(B):
            mask[b, : 2 * b] = 0
    cache = MoDCache(layers)
    with torch.no_grad():
        m(input_ids=ids[:, :S], attention_mask=mask[:, :S], cache=cache)
    return m, ids, mask, cache


def _step(m, ids, mask, cache):
    def f():
        with torch.no_grad():
            m(input_ids=ids[:, -1:], attention_mask=mask, cache=cache)
    return f


@pytest.mark.parametrize("name, cfg", [
    ("drop", MoDConfig(layers=[1, 4])),
    ("keep+sink", MoDConfig(layers=[1, 4], skipped_kv="keep", sink_tokens=1)),
    ("hold", MoDConfig(layers=[1, 4], rate_hold="window", layer_rates={1: 0.5, 4: 0.3}, rate_window=8)),
    ("topk", MoDConfig(layers=[1, 4], routing="topk")),
])
def test_decode_step_at_batch_one_syncs_at_most_once_per_routed_layer(name, cfg):
    m, ids, mask, cache = _prefilled(cfg)
    n = count_syncs(_step(m, ids, mask, cache))
    assert n <= len(m.routed_layers), f"{name}: {n} host syncs for {len(m.routed_layers)} routed layers"


def test_dense_layers_add_no_sync():
    """Two routed layers among 4 or among 10 decoder layers: the same number of syncs."""
    counts = []
    for layers in (4, 10):
        m, ids, mask, cache = _prefilled(MoDConfig(layers=[1, 2]), layers=layers)
        counts.append(count_syncs(_step(m, ids, mask, cache)))
    assert counts[0] == counts[1] <= 2, counts
    m, ids, mask, cache = _prefilled(MoDConfig(layers=[1]), B=3, pad=True)
    with torch.no_grad():
        h, meta = m.mod_embed(ids[:, -1:], mask, cache=cache)
        assert count_syncs(lambda: dense_layer(m.model.layers[0], 0, h, meta, m.config)) == 0


def test_ragged_batch_decode_syncs_at_most_once_per_routed_layer_and_stays_exact():
    cfg = MoDConfig(layers=[1, 3], sink_tokens=1)
    m, ids, mask, cache = _prefilled(cfg, B=4, pad=True, layers=4)
    assert count_syncs(_step(m, ids, mask, cache)) <= 2
    with torch.no_grad():  # the step (run again on a fresh cache) equals the full forward
        cache = MoDCache(4)
        m(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], cache=cache)
        step = m(input_ids=ids[:, -1:], attention_mask=mask, cache=cache).logits[:, -1]
        full = m(input_ids=ids, attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [MoDConfig(layers=[1, 3, 4]), MoDConfig(layers=[1, 3, 4], skipped_kv="keep", sink_tokens=1)])
def test_prefill_syncs_once_and_launches_few_ops_per_routed_layer(cfg):
    """A prefill on a fresh cache: one host sync per routed layer (its run/skip decision and size) and none
    elsewhere; a routed layer launches at most 40 ops more than the same layer run dense (router, selection, gathers,
    the scatter back: 30 in drop mode, 38 with kept K/V, counted as the serving benchmark counts launches; 44 with
    kept K/V before the auxiliary loss was skipped in inference forwards)."""
    from mod_train.eval.bench import RoutingOff, prefill_profile
    m = random_routers(modify(tiny_model(layers=6), cfg), std=1.5).eval()
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    routed, dense = prefill_profile(m, ids, cpu, True), prefill_profile(RoutingOff(m), ids, cpu, False)
    assert routed["syncs"] == len(m.routed_layers) and dense["syncs"] == 0, (routed["syncs"], dense["syncs"])
    assert routed["launches"] - dense["launches"] <= 40 * len(m.routed_layers), (routed["launches"], dense["launches"])
