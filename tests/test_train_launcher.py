"""Smoke tests through the real entry points: the `deepspeed` launcher (2 CPU ranks) and a plain
process running launch/adapt.py on a tiny model + jsonl recipe, resume by re-running the same
command, export, and loading the export with AutoModelForCausalLM."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import free_port, losses, write_tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}


def _run(cmd, timeout=240):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\n--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-6000:]}"
    return p.stdout + p.stderr


@pytest.mark.slow
def test_deepspeed_launcher_adapt_resume_export(tmp_path):
    model, recipe = write_tiny_recipe(tmp_path)
    out = tmp_path / "run"
    ds_bin = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    args = ["launch/adapt.py", "--ds", "ds_configs/zero2.json", "--model", model, "--recipe", recipe, "--out", str(out),
            "--mod.threshold", "0.5", "--mod.router_init", "zero", "--train.max_steps", "3", "--train.precision",
            "fp32", "--train.lr", "3e-3", "--train.warmup_steps", "1", "--train.save_every", "2",
            "--train.wandb", "offline"]
    log = _run([ds_bin, "--num_gpus", "2", "--master_port", str(free_port()), *args])
    assert "completed at step 3" in log
    m = losses(out)
    assert sorted(m) == [1, 2, 3]
    assert {"loss/lm", "loss/aux", "routing/rate_l1", "routing/gate_l3", "tokens_per_s", "lr", "grad_norm",
            "loss/source_prose", "loss/source_code"} <= set(m[3])
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run missing"
    # the same command as a plain process (world of one) refuses: the checkpoint was written by 2 ranks
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode != 0 and "world_size: checkpoint has 2, this run has 1" in p.stderr
    # ... unless told to resume elastically: converted, loaded, nothing left to train at max_steps 3 (no new save)
    log = _run([sys.executable, *args, "--train.elastic", "true"])
    assert "elastic resume from step_000003: 2 -> 1 ranks" in log and "completed at step 3" in log
    assert (out / "checkpoints" / "step_000003_universal" / "SOURCE.json").is_file()
    # the same deepspeed command with more steps resumes at step 3
    args[args.index("--train.max_steps") + 1] = "4"
    log = _run([ds_bin, "--num_gpus", "2", "--master_port", str(free_port()), *args])
    assert "resumed from" in log and "step_000003" in log and "completed at step 4" in log
    # export -> AutoModelForCausalLM (after import mod_train), with the tokenizer
    _run([sys.executable, "launch/export.py", str(out), str(tmp_path / "hf")])
    import mod_train  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = tok("the of and to in a", return_tensors="pt").input_ids
    assert type(hf).__name__ == "MoDLlamaForCausalLM" and hf(ids, labels=ids).loss.isfinite()
    assert json.loads((tmp_path / "hf" / "mod_train_export.json").read_text())["step"] == 4


@pytest.mark.slow
def test_plain_process_and_bad_override(tmp_path):
    model, recipe = write_tiny_recipe(tmp_path)
    base = [sys.executable, "launch/adapt.py", "--ds", "ds_configs/zero1.json", "--model", model, "--recipe", recipe,
            "--out", str(tmp_path / "run"), "--train.precision", "fp32", "--train.wandb", "disabled"]
    p = subprocess.run(base + ["--train.max_step", "2"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert p.returncode == 2 and "did you mean 'train.max_steps'" in p.stderr
    log = _run(base + ["--train.max_steps", "2", "--train.trainable", "routers", "--train.router_lr", "1e-2"])
    assert "completed at step 2" in log
    m = losses(tmp_path / "run")
    assert m[2]["lr_router"] == m[2]["lr"] and m[2]["lr"] > 3e-5  # routers only: one group at router_lr
