"""launch/ablate.py end to end on a tiny model and tiny local data: every variant trains on the same tokens with
the project's trainer (one plain process), top-k gets the threshold run's realised rate as its capacity, and the
table lists every variant."""
import json
import os
import subprocess
import sys
from pathlib import Path

from harness import write_tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def _ablate(tmp_path, *args):
    """Run launch/ablate.py on a tiny model and recipe; returns (process, output directory)."""
    model, recipe = write_tiny_recipe(tmp_path, n_docs=40, seq_len=32)
    with open(recipe, "a") as f:
        f.write("heldout:\n  titles: [prose3, code5, prose7]\n")
    out = tmp_path / "abl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "launch/ablate.py", "--model", model, "--recipe", recipe, "--out", str(out),
           "--seq_len", "32", "--eval_length", "32", "--eval_docs", "2", "--progress", "false", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p, out


def test_ablation_tiny(tmp_path):
    p, out = _ablate(tmp_path, "--variants", "[dense,threshold,topk,threshold_noaux,threshold_block,threshold_alpha]",
                     "--steps", "3", "--router_lr", "0.05", "--lr", "1e-3", "--warmup_steps", "1",
                     "--eval_tokens", "96", "--prefill_tokens", "48", "--target_rate", "0.5", "--save_models", "true")
    res = json.loads((out / "results.json").read_text())
    v = res["variants"]
    assert list(v) == ["dense", "threshold", "threshold_noaux", "threshold_block", "threshold_alpha", "topk",
                       "topk_noncausal_eval"]
    assert v["topk"]["mod"]["capacity"] == v["threshold"]["rate"]
    assert v["threshold"]["mod"]["target_rate"] == 0.5 and v["threshold_noaux"]["mod"]["alpha"] == 0.0
    assert v["threshold_block"]["mod"]["gate"] == "block" and v["threshold"]["mod"]["gate"] == "submodule"
    assert v["dense"]["rate"] == 1.0 and not v["dense"]["trained"]
    # same tokens: every trained variant logged the same number of steps from the same data
    firsts = set()
    for name in ("threshold", "threshold_noaux", "threshold_block", "threshold_alpha", "topk"):
        assert v[name]["status"] == "completed" and v[name]["final_lm_loss"] is not None
        assert not (out / name / "checkpoints").exists()  # deleted unless --keep_checkpoints
        assert (out / name / "model" / "config.json").is_file()
        firsts.add(round(v[name]["first_lm_loss"], 4))
    for r in v.values():
        assert r["ppl"] > 1 and r["kv_bytes"] > 0 and r["prefill_s"] > 0 and 0 <= r["rate"] <= 1
    # KV bytes of the dense row are the full cache; MoD rows store no more than that
    assert all(r["kv_bytes"] <= v["dense"]["kv_bytes"] for r in v.values())
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 1 + 7  # header + one row per variant
    assert "top-k MoD, matched capacity" in table and "whole-block gate" in table and "no aux loss" in table
    assert "| variant | ppl | rate | KV / dense |" in p.stdout


def test_ablation_from_probe_start(tmp_path):
    """--init probe --init_rate: each variant starts from routers fitted to the importance probe at that rate."""
    from mod_train.train.logger import read_metrics
    _, out = _ablate(tmp_path, "--variants", "[threshold_noaux]", "--steps", "1", "--router_lr", "1e-9", "--lr", "1e-9",
                     "--warmup_steps", "0", "--eval_tokens", "64", "--prefill_tokens", "32", "--init", "probe",
                     "--init_rate", "0.4")
    assert (out / "threshold_noaux" / "init_model" / "config.json").is_file()
    first = read_metrics(out / "threshold_noaux" / "metrics.jsonl")[1]
    assert first["routing/rate_mean"] < 0.8, first  # dense init would run every token (rate 1.0)
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["init_rate"] == 0.4 and 0.1 < res["variants"]["threshold_noaux"]["rate"] < 0.8


def test_recovery_variants_and_the_baselines_that_decide(tmp_path):
    """The recovery recipe (KD, x1 gate, global budget held by the thresholds, start at static pruning) as
    `threshold`, a one-factor variant from variant_overrides, and the baselines: static depth pruning at the
    matched compute, untrained and trained on the same tokens with the same objective, and the dense model
    trained the same. Pruning deletes the layers of lowest block influence, as many as `threshold` skips."""
    p, out = _ablate(tmp_path, "--variants", "[threshold,lm,lora,pruned,pruned_trained,dense_trained]", "--steps", "2",
                     "--lr", "1e-3", "--warmup_steps", "0", "--eval_tokens", "64", "--prefill_tokens", "32",
                     "--init", "allocated", "--init_rate", "0.5", "--target_rate", "0.5",
                     "--mod_overrides", '{"layers": "all", "gate_form": "ste", "target_scope": "global"}',
                     "--train_overrides", '{"objective": "kd", "rate_control": "thresholds"}',
                     "--variant_overrides", '{"lm": {"train": {"objective": "lm"}}, "lora": {"train": {"trainable": "lora"}}}')
    res = json.loads((out / "results.json").read_text())
    v = res["variants"]
    assert list(v) == ["threshold", "lm", "lora", "dense_trained", "pruned", "pruned_trained"]
    assert v["lora"]["train"]["trainable"] == "lora" and v["lora"]["ppl"] != v["threshold"]["ppl"] > 1
    assert v["threshold"]["train"]["objective"] == "kd" and v["lm"]["train"]["objective"] == "lm"
    assert v["threshold"]["final_kd_loss"] is not None and v["lm"]["final_kd_loss"] is None
    assert v["threshold"]["init"] == "allocated" and v["threshold"]["mod"]["gate_form"] == "ste"
    n = round(len(v["threshold"]["rates"]) * (1 - v["threshold"]["rate"]))
    assert len(v["pruned"]["layers_deleted"]) == n == res["pruning"]["count"]
    assert v["pruned"]["layers"] == 4 - n and not v["pruned"]["trained"] and v["pruned_trained"]["trained"]
    assert v["pruned_trained"]["final_kd_loss"] is not None and v["dense_trained"]["final_kd_loss"] < 1e-6
    assert "static depth pruning, matched compute" in (out / "table.md").read_text()
    # the quality-vs-compute curve reads these results: MoD and both pruning rows at the same budget
    from mod_train.experiments.curve import CurveConfig, run_curve
    rows = run_curve(CurveConfig(results=[str(out / "results.json")], out=str(tmp_path / "curve")))
    by = {r["series"]: r for r in rows}
    assert sorted(by) == ["mod", "pruned", "pruned_trained"]
    assert by["pruned"]["kv_saving"] == by["pruned_trained"]["kv_saving"] == 4 / (4 - n)
    assert by["mod"]["kv_saving"] == 1 / v["threshold"]["kv_ideal"] and by["mod"]["ppl"] == v["threshold"]["ppl"]
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert "static pruning, trained the same" in (tmp_path / "curve.md").read_text()


def test_routed_start_with_sink_kept_kv_and_rate_hold(tmp_path):
    """Issue 17's variants through the ablation: the routed start writes the per-layer allocation, the run trains
    with it held (rate_hold window), sinks and kept K/V; the held rate is the budget; the curve draws the variant
    as its own series."""
    _, out = _ablate(tmp_path, "--variants", "[dense,rk,pruned_trained]", "--steps", "2", "--lr", "1e-3",
                     "--warmup_steps", "0", "--eval_tokens", "64", "--prefill_tokens", "32", "--init", "allocated",
                     "--init_rate", "0.5", "--target_rate", "0.5", "--prune_layers", "2",
                     "--mod_overrides", '{"layers": "all", "gate_form": "ste", "target_scope": "global"}',
                     "--train_overrides", '{"objective": "kd", "rate_control": "thresholds"}',
                     "--variant_overrides", '{"rk": {"init": "routed", "mod": {"sink_tokens": 1, "skipped_kv": "keep",'
                     ' "rate_hold": "window", "rate_window": 16}}}')
    v = json.loads((out / "results.json").read_text())["variants"]
    saved = json.loads((out / "rk" / "init_model" / "config.json").read_text())["mod"]
    assert saved["rate_hold"] == "window" and len(saved["layer_rates"]) == 4
    assert v["rk"]["mod"]["skipped_kv"] == "keep" and v["rk"]["mod"]["layer_rates"] == saved["layer_rates"]
    assert abs(v["rk"]["rate"] - 0.5) < 0.15  # 32-token windows: the sink and short windows run a little more
    assert v["rk"]["kv_ideal"] == 1.0 - sum(p >= 1 for p in saved["layer_thresholds"].values()) / 4
    from mod_train.experiments.curve import CurveConfig, run_curve
    rows = run_curve(CurveConfig(results=[str(out / "results.json")], mod_variant="none",
                                 extra_variants={"rk": "routed, sink 1, kept K/V, held"}, out=str(tmp_path / "c")))
    assert [r["series"] for r in rows] == ["extra:rk", "pruned_trained"]
    assert "routed, sink 1, kept K/V, held" in (tmp_path / "c.md").read_text()


def test_table_without_a_dense_row_says_so_instead_of_nan():
    """A run of MoD variants alone (the dense row in another run) prints '-' for KV / dense, never nan."""
    from mod_train.experiments.ablate import render
    row = {"ppl": 90.0, "rate": 0.5, "kv_bytes": 100, "kv_ideal": 0.57, "mod": {}, "layers": 4,
           "ppl_unseen": 200.0, "rate_unseen": 0.5, "kv_bytes_unseen": 90}
    res = {"config": {"eval_length": 1024, "steps": 30, "micro_batch_size": 1, "seq_len": 512, "prefill_tokens": 1024},
           "docs": [{"tokens": 10, "source": "a"}], "docs_unseen": [{"tokens": 10, "source": "b"}],
           "variants": {"h7d": row}}
    line = render(res).splitlines()[-1]
    assert "nan" not in line and line.startswith("| h7d | 90.000 | 0.500 | - | 200.000 | 0.500 | - | 0.570 |")
