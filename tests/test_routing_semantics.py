"""The token-adaptive semantics against hand-built references: sink tokens (MoDConfig.sink_tokens), skipped
tokens' K/V kept (skipped_kv='keep'), off layers (p = 1), and the causal per-sequence rate hold
(rate_hold='window'): fast == reference, cache == full forward, and the one-line refusals."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mod_train import MoDCache, MoDConfig, MoDConfigError, modify, random_routers
from mod_train.mod import router as R
from mod_train.mod.layer import dense_layer

from conftest import tiny_model


def _padded(B=3, S=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for b in range(1, B):
        mask[b, : 3 * b] = 0
        ids[b, : 3 * b] = 0
    return ids, mask


def _packed(B=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    pos = torch.cat([torch.arange(10), torch.arange(8), torch.arange(6)])[None].repeat(B, 1)
    return torch.randint(1, 128, pos.shape, generator=g), pos


def _model(layers="all", std=1.5, **kw):
    return random_routers(modify(tiny_model(layers=4), MoDConfig(layers=layers, **kw)), std=std)


def _terms(m, **kw):
    with torch.no_grad():
        h, meta = m.mod_embed(kw["input_ids"], kw.get("attention_mask"), kw.get("position_ids"))
        return m.mod_stack(h, meta)[1], meta


def _shut(m, layers=None):
    with torch.no_grad():
        for j in layers or m.routed_layers:
            m.model.layers[j].router.weight.zero_()
            m.model.layers[j].router.bias.fill_(-30.0)
    return m


# -- sink tokens -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("inputs", ["padded", "packed"])
def test_sink_tokens_run_every_routed_layer_with_routers_shut(inputs):
    m = _shut(_model(sink_tokens=2, gate_form="ste"))  # x1: the sinks' own update shows in the logits
    if inputs == "packed":
        ids, pos = _packed()
        terms, meta = _terms(m, input_ids=ids, position_ids=pos)
        want = pos < 2  # the first two tokens of each of the three documents
        assert int(want[0].sum()) == 6
    else:
        ids, mask = _padded()
        terms, meta = _terms(m, input_ids=ids, attention_mask=mask)
        want = meta.slots.valid & (meta.slots.pos < 2)  # the first two real tokens after the left padding
        assert want[2, 6] and want[2, 7] and not want[2, :6].any()
    for t in terms:
        assert torch.equal(t.selected, want), t.layer
    # the sinks' outputs are those of the layer run on them: the shut model differs from sink_tokens=0 there
    no_sink = copy.deepcopy(m)
    no_sink.set_mod_config(dataclasses.replace(m.mod_config, sink_tokens=0))
    kw = dict(input_ids=ids, position_ids=pos) if inputs == "packed" else dict(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        assert not torch.allclose(m(**kw).logits[want], no_sink(**kw).logits[want])


def test_topk_keeps_sinks_outside_its_capacity():
    m = _model(routing="topk", capacity=0.25, sink_tokens=3)
    m.train()
    ids, mask = _padded()
    terms, meta = _terms(m, input_ids=ids, attention_mask=mask)
    n_valid = mask.sum(1)
    for t in terms:
        sink = meta.slots.valid & (meta.slots.pos < 3)
        assert (t.selected[sink]).all()
        want = 3 + torch.ceil(0.25 * (n_valid - 3)).long()
        assert torch.equal(t.selected.sum(1), want), (t.layer, t.selected.sum(1), want)


def test_sinks_count_in_rates_and_calibration():
    m = _shut(_model(sink_tokens=1))
    ids, mask = _padded(B=2, S=20)
    out = m(input_ids=ids, attention_mask=mask)
    n_valid = int(mask.sum())
    for r in out.routing.values():  # only the sink of each row runs
        assert abs(float(r["rate"]) - 2 / n_valid) < 1e-6
    m2 = _model(sink_tokens=4)
    batches = [{"input_ids": ids, "attention_mask": mask}]
    from mod_train import calibrate_thresholds
    calibrate_thresholds(m2, batches, 0.5)
    rates = [float(r["rate"]) for r in m2(input_ids=ids, attention_mask=mask).routing.values()]
    assert all(abs(r - 0.5) <= 1.5 / n_valid for r in rates), rates  # the sinks are part of the target


# -- skipped tokens keep their K/V -------------------------------------------------------------------------
def _hand_keep(m, kw):
    """Hand-built reference of skipped_kv='keep' with the x1 gate: a selected token's output is the dense
    layer's output (its attention sees every token's K/V), a skipped token's output is its input."""
    with torch.no_grad():
        h, meta = m.mod_embed(kw["input_ids"], kw.get("attention_mask"), kw.get("position_ids"))
        for i, layer in enumerate(m.model.layers):
            if i not in m.routed_layers:
                h = dense_layer(layer, i, h, meta, m.config)
                continue
            z = layer.router(h)
            sel = (z >= 0) & (meta.slots.valid if meta.slots.valid is not None else True)
            h = torch.where(sel[..., None], dense_layer(layer, i, h, meta, m.config), h)
        return m.lm_head(m.model.norm(h))


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("inputs", ["padded", "packed", "plain"])
def test_keep_equals_hand_built_reference(impl, inputs):
    m = _model(skipped_kv="keep", gate_form="ste", impl=impl)
    if inputs == "packed":
        ids, pos = _packed()
        kw = dict(input_ids=ids, position_ids=pos)
        valid = torch.ones_like(ids, dtype=torch.bool)
    else:
        ids, mask = _padded() if inputs == "padded" else (_padded()[0], torch.ones(3, 24, dtype=torch.long))
        kw = dict(input_ids=ids, attention_mask=mask)
        valid = mask.bool()
    with torch.no_grad():
        out = m(**kw)
    rates = [float(r["rate"]) for r in out.routing.values()]
    assert any(0.1 < r < 0.9 for r in rates), rates
    torch.testing.assert_close(out.logits[valid], _hand_keep(m, kw)[valid], atol=2e-5, rtol=1e-4)
    drop = copy.deepcopy(m)
    drop.set_mod_config(dataclasses.replace(m.mod_config, skipped_kv="drop"))
    with torch.no_grad():  # the semantics differ: executed tokens see other keys
        assert not torch.allclose(drop(**kw).logits[valid], out.logits[valid], atol=1e-3)


@pytest.mark.parametrize("inputs", ["padded", "packed"])
def test_keep_fast_equals_reference_with_gradients(inputs):
    fast = _model(skipped_kv="keep", sink_tokens=1)
    ref = copy.deepcopy(fast)
    ref.set_mod_config(dataclasses.replace(ref.mod_config, impl="reference"))
    if inputs == "packed":
        ids, pos = _packed()
        kw = dict(input_ids=ids, position_ids=pos, labels=ids)
    else:
        ids, mask = _padded()
        kw = dict(input_ids=ids, attention_mask=mask, labels=ids)
    outs = []
    for m in (fast, ref):
        m.train()
        o = m(**kw)
        o.loss.backward()
        outs.append((o, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (of, gf), (orf, gr) = outs
    torch.testing.assert_close(of.loss, orf.loss, atol=1e-5, rtol=1e-5)
    assert gf.keys() == gr.keys() and any("router" in n for n in gf)
    for n in gf:
        torch.testing.assert_close(gf[n], gr[n], atol=1e-5, rtol=1e-4, msg=n)


def test_keep_with_all_gates_open_is_the_dense_model():
    dense = tiny_model(layers=4)
    m = modify(copy.deepcopy(dense), MoDConfig(layers="all", skipped_kv="keep", gate_form="ste"))
    ids, mask = _padded()
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask).logits
        got = m(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-5, rtol=1e-4)


def test_keep_with_gates_shut_stores_kv_and_changes_nothing():
    m = _shut(_model(layers=[1, 2], skipped_kv="keep"), [1])
    ids, mask = _padded(B=2, S=16)
    with torch.no_grad():
        h, meta = m.mod_embed(ids, mask, cache=MoDCache(4))
        h1 = m.mod_layer(0, h, meta)[0]
        h2 = m.mod_layer(1, h1, meta)[0]
    assert torch.equal(h2, h1)  # no update for any token
    L = meta.cache.layers[1]
    assert L.length.tolist() == [16, 16]  # ... but every token's K/V is there
    attn = m.model.layers[1].self_attn
    from mod_train.mod.layer import _kv
    k, v = _kv(attn, m.model.layers[1].input_layernorm(h1), meta.cos, meta.sin)
    torch.testing.assert_close(L.k[:, :, :16], k)
    torch.testing.assert_close(L.v[:, :, :16], v)


@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_off_layer_stores_and_runs_nothing(mode):
    m = _model(layers=[1, 2], skipped_kv=mode, sink_tokens=2, layer_thresholds={1: 1.0})
    assert m.mod_config.is_off(1)
    ids, mask = _padded(B=2, S=12)
    with torch.no_grad():
        cache = MoDCache(4)
        out = m(input_ids=ids, attention_mask=mask, cache=cache)
    assert float(out.routing[1]["rate"]) == 0.0  # sinks included: the layer is deleted
    assert cache.layer_lengths()[1] == [] and cache.layer_bytes()[1] == 0
    if mode == "keep":
        assert cache.layer_lengths()[2] == [12, 12]  # a routed layer that is on keeps every token's K/V


# -- cache == full forward, for every semantics ------------------------------------------------------------
SEMANTICS = {
    "drop+sink": dict(sink_tokens=2),
    "keep": dict(skipped_kv="keep"),
    "keep+sink": dict(skipped_kv="keep", sink_tokens=1),
    "hold": dict(rate_hold="window", rate_window=5, layer_rates={1: 0.3, 3: 0.6}, sink_tokens=1),
    "hold+keep": dict(rate_hold="window", rate_window=7, layer_rates={1: 0.5, 3: 0.2}, skipped_kv="keep"),
}


@pytest.mark.parametrize("name", list(SEMANTICS))
def test_incremental_decoding_equals_full_forward(name):
    m = _model(layers="odd", **SEMANTICS[name])
    ids, mask = _padded(B=4, S=24)
    with torch.no_grad():
        full = m(input_ids=ids, attention_mask=mask)
        cache = MoDCache(4)
        steps = [m(input_ids=ids[:, :9], attention_mask=mask[:, :9], cache=cache).logits]
        for t in range(9, 24):
            steps.append(m(input_ids=ids[:, t:t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    valid = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[valid], full.logits[valid], atol=1e-5, rtol=1e-5)
    rates = [float(r["rate"]) for r in full.routing.values()]
    assert any(0.05 < r < 0.95 for r in rates), rates
    lengths = cache.layer_lengths()
    if m.mod_config.skipped_kv == "keep":
        assert lengths[1] == lengths[0]  # every slot, as the dense layer
    else:
        assert all(a < b for a, b in zip(lengths[1], lengths[0]))
    a = m.generate(ids[:1, :10], max_new_tokens=8, do_sample=False)
    b = m.generate(ids[:1, :10], max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


# -- the causal rate hold ------------------------------------------------------------------------------------
def _hand_hold(z, valid, doc, rate, window):
    """Token by token: the window is the last `window` slots of the row up to t, restricted to valid tokens of
    t's document; t runs iff fewer than rate * n of them have a larger logit."""
    B, S = z.shape
    out = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        for t in range(S):
            ws = [s for s in range(max(0, t - window + 1), t + 1) if valid[b, s] and doc[b, s] == doc[b, t]]
            larger = sum(1 for s in ws if z[b, s] > z[b, t])
            out[b, t] = larger < rate * len(ws)
    return out


def test_held_selection_equals_hand_built_rule():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 40, generator=g)
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[1, :7] = False
    doc = torch.zeros(3, 40, dtype=torch.long)
    doc[2, 15:] = 1
    doc[2, 31:] = 2
    for rate, window in ((0.5, 8), (0.2, 40), (0.9, 3), (0.0, 5), (1.0, 5)):
        got = R.held_select(z, valid, doc, rate, window) & valid
        assert torch.equal(got, _hand_hold(z, valid, doc, rate, window) & valid), (rate, window)


def test_held_rate_is_the_same_on_shifted_and_scaled_logits():
    """A fixed threshold's rate moves with the logits' distribution (another domain); the held one does not."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 1024, generator=g)
    for shift, scale in ((0.0, 1.0), (1.5, 1.0), (-2.0, 0.5)):
        zz = z * scale + shift
        held = R.held_select(zz, None, None, 0.3, 256).float().mean()
        fixed = (zz >= float(torch.quantile(z, 0.7))).float().mean()
        assert abs(float(held) - 0.3) < 0.03, (shift, scale, float(held))
        if shift:
            assert abs(float(fixed) - 0.3) > 0.2


@pytest.mark.parametrize("kw, needle", [
    (dict(sink_tokens=-1), "sink_tokens"),
    (dict(sink_tokens=1.5), "sink_tokens"),
    (dict(skipped_kv="evict"), "skipped_kv"),
    (dict(rate_hold="window"), "layer_rates"),
    (dict(rate_hold="window", layer_rates={1: 0.5}, routing="topk"), "rate_hold"),
    (dict(layer_rates={1: 1.5}), "layer_rates"),
    (dict(rate_window=0), "rate_window"),
    (dict(layer_thresholds={1: 1.5}), "layer_thresholds"),
])
def test_new_settings_are_refused_in_one_line(kw, needle):
    with pytest.raises(MoDConfigError) as e:
        MoDConfig(**kw).validate(4)  # held rates are checked against a model (a start point may write them)
    assert needle in str(e.value) and "\n" not in str(e.value)
    if kw == dict(rate_hold="window"):
        with pytest.raises(MoDConfigError, match="layer_rates"):
            modify(tiny_model(layers=4), MoDConfig(**kw))


# -- the routed start and the honest accounting ---------------------------------------------------------------
def _rows(n=3, S=32, seed=5):
    g = torch.Generator().manual_seed(seed)
    pos = torch.cat([torch.arange(20), torch.arange(S - 20)])[None]
    return [{"input_ids": torch.randint(1, 128, (1, S), generator=g), "position_ids": pos} for _ in range(n)]


def test_routed_start_writes_the_allocation_and_leaves_sinks_out(tmp_path):
    from mod_train import fit_routers_to_importance
    from mod_train.experiments.probe import start_mod_config
    m = modify(tiny_model(layers=6), MoDConfig(layers="all", dense_first=1, sink_tokens=2))
    batches = _rows()
    fit_routers_to_importance(m, batches, rate=0.5, pooled=True)
    cfg = m.mod_config
    assert set(cfg.layer_rates) == set(m.routed_layers)
    assert abs(sum(cfg.layer_rates.values()) / len(cfg.layer_rates) - 0.5) < 0.02  # one budget over (token, layer)
    # held at those rates, the realised per-layer rates on the calibration rows follow the allocation
    m.set_mod_config(dataclasses.replace(cfg, rate_hold="window", rate_window=64))
    for b in batches:
        terms, meta = _terms(m, **b)
        for t in terms:
            sink = meta.slots.pos < 2
            assert t.selected[sink].all()
            got = float(t.selected[~sink].float().mean())
            assert abs(got - cfg.layer_rates[t.layer]) < 0.25, (t.layer, got, cfg.layer_rates[t.layer])
    # a per-layer allocation with rate 0 turns the layer off (static deletion, no K/V in any mode)
    m2 = modify(tiny_model(layers=6), MoDConfig(layers="all", dense_first=1))
    fit_routers_to_importance(m2, batches, rate={1: 0.0, 2: 1.0, 3: 0.5, 4: 1.0, 5: 0.0})
    assert [j for j in m2.routed_layers if m2.mod_config.is_off(j)] == [1, 5]
    m2.save_pretrained(tmp_path)
    user = MoDConfig(layers="all", dense_first=1, rate_hold="window", layer_thresholds={3: 0.4})
    merged = start_mod_config(user, tmp_path)
    assert merged.layer_thresholds == {1: 1.0, 5: 1.0, 3: 0.4} and merged.layer_rates[3] == 0.5
    assert merged.rate_hold == "window"


def test_hybrid_start_deletes_whole_layers_then_routes_the_rest(tmp_path):
    from mod_train import fit_routers_to_importance
    from mod_train.config import ConfigError, RunConfig
    batches = _rows()
    # layers already off count as rate 0 in the budget; the others share it token by token
    m = modify(tiny_model(layers=6), MoDConfig(layers="all", dense_first=1, layer_thresholds={2: 1.0, 4: 1.0}))
    fit_routers_to_importance(m, batches, rate=0.4, pooled=True)
    r = m.mod_config.layer_rates
    assert r[2] == 0.0 and r[4] == 0.0 and m.mod_config.is_off(2) and m.mod_config.is_off(4)
    assert abs(sum(r.values()) / 5 - 0.4) < 0.02  # 2 layers' worth spent over 3 layers
    assert all(0.0 < r[j] < 1.0 for j in (1, 3, 5))
    with pytest.raises(ValueError, match="cannot be spent"):  # 3 on layers cannot carry 0.8 of 5
        fit_routers_to_importance(modify(tiny_model(layers=6), MoDConfig(
            layers="all", dense_first=1, layer_thresholds={2: 1.0, 4: 1.0})), batches, rate=0.8, pooled=True)
    with pytest.raises(ConfigError, match="init_deleted"):
        RunConfig(model="m", out="o", init="allocated", init_rate=0.5, init_deleted=2).validate()
    with pytest.raises(ConfigError, match="init_deleted"):
        RunConfig(model="m", out="o", init="routed", init_rate=0.5, init_deleted=-1).validate()


def test_hybrid_probe_start_deletes_the_lowest_influence_layers(tmp_path):
    from transformers import AutoModelForCausalLM

    from harness import write_tiny_recipe
    from mod_train.config import ConfigError
    from mod_train.experiments.probe import first_rows, probe_start, start_mod_config
    from mod_train.mod.prune import block_influence, lowest_influence
    base, recipe = write_tiny_recipe(tmp_path, n_docs=20, seq_len=64)
    recipe = str(recipe)
    cfg = MoDConfig(layers="all", dense_first=1, sink_tokens=1)
    path, _ = probe_start(str(base), cfg, recipe, 64, tmp_path / "h", rate=0.3, pooled=True, delete=2)
    bi = block_influence(AutoModelForCausalLM.from_pretrained(base).eval(), first_rows(recipe, 64))
    drop = lowest_influence({j: bi[j] for j in range(1, 4)}, 2)  # the tiny model: 4 layers, 1..3 routed
    got = start_mod_config(MoDConfig(layers="all", dense_first=1, rate_hold="window"), path)
    assert sorted(j for j, p in got.layer_thresholds.items() if p >= 1.0) == drop  # pruning's choice
    assert all(got.layer_rates[j] == 0.0 for j in drop)
    assert abs(sum(got.layer_rates.values()) / 3 - 0.3) < 0.03
    with pytest.raises(ConfigError, match="at most 2 can be deleted"):
        probe_start(str(base), cfg, recipe, 64, tmp_path / "h2", rate=0.3, pooled=True, delete=3)


def test_flops_and_kv_count_kept_kv():
    from mod_train.eval import flops as F
    from mod_train.eval.metrics import ideal_kv_fraction
    c = tiny_model(layers=4).config
    rates = {1: 0.25, 3: 0.5}
    assert F.kv_ratio(c, rates) == pytest.approx((1 + 0.25 + 1 + 0.5) / 4)
    assert F.kv_ratio(c, rates, frozenset({1, 3})) == 1.0
    # keep: K/V projections for every token, the rest for the selected ones; selected queries see every key
    d, hd, Hkv = c.hidden_size, c.hidden_size // c.num_attention_heads, c.num_key_value_heads
    kv = 4 * d * Hkv * hd
    S = 100
    full = F.prefill_flops(c, S, {1: 1.0}, 1)
    kept = F.prefill_flops(c, S, {1: 0.25}, 1, frozenset({1}))
    layer = S * F.token_flops(c) + F.attn_pair_flops(c) * S * (S + 1) / 2
    want = S * kv + 0.25 * S * (F.token_flops(c) - kv) + F.attn_pair_flops(c) * 0.25 * S * (S + 1) / 2
    assert full - kept == pytest.approx(layer - want)
    m = modify(tiny_model(layers=4), MoDConfig(layers="odd", skipped_kv="keep", layer_thresholds={3: 1.0}))
    assert ideal_kv_fraction(m, 0.3) == pytest.approx(0.75)  # layer 3 is off, layer 1 keeps every token
    assert F.keep_layers(m) == frozenset({1})


def test_distributed_dummy_slot_changes_nothing_at_batch_one():
    """always_compute (every rank calls every sub-module under ZeRO-3/TP): with no token selected in a row of one,
    the one computed slot is a masked dummy and the layer's output is its input (a batch of one is not 'full')."""
    from mod_train.mod.layer import routed_layer_fast
    m = _model(layers=[1])
    ids, _ = _padded(B=1, S=10)
    with torch.no_grad():
        h, meta = m.mod_embed(ids)
        sel = torch.zeros(1, 10, dtype=torch.bool)
        out = routed_layer_fast(m.model.layers[1], 1, h, meta, sel, torch.ones(1, 10), "submodule", m.config,
                                always_compute=True)
    assert torch.equal(out, h)
