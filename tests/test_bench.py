"""The efficiency benchmark at tiny sizes on the real SmolLM2 (figures come from launch/bench.py runs, not from
here): the serving mode's rows and counts, and an honest n/a where CPU peak memory was not measured."""
from __future__ import annotations

import json

import pytest

from mod_train.eval.bench import BenchConfig, run_bench, table


def test_serve_rows_count_the_sequences_that_fit(smollm2_dir, tmp_path):
    cfg = BenchConfig(dense=str(smollm2_dir), lengths=[64], rates=[0.5], decode_tokens=2, serve=True,
                      serve_memory_gb=0.05, serve_max_batch=3, out=str(tmp_path))
    res = run_bench(cfg, progress=False)
    d, m = res["serve"]
    assert (d["model"], m["model"]) == ("dense", "mod")
    budget = int(0.05 * 2**30)
    for r in (d, m):
        assert r["fit_seqs"] == int(budget // r["kv_bytes_per_seq"])  # CPU: no prefill working set counted
        assert r["batch"] == max(1, min(r["fit_seqs"], 3)) and r["tok_s_b1"] > 0 and r["tok_s_batch"] > 0
    assert m["kv_bytes_per_seq"] < d["kv_bytes_per_seq"] and m["fit_seqs"] >= d["fit_seqs"]
    assert m["fit_ratio"] == pytest.approx(m["fit_seqs"] / d["fit_seqs"])
    assert "| 64 | mod | 0.5 |" in table(res)
    assert json.loads((tmp_path / "bench.json").read_text())["serve"][1]["fit_seqs"] == m["fit_seqs"]


def test_peak_memory_not_measured_is_reported_as_na(smollm2_dir, tmp_path):
    cfg = BenchConfig(dense=str(smollm2_dir), lengths=[32], rates=[0.5], decode_tokens=1, repeats=1, memory=False,
                      out=str(tmp_path))
    res = run_bench(cfg, progress=False)
    row = res["rows"][0]
    assert row["peak_ratio"] is None and row["dense_peak_bytes"] is None
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["peak_ratio"] is None
    assert table(res).rstrip().endswith("| n/a |")


def test_serve_with_static_decode_times_the_dense_baseline_through_the_same_path(smollm2_dir, tmp_path):
    """--decode static: the dense row is the MoD model with routing off on a dense MoDCache, decoded by the same
    static step (the fair baseline for CUDA graphs); its KV is the dense model's."""
    base = dict(dense=str(smollm2_dir), lengths=[64], rates=[0.5], decode_tokens=3, serve=True,
                serve_memory_gb=0.05, serve_max_batch=2)
    eager = run_bench(BenchConfig(**base, out=str(tmp_path / "e")), progress=False)["serve"]
    static = run_bench(BenchConfig(**base, decode="static", out=str(tmp_path / "s")), progress=False)["serve"]
    for e, s in zip(eager, static):
        assert s["kv_bytes_per_seq"] == pytest.approx(e["kv_bytes_per_seq"], rel=1e-6)
        assert s["fit_seqs"] == e["fit_seqs"] and s["tok_s_b1"] > 0 and s["tok_s_batch"] > 0
    assert static[1]["rates"] == eager[1]["rates"]
    # one decode step profiled: the MoD step syncs at most once per routed layer, the dense one never
    n_routed = len(static[1]["rates"])
    for rows in (eager, static):
        assert rows[0]["syncs_step"] == 0 and 0 < rows[1]["syncs_step"] <= n_routed
        assert rows[0]["launches_step"] > 0 and rows[1]["launches_step"] > 0


def test_mod_settings_build_the_benchmarked_model(smollm2_dir, tmp_path):
    """--mod_settings: the main job's kind of model (kept K/V, a sink) is what gets measured; its routed layers
    store every token's K/V, so its KV equals the dense model's. A bad key fails before any model loads."""
    from mod_train import MoDConfigError
    cfg = BenchConfig(dense=str(smollm2_dir), lengths=[64], rates=[0.5], decode_tokens=1, serve=True,
                      serve_memory_gb=0.05, serve_max_batch=1, out=str(tmp_path),
                      mod_settings={"skipped_kv": "keep", "sink_tokens": 1})
    d, m = run_bench(cfg, progress=False)["serve"]
    assert m["kv_bytes_per_seq"] == pytest.approx(d["kv_bytes_per_seq"], rel=1e-6) and 0.3 < m["realised_rate"] < 0.7
    with pytest.raises(MoDConfigError, match="did you mean 'sink_tokens'"):
        run_bench(BenchConfig(dense="/nonexistent", mod_settings={"sink_token": 1}, out=str(tmp_path)))
    with pytest.raises(ValueError, match="mod_settings.decode: set how decode runs with --decode"):
        run_bench(BenchConfig(dense="/nonexistent", mod_settings={"decode": "static"}, out=str(tmp_path)))


def test_non_eager_decode_is_timed_after_its_warm_up_steps():
    """The static state and CUDA-graph captures (made at the first two steps, once per server lifetime) are not timed
    as decode tokens; eager decode is timed from its first step."""
    import torch

    from mod_train import MoDCache, MoDConfig, modify
    from mod_train.eval import bench as B

    from conftest import tiny_model
    for decode, calls in (("eager", 3), ("static", 3 + B.WARM_STEPS)):
        m = modify(tiny_model(layers=2), MoDConfig(layers=[1], decode=decode)).eval()
        seen = []

        class Counting:
            mod_config = m.mod_config

            def __call__(self, **kw):
                seen.append(kw["input_ids"].shape)
                return m(**kw)
        cache = MoDCache(2, max_length=20)
        with torch.no_grad():
            m(input_ids=torch.randint(1, 128, (1, 8)), cache=cache)
        s, tok = B._decode_loop(Counting(), torch.ones(1, 1, dtype=torch.long), cache, 3, torch.device("cpu"))
        assert len(seen) == calls and s > 0 and tok.shape == (1, 1), (decode, len(seen))
        assert (cache.static is not None) == (decode != "eager")


def test_prefill_profile_rows(smollm2_dir, tmp_path):
    """--profile: each length's dense and MoD prefill profiled once; busy time within the wall time, the MoD prefill
    syncs at least once per routed layer that runs (its one host decision) and the dense one never."""
    cfg = BenchConfig(dense=str(smollm2_dir), lengths=[64], rates=[0.5], decode_tokens=0, repeats=1, memory=False,
                      profile=True, out=str(tmp_path))
    res = run_bench(cfg, progress=False)
    row = res["rows"][0]
    d, m = row["dense_profile"], row["mod_profile"]
    for p in (d, m):
        assert 0 < p["busy_ms"] <= p["wall_ms"] and 0 <= p["idle_share"] < 1 and p["launches"] > 0 and p["top"]
    assert d["syncs"] == 0 and m["syncs"] >= 1
    md = table(res)
    assert "| 64 | dense |" in md and "| 64 | mod r 0.5 |" in md and "idle share" in md
