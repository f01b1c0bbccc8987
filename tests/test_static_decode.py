"""MoDConfig.decode 'static' (and 'cuda_graphs', which decodes as 'static' on CPU): the static decode step equals
the eager one, token by token and in generate(), for every routing semantics, at batch 1 and for a ragged batch of
4 with left padding; it takes one host decision per routed layer at any batch size and none elsewhere; its buffers
keep their addresses from step to step (what a CUDA graph needs); with CUDA, the captured graphs replay it exactly."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mod_train import MoDCache, MoDConfig, modify, random_routers

from conftest import tiny_model
from test_decode_syncs import count_syncs

SEMANTICS = {
    "drop": MoDConfig(layers=[1, 2, 4]),
    "keep+sink": MoDConfig(layers=[1, 2, 4], skipped_kv="keep", sink_tokens=1),
    "hold": MoDConfig(layers=[1, 2, 4], rate_hold="window", layer_rates={1: 0.5, 2: 0.7, 4: 0.3}, rate_window=6,
                      sink_tokens=1),
    "off+keep": MoDConfig(layers=[1, 2, 4], skipped_kv="keep", layer_thresholds={2: 1.0}),
    "topk": MoDConfig(layers=[1, 2, 4], routing="topk", gate="block"),
}


def _model(cfg, arch="llama", layers=6):
    return random_routers(modify(tiny_model(arch, layers=layers), cfg), std=1.5).eval()


def _batch(B, S, pad):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if pad:
        for b in range(B):
            mask[b, : 2 * b] = 0
    return ids, mask


def _decode(m, ids, mask, steps, decode, max_length=None):
    """Greedy decoding by hand: (logits of every step [B, steps, V], tokens [B, steps], cache)."""
    m.set_mod_config(dataclasses.replace(m.mod_config, decode=decode))
    cache = MoDCache(m.config.num_hidden_layers, max_length=max_length)
    out, logits, toks = None, [], []
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, cache=cache)
        for _ in range(steps):
            tok = out.logits[:, -1:].argmax(-1)
            toks.append(tok)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            out = m(input_ids=tok, attention_mask=mask, cache=cache)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), torch.cat(toks, 1), cache


@pytest.mark.parametrize("name", list(SEMANTICS))
@pytest.mark.parametrize("B, pad", [(1, False), (4, True)])
def test_static_step_equals_the_eager_step(name, B, pad):
    m = _model(SEMANTICS[name])
    ids, mask = _batch(B, 10, pad)
    le, te, ce = _decode(m, ids, mask, 12, "eager")
    ls, ts, cs = _decode(m, ids, mask, 12, "static", max_length=10 + 12)
    assert cs.static is not None and ce.static is None
    torch.testing.assert_close(ls, le, atol=1e-5, rtol=1e-5)
    assert torch.equal(ts, te)
    # the same K/V were kept: per layer and row, the same stored tokens and the same bytes counted
    assert cs.layer_lengths() == ce.layer_lengths()
    assert cs.total_bytes() == ce.total_bytes()
    # and the last step equals a full forward over the whole sequence (no cache)
    seq = torch.cat([ids, ts], 1)
    with torch.no_grad():
        full = m(input_ids=seq, attention_mask=torch.cat([mask, torch.ones_like(ts)], 1)).logits[:, -1]
    torch.testing.assert_close(ls[:, -1], full, atol=1e-4, rtol=1e-4)


def test_static_decode_of_a_sliding_window_model_and_without_a_hint():
    """Mistral's window masks by position; a cache with no max_length grows in chunks and the step stays exact."""
    m = _model(MoDConfig(layers=[1, 3], sink_tokens=1), arch="mistral", layers=4)
    ids, mask = _batch(2, 9, True)
    le, te, _ = _decode(m, ids, mask, 10, "eager")
    ls, ts, cs = _decode(m, ids, mask, 10, "static")
    torch.testing.assert_close(ls, le, atol=1e-5, rtol=1e-5)
    assert torch.equal(ts, te)


def test_generate_with_static_decode_equals_eager_and_sizes_the_cache_once():
    m = _model(SEMANTICS["hold"])
    ids, mask = _batch(4, 8, True)
    outs, caches = {}, {}
    for decode in ("eager", "static", "cuda_graphs"):  # cuda_graphs decodes as static on a CPU model
        m.set_mod_config(dataclasses.replace(m.mod_config, decode=decode))
        cache = MoDCache(m.config.num_hidden_layers)
        outs[decode] = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                                  cache=cache, pad_token_id=0)
        caches[decode] = cache
    assert torch.equal(outs["static"], outs["eager"]) and torch.equal(outs["cuda_graphs"], outs["eager"])
    st = caches["static"]
    assert st.max_length == 8 + 9 - 1 and not st.static.graphs  # the last new token is never fed back
    # sized once for the whole generation: a dense layer's buffer holds exactly what it stored, no growth slack
    assert st.layers[0].k.shape[2] == st.layers[0].bound == 16
    assert all(L.k.shape[2] >= L.bound for L in st.layers if L.k is not None)


def test_buffers_keep_their_addresses_from_step_to_step():
    m = _model(SEMANTICS["keep+sink"])
    m.set_mod_config(dataclasses.replace(m.mod_config, decode="static"))
    ids, mask = _batch(2, 6, True)
    cache = MoDCache(m.config.num_hidden_layers, max_length=6 + 8)
    seen = set()
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, cache=cache)
        for _ in range(8):
            tok = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            out = m(input_ids=tok, attention_mask=mask, cache=cache)
            dec = cache.static
            seen.add((dec._key[-1], tuple(t.data_ptr() for t in dec.st.values()),
                      tuple(L.length.data_ptr() for L in cache.layers if L.k is not None)))
    assert len(seen) == 1, "a static buffer moved between steps: a captured graph would read stale memory"


@pytest.mark.parametrize("B", [1, 4])
def test_static_step_syncs_once_per_routed_layer_at_any_batch(B):
    cfg = dataclasses.replace(SEMANTICS["drop"], decode="static")
    for layers, routed in ((6, [1, 2, 4]), (10, [1, 2, 4])):
        m = _model(dataclasses.replace(cfg, layers=routed), layers=layers)
        ids, mask = _batch(B, 8, B > 1)
        cache = MoDCache(layers, max_length=20)
        with torch.no_grad():
            out = m(input_ids=ids, attention_mask=mask, cache=cache)
            tok = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            m(input_ids=tok, attention_mask=mask, cache=cache)  # the first static step prepares the buffers
            tok = torch.ones_like(tok)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)

            def step():
                m(input_ids=tok, attention_mask=mask, cache=cache)
            assert count_syncs(step) <= len(routed), (layers, B)


def test_dense_baseline_through_the_same_static_path_equals_the_dense_model():
    """routing_disabled() + decode 'static': the dense model decoded by the same pieces (the benchmark's fair
    baseline for graphs) gives the HF model's own logits."""
    dense = tiny_model(layers=4).eval()
    m = modify(tiny_model(layers=4), MoDConfig(layers=[1, 2], decode="static")).eval()
    ids, mask = _batch(2, 7, True)
    cache = MoDCache(4)
    with torch.no_grad(), m.routing_disabled():
        got = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, cache=cache)
    assert cache.static is not None and cache.static.routed == [] and len(cache.static.writers) == 4
    want = dense.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4, rtol=1e-4)


def test_an_eager_call_between_static_steps_is_read_by_the_next_static_step():
    m = _model(SEMANTICS["hold"])
    ids, mask = _batch(1, 8, False)
    want, _, _ = _decode(m, ids, mask, 6, "eager")
    m.set_mod_config(dataclasses.replace(m.mod_config, decode="static"))
    cache = MoDCache(m.config.num_hidden_layers)
    got = []
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, cache=cache)
        for t in range(6):
            tok = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            if t == 3:  # one eager step in the middle (as with gradients on)
                with torch.enable_grad():
                    out = m(input_ids=tok, attention_mask=mask, cache=cache)
                assert cache.static.stale  # the eager step wrote the history: the next static step re-reads it
            else:
                out = m(input_ids=tok, attention_mask=mask, cache=cache)
            got.append(out.logits[:, -1].detach())
    torch.testing.assert_close(torch.stack(got, 1), want, atol=1e-5, rtol=1e-5)


@pytest.fixture
def recorded_graphs(monkeypatch):
    """CUDA graphs on CPU, for their logic: warm-up runs the piece, capture records it (nothing runs when made, as
    with torch.cuda.graph) and each replay runs the recording. A real capture bakes in the span each layer attends:
    a replay checks that every layer it attends has the span it had when captured. Yields the counts."""
    from mod_train.mod import graphs as G
    calls = {"warmup": 0, "capture": 0, "replay": 0}
    baked = {"spans": None}

    def warmup(fns):
        calls["warmup"] += 1
        for f in fns:
            f()

    def capture(fns, pool):
        calls["capture"] += 1
        spans = dict(getattr(fns[0], "func", fns[0]).__self__.spans)

        def replay():
            calls["replay"] += 1
            baked["spans"] = spans
            try:
                for f in fns:
                    f()
            finally:
                baked["spans"] = None
        return replay
    attention = G.StaticDecoder._attention

    def checked(self, i, x, write):
        assert baked["spans"] is None or baked["spans"][i] == self.spans[i], \
            f"layer {i}: a capture for span {baked['spans'][i]} replayed at span {self.spans[i]}"
        return attention(self, i, x, write)
    monkeypatch.setattr(G.StaticDecoder, "warmup", staticmethod(warmup))
    monkeypatch.setattr(G.StaticDecoder, "capture", staticmethod(capture))
    monkeypatch.setattr(G.StaticDecoder, "_attention", checked)
    monkeypatch.setattr(G.torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(G, "on_cuda", lambda model: True)
    return calls


def test_graph_runner_warms_up_captures_once_and_replays(recorded_graphs):
    """The capture logic on CPU: a piece's first call runs directly (the warm-up), its second is captured and every
    later one replays the capture; new settings drop the captures. The tokens equal the static step's."""
    calls = recorded_graphs
    m = _model(SEMANTICS["keep+sink"])
    ids, mask = _batch(2, 8, True)
    want, wt, _ = _decode(m, ids, mask, 6, "static", max_length=14)
    m.set_mod_config(dataclasses.replace(m.mod_config, decode="cuda_graphs"))
    cache = MoDCache(m.config.num_hidden_layers, max_length=20)  # room for one more step below
    got, toks = [], []
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, cache=cache)
        for t in range(6):
            tok = out.logits[:, -1:].argmax(-1)
            toks.append(tok)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            out = m(input_ids=tok, attention_mask=mask, cache=cache)
            got.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(got, 1), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat(toks, 1), wt)
    dec = cache.static
    pieces = len([p for p in dec.plan if p[0] == "piece"])  # 4: before, between and after the 3 routed layers
    assert pieces == 4 and calls["capture"] == len(dec._g) >= pieces
    assert calls["warmup"] >= calls["capture"]  # every captured piece was warmed up first
    assert calls["replay"] >= 4 * pieces  # steps 2..6 replay every piece
    # new settings: the captures are dropped and made again
    key_before = dec._key
    m.set_mod_config(dataclasses.replace(m.mod_config, layer_thresholds={1: 0.4}))
    with torch.no_grad():
        m(input_ids=tok, attention_mask=torch.cat([mask, torch.ones_like(tok)], 1), cache=cache)
    assert dec._g == {} and len(dec._warm) >= pieces and dec._key[-1] == key_before[-1]  # same buffers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", ["drop", "keep+sink", "hold"])
def test_cuda_graph_decode_equals_the_static_step(name):  # pragma: no cover - runs where CUDA exists
    m = _model(SEMANTICS[name]).cuda()
    ids, mask = _batch(4, 10, True)
    ids, mask = ids.cuda(), mask.cuda()
    ls, ts, _ = _decode(m, ids, mask, 12, "static", max_length=22)
    lg, tg, cg = _decode(m, ids, mask, 12, "cuda_graphs", max_length=22)
    assert cg.static.graphs and cg.static._g, "no graph was captured"
    torch.testing.assert_close(lg, ls, atol=1e-4, rtol=1e-4)
    assert torch.equal(tg, ts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_are_replayed_for_the_next_request_on_a_reset_cache():  # pragma: no cover - needs CUDA
    m = _model(SEMANTICS["hold"]).cuda()
    first, mask1 = (t.cuda() for t in _batch(2, 12, True))
    second = torch.randint(1, 128, (2, 10), device="cuda")
    mask2 = torch.ones_like(second)
    cache = MoDCache(m.config.num_hidden_layers)
    _generate(m, first, mask1, "cuda_graphs", cache, n=8)
    graphs = dict(cache.static._g)
    assert graphs, "no graph was captured"
    cache.reset()
    got = _generate(m, second, mask2, "cuda_graphs", cache, n=8)
    assert all(cache.static._g[k] is g for k, g in graphs.items())
    want = _generate(m, second, mask2, "static", n=8)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_real_failed_capture_restores_the_stream_and_decodes_on(monkeypatch, capsys):  # pragma: no cover - CUDA
    """A host sync inside a piece (not allowed in a CUDA graph): the capture fails, the caller's stream is current
    again, and decoding goes on equal to 'static', with one line naming the sync's error."""
    from mod_train.mod import graphs as G
    head = G.StaticDecoder._head

    def syncing(self):
        head(self)
        float(self.st["logits"].sum())  # a host sync
    monkeypatch.setattr(G.StaticDecoder, "_head", syncing)
    m = _model(SEMANTICS["keep+sink"]).cuda()
    ids, mask = (t.cuda() for t in _batch(2, 8, True))
    stream = torch.cuda.current_stream()
    got = _generate(m, ids, mask, "cuda_graphs", n=8)
    assert torch.cuda.current_stream() == stream and m._mod_graph_error
    assert "CUDA graph capture of decode piece" in capsys.readouterr().out
    want = _generate(m, ids, mask, "static", n=8)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


def test_new_settings_between_static_steps_are_taken():
    """Thresholds changed mid-generation (set_mod_config) reach the static step (a captured graph bakes them in,
    so the state is made again), as they reach the eager one."""
    m = _model(SEMANTICS["drop"])
    ids, mask = _batch(2, 8, True)
    res = {}
    for decode in ("eager", "static"):
        m.set_mod_config(dataclasses.replace(SEMANTICS["drop"], decode=decode))
        cache, msk, out, got = MoDCache(m.config.num_hidden_layers, max_length=20), mask, None, []
        with torch.no_grad():
            out = m(input_ids=ids, attention_mask=msk, cache=cache)
            for t in range(6):
                if t == 3:
                    m.set_mod_config(dataclasses.replace(m.mod_config, layer_thresholds={1: 0.9, 2: 0.05}))
                tok = out.logits[:, -1:].argmax(-1)
                msk = torch.cat([msk, torch.ones_like(tok)], 1)
                out = m(input_ids=tok, attention_mask=msk, cache=cache)
                got.append(out.logits[:, -1])
        res[decode] = (torch.stack(got, 1), cache.layer_lengths())
    torch.testing.assert_close(res["static"][0], res["eager"][0], atol=1e-5, rtol=1e-5)
    assert res["static"][1] == res["eager"][1]


def _generate(m, ids, mask, decode, cache=None, n=6):
    """Greedy generate() -> (tokens, logits of every step)."""
    m.set_mod_config(dataclasses.replace(m.mod_config, decode=decode))
    out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, cache=cache,
                     min_new_tokens=n, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


def _same(a, b):
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["keep+sink", "hold"])
def test_a_reset_cache_replays_its_graphs_for_the_next_request(recorded_graphs, name):
    """MoDCache.reset() keeps the buffers: the next request of the same batch size that fits them replays the graphs
    captured for the first one (none captured again) and decodes as a fresh eager cache does; a request of another
    batch size, or a longer one, re-sizes or grows the buffers and is captured anew, also exactly."""
    calls = recorded_graphs
    m = _model(SEMANTICS[name])
    first, mask1 = _batch(2, 12, True)
    g = torch.Generator().manual_seed(5)
    second = torch.randint(1, 128, (2, 10), generator=g)  # shorter: fits the buffers of the first
    mask2 = torch.ones_like(second)
    mask2[0, :3] = 0
    cache = MoDCache(m.config.num_hidden_layers)
    _generate(m, first, mask1, "cuda_graphs", cache)
    dec, ptrs = cache.static, [L.k.data_ptr() for L in cache.layers if L.k is not None]
    before = dict(dec._g)
    assert before and calls["capture"] == len(before)
    cache.reset()
    assert cache.seen == 0 and all(L.bound == 0 and not bool(L.valid.any()) for L in cache.layers if L.k is not None)
    replays = calls["replay"]
    got = _generate(m, second, mask2, "cuda_graphs", cache)
    want = _generate(m, second, mask2, "eager")
    _same(got, want)
    # replayed, not captured again (a piece the first request never ran twice is captured now, once)
    assert cache.static is dec and all(dec._g[k] is f for k, f in before.items()) and calls["replay"] > replays
    assert calls["capture"] == len(dec._g)
    assert [L.k.data_ptr() for L in cache.layers if L.k is not None] == ptrs
    captured = calls["capture"]
    for ids, msk in ((first[:1], mask1[:1]), (torch.cat([first, first], 1), torch.cat([mask1, mask1], 1))):
        cache.reset()  # batch 1, then a request longer than the buffers
        _same(_generate(m, ids, msk, "cuda_graphs", cache), _generate(m, ids, msk, "eager"))
    assert calls["capture"] > captured


def test_captures_are_kept_per_span_and_replayed_by_the_next_request(recorded_graphs, monkeypatch):
    """Spans of 4+ slots: a generation crosses several, each captured for its own spans (a replay never runs at
    another span: checked by the fixture); the next request on the reset cache starts at shorter spans and replays
    the captures the first request made there, so it captures less than the first."""
    from mod_train.mod import graphs as G
    monkeypatch.setattr(G, "CHUNK", 4)
    calls = recorded_graphs
    m = _model(SEMANTICS["keep+sink"])
    ids, mask = _batch(2, 6, True)
    cache = MoDCache(m.config.num_hidden_layers)
    first = _generate(m, ids, mask, "cuda_graphs", cache, n=20)
    _same(first, _generate(m, ids, mask, "eager", n=20))
    n_first = calls["capture"]
    assert n_first > 4 * 2 and len({k[1] for k in cache.static._g}) > 2  # several spans captured
    cache.reset()
    replays = calls["replay"]
    second = _generate(m, ids[:, 2:], mask[:, 2:], "cuda_graphs", cache, n=20)
    _same(second, _generate(m, ids[:, 2:], mask[:, 2:], "eager", n=20))
    assert calls["replay"] - replays > 20 and calls["capture"] - n_first < n_first // 2


def test_a_reset_cache_prefills_as_a_fresh_one(monkeypatch):
    """The prefill of a reset cache is plain causal attention, as on a fresh cache (its buffers exist, but hold
    nothing); a reset cache taken by another batch size, where a layer stores nothing at the prefill, decodes."""
    from mod_train.mod import layer as Lmod
    m = _model(SEMANTICS["drop"])
    ids, mask = _batch(2, 12, False)
    flags = []
    attend = Lmod.attend

    def recording(q, k, v, qs, ks, scaling, self_attention, window=None):
        flags.append(self_attention)
        return attend(q, k, v, qs, ks, scaling, self_attention, window)
    monkeypatch.setattr(Lmod, "attend", recording)
    cache = MoDCache(m.config.num_hidden_layers)
    with torch.no_grad():
        m(input_ids=ids, attention_mask=mask, cache=cache)
        fresh, flags[:] = list(flags), []
        cache.reset()
        m(input_ids=ids, attention_mask=mask, cache=cache)
    assert flags == fresh and flags.count(True) >= 3, (fresh, flags)  # the 3 dense layers at least
    # another batch size on the reset cache, and a one-token prompt that one routed layer does not run
    m.set_mod_config(dataclasses.replace(m.mod_config, layer_thresholds={1: 0.9999}))
    for decode in ("static", "eager"):
        cache.reset()
        out = _generate(m, ids[:1, :1], mask[:1, :1], decode, cache, n=8)
        assert cache.layers[1].k is None or cache.layers[1].k.shape[0] == 1
        if decode == "static":
            got = out
    _same(got, out)


def test_spans_grow_by_powers_of_two_and_stay_exact(monkeypatch):
    """A static step attends each layer's stored slots rounded up to a power of two (not its whole buffer): with
    spans of 4+ slots, a generation crosses several spans and equals the eager one; a short request on a reset
    cache holding a long request's buffers attends less than those buffers."""
    from mod_train.mod import graphs as G
    monkeypatch.setattr(G, "CHUNK", 4)
    m = _model(SEMANTICS["drop"])
    ids, mask = _batch(2, 6, True)
    want, wt, _ = _decode(m, ids, mask, 14, "eager")
    got, gt, cache = _decode(m, ids, mask, 14, "static", max_length=40)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(gt, wt)
    dec = cache.static
    for i in dec.writers:  # the last step's span: a power of two that covered what the layer held then
        n, bound = dec.spans[i], cache.layers[i].bound
        assert n & (n - 1) == 0 and bound <= n < 2 * max(bound, 4), (i, n, bound)
    assert max(dec.spans.values()) < max(L.k.shape[2] for L in cache.layers if L.k is not None)


def test_a_failed_capture_falls_back_to_static_decoding_and_says_so_once(recorded_graphs, monkeypatch, capsys):
    """A piece that cannot be captured (an op not allowed in a CUDA graph on some setup) does not break generation:
    the step is made without graphs, exactly as 'static', one line says so, and later generations do not retry."""
    from mod_train.mod import graphs as G

    def failing(fns, pool):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
    monkeypatch.setattr(G.StaticDecoder, "capture", staticmethod(failing))
    m = _model(SEMANTICS["keep+sink"])
    ids, mask = _batch(2, 8, True)
    want = _generate(m, ids, mask, "static")
    got = _generate(m, ids, mask, "cuda_graphs")
    _same(got, want)
    out = capsys.readouterr().out
    assert out.count("CUDA graph capture of decode piece") == 1 and "operation not permitted" in out
    assert "more detail" not in out and m._mod_graph_error
    cache = MoDCache(m.config.num_hidden_layers)
    _same(_generate(m, ids, mask, "cuda_graphs", cache), want)
    assert not cache.static.graphs and "capture of decode piece" not in capsys.readouterr().out
