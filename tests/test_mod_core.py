"""Routing correctness on tiny models: fast path == reference path, skipped tokens have no influence,
gates at 1 reproduce the dense model, save/load, target-rate mode, gradient checkpointing, bad input."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import mod_train
from mod_train import MoDConfig, MoDConfigError, UnsupportedModelError, modify, random_routers
from mod_train.mod.layer import routed_layer_fast

from conftest import tiny_model


def _batch(B=3, S=24, pad=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if pad:  # left padding of different lengths, as generate() uses
        for b in range(1, B):
            mask[b, : 3 * b] = 0
    return ids, mask


def _packed(B=2, S=24, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, S), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(8), torch.arange(6)])[None].repeat(B, 1)
    return ids, pos


def _pair(routing, **kw):
    fast = random_routers(modify(tiny_model(), MoDConfig(routing=routing, capacity=0.5, layers="all", **kw)))
    ref = copy.deepcopy(fast)
    ref.set_mod_config(dataclasses.replace(ref.mod_config, impl="reference"))
    return fast, ref


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("routing", ["threshold", "topk"])
@pytest.mark.parametrize("inputs", ["padded", "packed", "plain"])
def test_fast_equals_reference(routing, inputs):
    fast, ref = _pair(routing)
    if inputs == "packed":
        ids, pos = _packed()
        kw = dict(input_ids=ids, position_ids=pos, labels=ids)
    else:
        ids, mask = _batch(pad=inputs == "padded")
        kw = dict(input_ids=ids, attention_mask=mask, labels=ids)
    outs = []
    for m in (fast, ref):
        m.train()  # top-k selects by top-k in training
        o = m(**kw)
        o.loss.backward()
        outs.append((o, _grads(m)))
    (of, gf), (orf, gr) = outs
    rates = [v["rate"].item() for v in of.routing.values()]
    assert any(0.05 < r < 0.95 for r in rates), f"routing must actually skip tokens: {rates}"
    valid = kw.get("attention_mask", torch.ones_like(ids)).bool()
    torch.testing.assert_close(of.logits[valid], orf.logits[valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(of.loss, orf.loss, atol=1e-5, rtol=1e-5)
    assert gf.keys() == gr.keys() and any("router" in n for n in gf)
    for n in gf:
        torch.testing.assert_close(gf[n], gr[n], atol=1e-5, rtol=1e-4, msg=n)


def test_skipped_token_has_no_influence():
    m = random_routers(modify(tiny_model(), MoDConfig(layers=[1])))
    layer = m.model.layers[1]
    ids, _ = _batch(B=2, pad=False)
    h, meta = m.mod_embed(ids)
    z = layer.router(h)
    sel = torch.sigmoid(z) >= 0.5
    assert sel.any() and (~sel).any()
    w = torch.sigmoid(z)
    base = routed_layer_fast(layer, 1, h, meta, sel, w, "submodule", m.config)
    b, t = (~sel).nonzero()[0].tolist()
    h2 = h.clone()
    h2[b, t] += 10 * torch.randn(h.shape[-1])
    out = routed_layer_fast(layer, 1, h2, meta, sel, w, "submodule", m.config)
    others = torch.ones_like(sel)
    others[b, t] = False
    torch.testing.assert_close(out[others], base[others], atol=0, rtol=0)
    torch.testing.assert_close(out[b, t], h2[b, t], atol=0, rtol=0)  # a skipped token passes unchanged
    # while a selected token does influence later selected tokens
    bs, ts = b, sel[b].nonzero()[0].item()  # first selected token of that row
    h3 = h.clone()
    h3[bs, ts] += 10 * torch.randn(h.shape[-1])
    out3 = routed_layer_fast(layer, 1, h3, meta, sel, w, "submodule", m.config)
    later = sel[bs].nonzero().squeeze(1)
    later = later[later > ts]
    assert (out3[bs, later] - base[bs, later]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_gates_at_one_reproduce_dense_logits(arch):
    dense = tiny_model(arch)
    ids, mask = _batch()
    with torch.no_grad():
        ref = dense(input_ids=ids, attention_mask=mask).logits
        m = modify(dense, MoDConfig(layers="all"))
        for i in m.routed_layers:
            m.model.layers[i].router.bias.fill_(60.0)  # sigmoid(60) == 1.0 in fp32
        out = m(input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(out.logits[valid], ref[valid], atol=1e-5, rtol=1e-5)
    assert all(v["rate"].item() == 1.0 for v in out.routing.values())


def test_packed_documents_do_not_see_each_other():
    """In dense and routed layers: changing document 1 leaves document 2's logits unchanged."""
    m = random_routers(modify(tiny_model(), MoDConfig(layers="odd")))
    ids, pos = _packed(B=1)
    ids2 = ids.clone()
    ids2[0, :10] = torch.randint(1, 128, (10,))
    with torch.no_grad():
        a = m(input_ids=ids, position_ids=pos).logits
        b = m(input_ids=ids2, position_ids=pos).logits
        c = m(input_ids=ids[:, 10:18], position_ids=pos[:, 10:18]).logits  # document 2 alone
    torch.testing.assert_close(a[0, 10:], b[0, 10:], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[0, 10:18], c[0], atol=1e-5, rtol=1e-5)
    # doc_ids give the same result as restarting positions
    doc = torch.tensor([[0] * 10 + [1] * 8 + [2] * 6])
    with torch.no_grad():
        d = m(input_ids=ids, position_ids=pos, doc_ids=doc).logits
    torch.testing.assert_close(a, d)


def test_save_load_roundtrip(tmp_path):
    cfg = MoDConfig(routing="threshold", threshold=0.6, layers=[1, 2], alpha=0.05, router_init="zero",
                    router_input="norm", layer_thresholds={2: 0.7}, gate="block")
    m = random_routers(modify(tiny_model(), cfg))
    ids, mask = _batch()
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).logits
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(m)
    assert loaded.mod_config == m.mod_config and loaded.routed_layers == [1, 2]
    with torch.no_grad():
        out = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # and from_pretrained_mod of the MoD dir keeps its own settings
    again = mod_train.from_pretrained_mod(tmp_path)
    assert again.mod_config == cfg


def test_from_pretrained_mod_of_dense_checkpoint(tmp_path):
    dense = tiny_model()
    dense.save_pretrained(tmp_path)
    m = mod_train.from_pretrained_mod(tmp_path, MoDConfig(router_init="dense"))
    for i in m.routed_layers:
        r = m.model.layers[i].router
        assert torch.all(r.weight == 0) and torch.allclose(torch.sigmoid(r.bias), torch.tensor(0.95))
    torch.testing.assert_close(m.model.layers[0].self_attn.q_proj.weight, dense.model.layers[0].self_attn.q_proj.weight)


def test_dense_conversion_says_routers_initialised_in_one_line(tmp_path, capsys):
    """issue 18 item 5: the new routers are one [mod_train] line, not transformers' MISSING rows and its
    'Consider training' note; a genuinely missing non-router weight is still in transformers' report."""
    import logging

    from safetensors.torch import load_file, save_file
    reports = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        tiny_model(layers=6).save_pretrained(tmp_path / "dense")
        m = mod_train.from_pretrained_mod(tmp_path / "dense", MoDConfig(router_init="dense", layers=[1, 2, 3, 5]))
        out = capsys.readouterr()
        text = out.out + out.err + "\n".join(reports)
        assert not any(w in text for w in (".router.", "MISSING", "LOAD REPORT", "Consider training")), text
        assert ("[mod_train] 4 routers initialised (router_init='dense': w=0, b=2.94, gate 0.95) in layers 1..3, 5"
                in out.out), out.out
        assert m._keys_to_ignore_on_load_missing == set()  # the class and the instance are as transformers left them
        assert "_keys_to_ignore_on_load_missing" not in type(m).__dict__
        f = tmp_path / "dense" / "model.safetensors"
        weights = load_file(f)
        del weights["model.layers.0.mlp.up_proj.weight"]
        save_file(weights, f, metadata={"format": "pt"})
        reports.clear()
        mod_train.from_pretrained_mod(tmp_path / "dense", MoDConfig(router_init="zero"))
        report = "\n".join(reports)
        assert "model.layers.0.mlp.up_proj.weight" in report and "MISSING" in report, report
        assert "Consider training" in report and ".router." not in report, report
        assert "[mod_train] 3 routers initialised (router_init='zero': w=0, b=0, gate 0.5) in layers 1, 3, 5" \
            in capsys.readouterr().out
    finally:
        hf_logger.removeHandler(handler)


def test_target_rate_mode_moves_rate_towards_target():
    torch.manual_seed(0)
    m = modify(tiny_model(layers=4), MoDConfig(router_init="dense", target_rate=0.25, target_weight=5.0))
    random_routers(m, std=0.3, bias=float(MoDConfig().init_logit()))
    params = [p for n, p in m.named_parameters() if "router" in n]
    opt = torch.optim.Adam(params, lr=0.05)
    ids, mask = _batch(B=4, S=32, pad=False)
    m.train()
    rates = []
    for _ in range(60):
        out = m(input_ids=ids, labels=ids)
        rates.append(sum(v["rate"].item() for v in out.routing.values()) / len(out.routing))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert rates[0] == 1.0
    assert abs(sum(rates[-10:]) / 10 - 0.25) < 0.1, rates


def test_layer_load_loss_value():
    m = random_routers(modify(tiny_model(), MoDConfig(alpha=0.5)))
    ids, _ = _batch(pad=False)
    out = m(input_ids=ids, labels=ids)
    expect = sum(0.5 * v["rate"] * v["gate"] for v in out.routing.values())
    torch.testing.assert_close(out.aux_loss, expect)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)


def test_gradient_checkpointing_same_loss_and_grads():
    a = random_routers(modify(tiny_model(), MoDConfig(layers="all")))
    b = copy.deepcopy(a)
    b.activation_checkpointing_enable()
    ids, mask = _batch()
    res = []
    for m in (a, b):
        m.train()
        o = m(input_ids=ids, attention_mask=mask, labels=ids)
        o.loss.backward()
        res.append((o.loss.detach(), _grads(m)))
    assert b.model.gradient_checkpointing
    torch.testing.assert_close(res[0][0], res[1][0])
    for n in res[0][1]:
        torch.testing.assert_close(res[0][1][n], res[1][1][n], atol=1e-6, rtol=1e-5)


def test_calibration_hits_target_rate():
    m = random_routers(modify(tiny_model(), MoDConfig(layers="all")), std=2.0)
    ids, _ = _batch(B=4, S=64, pad=False)
    th = mod_train.calibrate_thresholds(m, [{"input_ids": ids}], 0.25)
    assert set(th) == set(m.routed_layers)
    with torch.no_grad():
        out = m(input_ids=ids)
    for v in out.routing.values():
        assert abs(v["rate"].item() - 0.25) < 0.03


@pytest.mark.parametrize("kw, needle", [
    (dict(threshold=1.0), "threshold"), (dict(threshold=0.0), "threshold"), (dict(capacity=0.0), "capacity"),
    (dict(capacity=1.5), "capacity"), (dict(layers="every-third"), "unknown layer spec"),
    (dict(routing="topp"), "routing"), (dict(router_init="xavier"), "router_init"),
    (dict(target_rate=1.5), "target_rate"),
])
def test_bad_config_values(kw, needle):
    with pytest.raises(MoDConfigError, match=needle):
        MoDConfig(**kw)


def test_bad_layer_index_and_unknown_key():
    with pytest.raises(MoDConfigError, match="out of range"):
        modify(tiny_model(layers=4), MoDConfig(layers=[1, 7]))
    with pytest.raises(MoDConfigError, match="did you mean 'threshold'"):
        MoDConfig.from_dict({"treshold": 0.5})


def test_unknown_architecture_lists_supported():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        modify(gpt2, MoDConfig())


def test_varlen_segments_match_masked_attention():
    """The flash-attn varlen layout (used on GPU) computed on CPU: per-segment causal attention over the
    flattened valid slots equals the masked SDPA path, for packed documents with padding."""
    from mod_train.mod import attention as A
    B, H, L, D = 2, 2, 12, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [0, 0, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :2] = False
    s = A.Slots(pos, doc, valid)
    ref = A.attend(q, k, v, s, s, D ** -0.5, True)
    flat, cu, max_len = A.varlen_segments(s)
    assert cu.tolist() == [0, 4, 7, 12, 18, 22] and max_len == 6
    qf, kf, vf = (x.transpose(1, 2).reshape(B * L, H, D)[flat] for x in (q, k, v))
    out = torch.zeros_like(qf)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = [x[a:b].transpose(0, 1)[None] for x in (qf, kf, vf)]
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(*seg, is_causal=True, scale=D ** -0.5)[0].transpose(0, 1)
    torch.testing.assert_close(out, ref.reshape(B * L, H, D)[flat], atol=1e-5, rtol=1e-5)


def test_aux_loss_trains_routers_only():
    m = random_routers(modify(tiny_model(), MoDConfig(alpha=1.0)))
    m.train()
    ids, _ = _batch(pad=False)
    out = m(input_ids=ids)
    out.aux_loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("router" in n for n in grads), sorted(grads)


def test_router_probe_orders_tokens_by_layer_importance():
    from mod_train import fit_routers_to_importance
    from mod_train.mod.layer import dense_layer
    m = modify(tiny_model(layers=4), MoDConfig(layers=[1, 3]))
    ids, _ = _batch(B=4, S=64, pad=False, seed=3)
    r2 = fit_routers_to_importance(m, [{"input_ids": ids}])
    assert set(r2) == {1, 3} and all(v > 0.1 for v in r2.values()), r2  # SmolLM2: 0.8-0.98
    with torch.no_grad():
        h, meta = m.mod_embed(ids)
        h = m.mod_layer(0, h, meta)[0]
        layer = m.model.layers[1]
        imp = ((dense_layer(layer, 1, h, meta, m.config) - h).norm(dim=-1) / h.norm(dim=-1)).log().flatten()
        gate = torch.sigmoid(layer.router(h)).flatten()
        out = m(input_ids=ids)
    corr = torch.corrcoef(torch.stack([imp, gate]))[0, 1]
    assert corr > 0.3, corr
    assert all(v["rate"].item() > 0.95 for v in out.routing.values())  # still starts close to dense
    # rate=: the probe is centred so that the layers start at that execution rate on these tokens
    fit_routers_to_importance(m, [{"input_ids": ids}], rate=0.3)
    with torch.no_grad():
        out = m(input_ids=ids)
    assert all(abs(v["rate"].item() - 0.3) < 0.02 for v in out.routing.values()), out.routing
    with pytest.raises(ValueError, match="rate"):
        fit_routers_to_importance(m, [{"input_ids": ids}], rate=0.0)


def test_random_routers_draws_and_calibrates():
    m = modify(tiny_model(layers=4), MoDConfig(layers="all"))
    random_routers(m, seed=5, std=2.0, bias=0.25)
    g = torch.Generator().manual_seed(5)
    for i in m.routed_layers:  # one generator, routed layers in order
        r = m.model.layers[i].router
        expect = torch.randn(r.weight.shape, generator=g) * 2.0 / r.weight.shape[1] ** 0.5
        assert torch.equal(r.weight.detach(), expect) and float(r.bias.detach()) == 0.25
    ids, _ = _batch(B=4, S=64, pad=False)
    random_routers(m, seed=5, batches=[{"input_ids": ids}], rate=0.25)
    assert set(m.mod_config.layer_thresholds) == set(m.routed_layers)
    with torch.no_grad():
        out = m(input_ids=ids)
    assert all(abs(v["rate"].item() - 0.25) < 0.03 for v in out.routing.values())
    with pytest.raises(ValueError, match="both"):
        random_routers(m, rate=0.5)


def test_mod_config_is_typed_and_written_one_way(tmp_path):
    import json
    cfg = MoDConfig(layers=[1, 3], layer_thresholds={3: 0.7})
    m = modify(tiny_model(), cfg)
    assert isinstance(m.mod_config, MoDConfig) and m.mod_config == cfg
    assert m.config.mod == cfg.to_dict()
    cfg.threshold = 0.3  # the model holds its own copy
    assert m.mod_config.threshold == 0.5
    m.set_mod_config(dataclasses.replace(m.mod_config, threshold=0.6))
    assert m.mod_config.threshold == 0.6 and m.config.mod["threshold"] == 0.6
    m.save_pretrained(tmp_path)  # the saved format: config.json's `mod` dict
    assert json.loads((tmp_path / "config.json").read_text())["mod"] == m.mod_config.to_dict()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).mod_config == m.mod_config
    m.config.mod = {**m.config.mod, "impl": "reference"}  # bypasses the typed config: refused, not ignored
    with pytest.raises(RuntimeError, match="set_mod_config"):
        m(input_ids=_batch(pad=False)[0])


def test_selection_returns_the_layer_threshold():
    from mod_train.mod import router as R
    z = torch.tensor([[-1.0, 0.0, 1.0, 2.0]])
    cfg = MoDConfig(layer_thresholds={1: 0.8})
    sel, p = R.select(z, None, cfg, 1, causal=True)
    assert p == 0.8 and sel.tolist() == [[False, False, False, True]]
    sel, p = R.select(z, None, cfg, 0, causal=True)
    assert p == 0.5 and sel.tolist() == [[False, True, True, True]]
    sel, p = R.select(z, None, MoDConfig(routing="topk", capacity=0.5, threshold=0.9), 1, causal=False)
    assert p == 0.5 and sel.tolist() == [[False, False, True, True]]


def test_init_routers_gathers_partitioned_routers():
    import contextlib
    from mod_train import init_routers
    m = modify(tiny_model(), MoDConfig(layers=[1, 3]))
    seen = []

    @contextlib.contextmanager
    def gather(params):
        seen.append([p.shape for p in params])
        yield

    random_routers(m)
    init_routers(m, gather=gather)
    assert len(seen) == 2 and all(torch.all(m.model.layers[i].router.weight == 0) for i in (1, 3))
    m.model.layers[3].router.weight.data = torch.empty(0)  # what a ZeRO-3 partition leaves on a rank
    with pytest.raises(ValueError, match="partitioned"):
        init_routers(m)


def test_aux_loss_in_inference_forwards():
    """With labels the auxiliary loss is the same with or without gradients (evaluation reports it); an inference
    forward without labels (prefill, generation) skips it and reports 0."""
    m = random_routers(modify(tiny_model(), MoDConfig(alpha=0.5)))
    ids, _ = _batch(pad=False)
    train = m(input_ids=ids, labels=ids).aux_loss.detach()
    with torch.no_grad():
        evaluated = m(input_ids=ids, labels=ids).aux_loss
        served = m(input_ids=ids)
    assert float(train) > 0
    torch.testing.assert_close(evaluated, train)
    assert float(served.aux_loss) == 0.0 and served.routing
