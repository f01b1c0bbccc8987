"""Evaluation: windowed perplexity equals a hand-computed loss; the report (tables, PNGs, json) from a tiny
model and tiny local held-out documents; launch/eval.py end to end on a saved MoD model."""
import json
import math
import random

import pytest
import torch

from conftest import randomize_routers, tiny_model
from harness import make_tiny_books_setup

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _docs(n, lo, hi, seed):
    rng = random.Random(seed)
    words = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
             "def return class import self if else while yield").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny dense model + tokenizer, a recipe with 4 held-out documents (2 evaluated, 2 for calibration)."""
    d = tmp_path_factory.mktemp("eval")
    docs = _docs(12, 150, 400, 0)
    model, recipe = make_tiny_books_setup(d, docs, name="tiny-eval")
    return d, model, str(recipe)


def _manual_ppl(model, docs, L):
    nll, n = 0.0, 0
    for ids in docs:
        ids = torch.tensor(ids)
        for s in range(0, len(ids), L):
            w = ids[s:s + L][None]
            if w.shape[1] < 2:
                continue
            with torch.no_grad():
                logits = model(input_ids=w).logits[0, :-1].double()
            lp = torch.log_softmax(logits, -1)
            nll -= float(lp[torch.arange(w.shape[1] - 1), w[0, 1:]].sum())
            n += w.shape[1] - 1
    return math.exp(nll / n), n


@pytest.mark.parametrize("kind", ["dense", "mod"])
def test_perplexity_equals_exp_mean_token_loss(kind):
    from mod_train import MoDConfig, modify
    from mod_train.eval import RoutingStats, perplexity
    model = tiny_model(layers=4, seed=1)
    if kind == "mod":
        model = randomize_routers(modify(model, MoDConfig(layers="odd")), std=2.0).eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (70, 33, 5)]
    st = RoutingStats()
    res = perplexity(model, docs, 32, st)
    ref, n = _manual_ppl(model, docs, 32)
    assert res.tokens == n == (31 + 31 + 5) + (31 + 0) + 4  # 70 = 32+32+6, 33 = 32+1 (1-token window dropped), 5
    assert res.ppl == pytest.approx(ref, rel=1e-5)
    if kind == "mod":
        assert set(st.layers) == {1, 3}
        rates = [s.rate for s in st.layers.values()]
        assert all(0.05 < r < 0.95 for r in rates), rates  # both kinds of tokens: the routed path was exercised
        # rates equal the model's own routing output, token weighted over the windows
        sel = {1: 0, 3: 0}
        tot = 0
        for ids in docs:
            for s in range(0, len(ids), 32):
                w = torch.tensor(ids[s:s + 32])[None]
                if w.shape[1] < 2:
                    continue
                with torch.no_grad():
                    out = model(input_ids=w)
                for j in sel:
                    sel[j] += float(out.routing[j]["rate"]) * w.shape[1]
                tot += w.shape[1]
        for j in sel:
            assert st.layers[j].rate == pytest.approx(sel[j] / tot, abs=1e-6)
        assert st.sample_map.shape == (2, 32)


def _check_png(path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path
    import matplotlib.image
    assert matplotlib.image.imread(str(path)).ndim == 3


def test_eval_report(tiny_setup, tmp_path):
    """Report on a MoD model with token-dependent gates: tables, PNGs, json; calibration on other documents."""
    from transformers import AutoModelForCausalLM
    from mod_train import MoDConfig, modify
    from mod_train.eval import EvalConfig, run_eval
    _, model, recipe = tiny_setup
    mod = randomize_routers(modify(AutoModelForCausalLM.from_pretrained(model), MoDConfig(layers="odd")), std=300.0,
                            bias=2.0)
    mod.save_pretrained(tmp_path / "mod")
    out = tmp_path / "report"
    res = run_eval(EvalConfig(dense=model, mod=str(tmp_path / "mod"), recipe=recipe, out=str(out), lengths=[32, 128],
                              max_docs=2, targets=[1.0, 0.5, 0.25], calib_docs=2, calib_tokens=256, progress=False))
    assert [d["title"] for d in res["docs"]] == ["doc1", "doc4"]
    assert {d["title"] for d in res["calibration_docs"]} == {"doc7", "doc9"}  # never the evaluated ones
    for L in ("32", "128"):
        r = res["ppl"][L]
        assert 0.5 < r["mod"]["rate"] < 1.0 and r["dense"]["tokens"] == r["mod"]["tokens"] > 0
        assert math.isfinite(r["mod"]["ppl"]) and math.isfinite(r["dense"]["ppl"])
    assert res["prefill"]["mod"]["kv_bytes"] < res["prefill"]["dense"]["kv_bytes"]
    pts = res["sweep"]["points"]
    assert [p["target"] for p in pts] == [1.0, 0.5, 0.25]
    # target 1: p = 1e-12, every token runs except the few whose gate underflows (std=300 routers)
    assert pts[0]["rate"] > 0.97 and pts[0]["kv_measured"] > 0.97
    assert pts[0]["rate"] > pts[1]["rate"] > pts[2]["rate"] > 0
    for p in pts:  # measured KV follows the ideal 1 - rho (1 - r) (rho = 1/2); rates differ between docs a little
        assert p["kv_measured"] == pytest.approx(p["kv_ideal"], abs=0.15)
        assert abs(p["rate"] - p["target"]) < 0.2  # calibrated on other documents: close, not exact
    md = (out / "report.md").read_text()
    for head in ("## Perplexity", "## Routing per layer", "## KV cache and prefill",
                 "## Quality against KV memory", "| context | dense ppl | MoD ppl |", "| layer | rate @32 | rate @128 |"):
        assert head in md, head
    rows = [ln for ln in md.splitlines() if ln.startswith("| 32 |") or ln.startswith("| 128 |")]
    assert len(rows) == 2 and f"{res['ppl']['32']['dense']['ppl']:.3f}" in rows[0]
    assert sum(ln.startswith(("| 1 |", "| 3 |")) for ln in md.splitlines()) == 2  # routed layers 1 and 3
    assert sum(ln.startswith(("| 1.0 |", "| 0.5 |", "| 0.25 |")) for ln in md.splitlines()) == 3
    for name in ("rate_per_layer.png", "routing_map.png", "gate_hist.png", "quality_vs_kv.png",
                 "adaptivity_in_domain.png"):
        assert f"]({name})" in md
        _check_png(out / name)
    saved = json.loads((out / "results.json").read_text())
    assert saved["ppl"]["32"]["dense"]["ppl"] == pytest.approx(res["ppl"]["32"]["dense"]["ppl"])
    # how token-adaptive: the rates of the per-layer table at the longest context, no unseen text in this recipe
    ad = saved["adaptivity"]["in_domain"]
    assert saved["adaptivity"]["unseen"] is None and not (out / "adaptivity_unseen.png").exists()
    assert ad["rates"] == {j: v["rate"] for j, v in saved["routing"]["128"].items()}
    assert ad["kv_fraction"] == pytest.approx(1 - (1 - ad["mean_rate"]) / 2)  # 2 of 4 layers routed, KV dropped
    assert "## How token-adaptive is the routing" in md and "### In-domain text" in md
    assert f"- **{ad['verdict']}**" in md
    # the model's own routing is what the per-length tables show (the sweep restores its thresholds)
    assert saved["mod_config"]["layer_thresholds"] == {}


def test_launch_eval_untrained_conversion(tiny_setup, tmp_path, capsys):
    """launch/eval.py --mod_from_dense (router_init dense: every gate 0.95, all tokens run); whole documents,
    the dense ppl matches perplexity() computed directly."""
    import importlib.util
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    from mod_train.data import heldout_documents, load_recipe, load_tokenizer
    from mod_train.eval import perplexity
    _, dense_dir, recipe = tiny_setup
    spec = importlib.util.spec_from_file_location("eval_cli", Path(__file__).resolve().parents[1] / "launch/eval.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "r"
    assert cli.main(["--dense", dense_dir, "--mod_from_dense", "true", "--mod_overrides", '{"router_init": "dense"}',
                     "--recipe", recipe, "--out", str(out),
                     "--lengths", "[64]", "--max_docs", "1", "--targets", "[0.5]", "--progress", "false"]) == 0
    assert "report written" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["ppl"]["64"]["mod"]["rate"] == 1.0
    assert res["prefill"]["mod"]["kv_bytes"] == res["prefill"]["dense"]["kv_bytes"]
    ad = res["adaptivity"]["in_domain"]  # every token runs every routed layer: static, the dense model's KV
    assert ad["verdict"].startswith("static") and ad["n_full"] == 2 and ad["kv_fraction"] == 1.0
    assert len(res["sweep"]["points"]) == 1  # equal gates tie: calibration cannot split them (reported)
    assert "gates are (nearly) equal" in (out / "report.md").read_text()
    rec = load_recipe(recipe)
    tok = load_tokenizer(rec)
    ids = tok(heldout_documents(rec, 1)[0][2], add_special_tokens=False).input_ids
    assert res["docs"][0]["tokens"] == len(ids)  # the whole document
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert res["ppl"]["64"]["dense"]["ppl"] == pytest.approx(perplexity(dense, [ids], 64).ppl, rel=1e-6)
    _check_png(out / "rate_per_layer.png")


def test_unseen_domain_and_pruning_baseline_in_the_report(tiny_setup, tmp_path):
    """heldout.unseen: whole evaluation-only sources (never in the training stream) reported apart, with rates
    measured on them; static depth pruning at the MoD model's realised compute evaluated on the same text."""
    import json as _json
    from mod_train import MoDConfig, modify
    from mod_train.data import PackedStream, heldout_documents, load_recipe
    from mod_train.eval import EvalConfig, run_eval
    from transformers import AutoModelForCausalLM
    d, dense_dir, recipe = tiny_setup
    other = _docs(3, 200, 300, 7)
    with open(tmp_path / "other.jsonl", "w") as f:
        for i, t in enumerate(other):
            f.write(_json.dumps({"title": f"other{i}", "text": "zz " + t}) + "\n")
    rec_path = tmp_path / "recipe.yaml"
    rec_path.write_text(open(recipe).read() + f"  unseen:\n    - name: other\n      type: jsonl\n"
                        f"      path: {tmp_path / 'other.jsonl'}\n")
    rec = load_recipe(rec_path)
    unseen = heldout_documents(rec, domain="unseen")
    assert [t for t, _, _ in unseen] == ["other0", "other1", "other2"] and {s for _, s, _ in unseen} == {"other"}
    assert all(s == "books" for _, s, _ in heldout_documents(rec))
    stream = PackedStream(rec, split="train", seq_len=64, max_rows=30, drop_last=False)
    assert all(row["sources"] == ["books"] for row in stream)  # the training stream never reads them
    mod = randomize_routers(modify(AutoModelForCausalLM.from_pretrained(dense_dir),
                                   MoDConfig(layers="all", skipped_kv="keep")), std=3.0)
    mod.save_pretrained(tmp_path / "mod")
    res = run_eval(EvalConfig(dense=dense_dir, mod=str(tmp_path / "mod"), recipe=str(rec_path), out=str(tmp_path / "r"),
                              lengths=[32, 64], max_docs=2, targets=[], calib_docs=2, calib_tokens=64, progress=False))
    for key in ("ppl", "ppl_unseen"):
        for L in ("32", "64"):
            assert res[key][L]["dense"]["ppl"] > 1 and res[key][L]["pruned"]["ppl"] > 1
    rate = res["ppl_unseen"]["64"]["mod"]["rate"]
    assert res["pruning"]["count"] == round(len(mod.routed_layers) * (1 - rate)) and 0 < rate < 1
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## Perplexity on unseen domains (other" in report and "static pruning ppl" in report
    ad = res["adaptivity"]["unseen"]  # measured on the unseen text, rendered with it and in its own section
    assert ad["rates"] == {int(j): v["rate"] for j, v in res["routing_unseen"]["64"].items()}
    assert ad["mean_rate"] == pytest.approx(rate, abs=1e-6)  # every routed layer sees the same tokens
    assert ad["skipped_kv"] == "keep" and ad["kv_fraction"] == 1.0  # no layer off: skipped tokens keep their K/V
    assert f"Routing on this text: {ad['verdict']}" in report
    assert "### Unseen-domain text" in report and "### In-domain text" in report
    assert "](adaptivity_unseen.png)" in report
    _check_png(tmp_path / "r" / "adaptivity_unseen.png")
