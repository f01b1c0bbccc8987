"""lm-evaluation-harness on the local held-out tasks: the task files are deterministic for a seed; lm-eval's accuracy
on a tiny MoD model equals the accuracy computed here from our own log-likelihoods of the same texts; the stock
`python -m lm_eval --model hf ... trust_remote_code=True --include_path` runs on a saved MoD directory; unknown task
names are one line."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import randomize_routers
from harness import make_tiny_books_setup
from test_eval import _docs


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    """A tiny dense model + tokenizer, a recipe whose 4 held-out documents are ~1500 words, and the local tasks."""
    from mod_train.data import load_recipe
    from mod_train.eval.local_tasks import write_local_tasks
    d = tmp_path_factory.mktemp("harness")
    model, recipe = make_tiny_books_setup(d, _docs(10, 1200, 1600, 0), name="tiny-harness")
    tasks = write_local_tasks(load_recipe(str(recipe)), d / "tasks", ["mod_choice", "mod_lastword"], 8, seed=0)
    return d, model, load_recipe(str(recipe)), tasks


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_local_tasks_deterministic_and_well_formed(tiny_tasks, tmp_path):
    from mod_train.eval.local_tasks import write_local_tasks
    _, _, recipe, tasks = tiny_tasks
    again = write_local_tasks(recipe, tmp_path / "a", ["mod_choice", "mod_lastword"], 8, seed=0)
    other = write_local_tasks(recipe, tmp_path / "b", ["mod_choice"], 8, seed=1)
    for name in ("mod_choice", "mod_lastword"):
        assert (again / f"{name}.jsonl").read_bytes() == (tasks / f"{name}.jsonl").read_bytes()
    assert (other / "mod_choice.jsonl").read_bytes() != (tasks / "mod_choice.jsonl").read_bytes()
    texts = {d["title"]: d["text"] for d in map(json.loads, (tasks.parent / "books.jsonl").read_text().splitlines())}
    held = "".join(texts[t] for t in ("doc1", "doc4", "doc7", "doc9"))
    for r in _rows(tasks / "mod_choice.jsonl"):
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert r["context"] + r["choices"][r["label"]] in held  # the true continuation is the text's own
    for r in _rows(tasks / "mod_lastword.jsonl"):
        word = r["target"][1:]
        assert r["target"] == " " + word and word.isalpha() and word in r["context"].split()
        assert r["context"] + r["target"] in held


def _ll(model, tok, context, cont):
    """log p(cont | context) and whether cont is the greedy continuation, from our own forward (lm-eval's
    convention: the continuation's tokens are those of context+cont after the context's tokens)."""
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + cont, add_special_tokens=False).input_ids
    n = len(whole) - len(ctx)
    ids = torch.tensor([whole])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, -n - 1:-1].double(), -1)
    tgt = ids[0, -n:]
    return float(lp[torch.arange(n), tgt].sum()), bool((lp.argmax(-1) == tgt).all())


def test_lm_eval_accuracy_equals_independent_loglikelihoods(tiny_tasks):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mod_train import MoDConfig, modify
    from mod_train.eval.lm_harness import evaluate, task_manager
    _, model_dir, _, tasks = tiny_tasks
    tok = AutoTokenizer.from_pretrained(model_dir)
    mod = randomize_routers(modify(AutoModelForCausalLM.from_pretrained(model_dir), MoDConfig(layers="odd")),
                            std=2.0).eval()
    names = ["mod_choice", "mod_lastword"]
    res = evaluate(mod, tok, names, task_manager(tasks, names), samples=True)
    choice = _rows(tasks / "mod_choice.jsonl")
    lls = [[_ll(mod, tok, r["context"], c)[0] for c in r["choices"]] for r in choice]
    theirs = {int(s["doc_id"]): [ll for ll, _ in s["filtered_resps"]] for s in res["mod_choice"]["samples"]}
    assert all(len(tok(r["context"] + c).input_ids) <= 512 for r in choice for c in r["choices"])  # no truncation
    for k, row in enumerate(lls):
        assert theirs[k] == pytest.approx(row, abs=1e-3)
    acc = sum(max(range(4), key=row.__getitem__) == r["label"] for row, r in zip(lls, choice)) / len(choice)
    assert res["mod_choice"]["metrics"]["acc"] == acc and res["mod_choice"]["examples"] == len(choice) == 8
    last = [_ll(mod, tok, r["context"], r["target"]) for r in _rows(tasks / "mod_lastword.jsonl")]
    assert res["mod_lastword"]["metrics"]["acc"] == sum(g for _, g in last) / len(last)
    assert res["mod_lastword"]["metrics"]["perplexity"] == pytest.approx(
        math.exp(-sum(ll for ll, _ in last) / len(last)), rel=1e-3)  # fp32 sums
    for name in names:  # realised execution rate of the MoD model, per task: random routers run about half
        assert 0.2 < res[name]["rate"] < 0.8


@pytest.mark.slow
def test_stock_lm_eval_cli_on_saved_mod_directory(tiny_tasks, tmp_path):
    """`python -m lm_eval --model hf --model_args pretrained=<dir>,trust_remote_code=True` on a saved MoD model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mod_train import MoDConfig, modify
    _, model_dir, _, tasks = tiny_tasks
    mod = randomize_routers(modify(AutoModelForCausalLM.from_pretrained(model_dir), MoDConfig(layers="odd")))
    mod.save_pretrained(tmp_path / "mod")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "mod")
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                        f"pretrained={tmp_path / 'mod'},trust_remote_code=True", "--include_path", str(tasks),
                        "--tasks", "mod_choice", "--limit", "4", "--device", "cpu", "--batch_size", "1",
                        "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mod_choice" in r.stdout and "acc" in r.stdout


def test_unknown_task_is_one_line(tiny_tasks):
    from mod_train.config import ConfigError
    from mod_train.eval.lm_harness import check_tasks, task_manager
    tm = task_manager(tiny_tasks[3], ["mod_choice"])
    check_tasks(["mod_choice", "mod_lastword"], tm)
    with pytest.raises(ConfigError, match=r"unknown task 'mod_chioce' \(did you mean 'mod_choice'\?\)") as e:
        check_tasks(["mod_chioce"], tm)
    assert "\n" not in str(e.value)


def _launch_eval():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("eval_cli", Path(__file__).resolve().parents[1] / "launch/eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_launch_eval_field_benchmarks_and_bad_input(tiny_tasks, tmp_path):
    """launch/eval.py --tasks a,b --passkey --needle --samples writes every new section, with heatmap PNGs; a folder
    that is no model, a dense folder given as the MoD model and a length beyond the window are one line each."""
    from mod_train import MoDConfig, modify
    from mod_train.config import ConfigError
    from transformers import AutoModelForCausalLM
    d, model_dir, _, _ = tiny_tasks
    mod = randomize_routers(modify(AutoModelForCausalLM.from_pretrained(model_dir), MoDConfig(layers="odd")))
    mod.save_pretrained(tmp_path / "mod")
    main = _launch_eval()
    base = ["--dense", model_dir, "--recipe", str(d / "recipe.yaml"), "--out", str(tmp_path / "ev"), "--lengths",
            "[128]", "--max_docs", "2", "--targets", "[]", "--progress", "false"]
    main(base + ["--mod", str(tmp_path / "mod"), "--tasks", "mod_choice,mod_lastword", "--task_examples", "4",
                 "--passkey", "true", "--needle", "true", "--retrieval_lengths", "[512]", "--retrieval_depths",
                 "[0.5]", "--retrieval_trials", "1", "--samples", "1", "--sample_prompt_tokens", "32",
                 "--sample_new_tokens", "8"])
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(res["lm_eval"]) == {"mod_choice", "mod_lastword"} and 0 < res["lm_eval"]["mod_choice"]["mod"]["rate"] < 1
    assert set(res["retrieval"]["results"]) == {"passkey", "kv"} and len(res["samples"]) == 1
    text = (tmp_path / "ev" / "report.md").read_text()
    for part in ("## lm-evaluation-harness", "## Long-context retrieval", "## Samples", "retrieval_mod.png"):
        assert part in text
    assert (tmp_path / "ev" / "retrieval_dense.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "empty").mkdir()
    bad = {"not a Hugging Face model directory": ["--mod", str(tmp_path / "empty")],
           "is not a MoD model": ["--mod", model_dir],
           r"exceed the window of the dense model \(max_position_embeddings 512\)":
               ["--mod", str(tmp_path / "mod"), "--passkey", "true", "--retrieval_lengths", "[512,4096]"]}
    for msg, args in bad.items():
        with pytest.raises(ConfigError, match=msg) as e:
            main(base + args)
        assert "\n" not in str(e.value)
