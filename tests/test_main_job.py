"""The main job's code path (launch/main.py: probe -> DeepSpeed adaptation -> export -> evaluation ->
REPORT.md) end to end, reduced: a tiny model, a tiny local recipe, two steps."""
import json
import os
import subprocess
import sys
import random
from pathlib import Path

from harness import make_tiny_books_setup

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_end_to_end_reduced(tmp_path):
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not def return class import self".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(700, 900))) for _ in range(10)]
    model, recipe = make_tiny_books_setup(tmp_path, docs, name="tiny-main")
    args = ["--config", str(ROOT / "launch/main_cpu.yaml"), "--model", str(model), "--recipe", str(recipe),
            "--out", str(tmp_path / "run"), "--train.max_steps", "2", "--train.seq_len", "64",
            "--train.wandb", "disabled", "--train.progress", "false",
            "--mod.dense_first", "0", "--mod.dense_last", "0",  # the tiny model has 4 layers ...
            "--init_deleted", "1",  # ... of which 1 deleted whole carries the hybrid start (4 x 0.27 of a layer)
            "--eval.lengths", "[32,64]", "--eval.max_docs", "2", "--eval.max_tokens", "128",
            "--eval.targets", "[1.0,0.5]", "--eval.calib_docs", "2", "--eval.calib_tokens", "64",
            "--eval.progress", "false",
            # lm-eval, retrieval and samples sized for the tiny model (window 512, a byte-level tokenizer)
            "--eval.task_examples", "4", "--eval.needle", "false", "--eval.retrieval_lengths", "[384,512]",
            "--eval.retrieval_depths", "[0.5]", "--eval.samples", "1", "--eval.sample_prompt_tokens", "32",
            "--eval.sample_new_tokens", "8"]
    # in a fresh interpreter: the trainer initialises torch.distributed/DeepSpeed state in its process,
    # which forked ranks of later tests must not inherit
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "main.py"), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    text = (run / "REPORT.md").read_text()
    assert text in proc.stdout
    for section in ("## Adaptation", "## Held-out perplexity", "## Realised execution rate per routed layer",
                    "KV cache:", "prefill:", "## Quality against KV memory", "## lm-evaluation-harness",
                    "| mod_choice | acc |", "## Long-context retrieval", "| passkey | 512 | 0.5 |",
                    "](eval/retrieval_mod.png)", "## Samples"):
        assert section in text, section
    assert (run / "model" / "config.json").is_file() and (run / "init_model" / "config.json").is_file()
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert cfg["model_type"].startswith("mod_") and cfg["mod"]["target_rate"] == 0.7308 and cfg["mod"]["gate_form"] == "ste"
    # the token-adaptive recipe: the routed start's per-layer rates, held; the sink; kept K/V
    m = cfg["mod"]
    assert m["rate_hold"] == "window" and m["sink_tokens"] == 1 and m["skipped_kv"] == "keep"
    init = json.loads((run / "init_model" / "config.json").read_text())["mod"]
    assert m["layer_rates"] == init["layer_rates"] and len(m["layer_rates"]) == 4
    assert abs(sum(m["layer_rates"].values()) / 4 - 0.7308) < 0.05
    # the hybrid start: one layer deleted whole (off, rate 0), the rest of the budget spread over the others
    off = [j for j, p in m["layer_thresholds"].items() if p >= 1.0]
    assert len(off) == 1 and m["layer_rates"][off[0]] == 0.0
    assert (run / "eval" / "rate_per_layer.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "eval" / "adaptivity_in_domain.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "rate_schedule.png").read_bytes()[:4] == b"\x89PNG" and "](rate_schedule.png)" in text
    res = json.loads((run / "eval" / "results.json").read_text())
    assert set(res["ppl"]) == {"32", "64"} and res["ppl"]["64"]["mod"]["ppl"] > 1
    assert len(res["sweep"]["points"]) == 2
    # how token-adaptive the in-domain routing is: its verdict and partial share under the per-layer rates
    ad = res["adaptivity"]["in_domain"]
    assert f"Routing on this text: {ad['verdict']}; " in text
    assert f"partial compute share {ad['partial_compute_share']:.3f}" in text
    assert "](eval/adaptivity_in_domain.png)" in text
