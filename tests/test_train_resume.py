"""Preemption and resume: SIGKILL + restart reproduces the uninterrupted curve exactly; SIGTERM (even
on one rank only) writes a checkpoint and exits cleanly; incompatible checkpoints are refused; a
corrupt newest checkpoint falls back to the previous good one."""
import json
import signal

import pytest

from harness import (losses, make_tiny_model, run_ranks, start_ranks, train_worker, train_worker_probe,
                     wait_for_step)
from mod_train.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


RUN = {"max_steps": 10, "save_every": 2, "keep_last": 2}


@pytest.mark.slow
def test_sigkill_restart_reproduces_uninterrupted_curve(tiny, tmp_path):
    ref = tmp_path / "ref"
    run_ranks(train_worker, 2, tiny, ref, "ds_configs/zero2.json", RUN)
    out = tmp_path / "killed"
    ranks = start_ranks(train_worker_probe, 2, tiny, out, "ds_configs/zero2.json", RUN, delay=0.25)
    wait_for_step(out, 5)
    ranks.kill(signal.SIGKILL)
    ranks.join(check=False)
    assert max(losses(out)) < RUN["max_steps"]
    run_ranks(train_worker, 2, tiny, out, "ds_configs/zero2.json", RUN)  # the same command again
    a, b = losses(ref), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for s in a:
        for k in ("loss/lm", "loss/aux", "grad_norm", "lr", "routing/rate_mean"):
            assert a[s][k] == b[s][k], (s, k, a[s][k], b[s][k])  # bit for bit
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert any(e["event"] == "resumed" for e in events)
    assert len(ckpt.list_tags(out / "checkpoints")) == 2  # keep_last


@pytest.mark.slow
def test_sigterm_on_one_rank_checkpoints_and_exits_cleanly(tiny, tmp_path):
    train = {"max_steps": 1000, "save_every": 0}
    ranks = start_ranks(train_worker_probe, 2, tiny, tmp_path, "ds_configs/zero1.json", train, delay=0.2)
    wait_for_step(tmp_path, 2)
    import os
    os.kill(ranks.pids()[1], signal.SIGTERM)  # SLURM may signal ranks at different times
    results, errors, codes = ranks.join(timeout=60)
    assert not errors and codes == [0, 0]
    assert [r["status"] for r in results] == ["preempted", "preempted"]
    step = results[0]["step"]
    tag = (tmp_path / "checkpoints" / "latest").read_text()
    assert tag == ckpt.tag_for(step) and ckpt.check_complete(tmp_path / "checkpoints" / tag) is None
    # and the same command continues from there
    res = run_ranks(train_worker, 2, tiny, tmp_path, "ds_configs/zero1.json", {"max_steps": step + 1})
    assert res[0]["status"] == "completed" and res[0]["step"] == step + 1


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused(tiny, tmp_path):
    run_ranks(train_worker, 1, tiny, tmp_path, "ds_configs/zero1.json", {"max_steps": 2})
    with pytest.raises(RuntimeError) as e:
        run_ranks(train_worker, 1, tiny, tmp_path, "ds_configs/zero2.json", {"max_steps": 4, "seq_len": 64},
                  {"threshold": 0.6})
    msg = str(e.value)
    assert "IncompatibleCheckpoint" in msg and "refusing to resume" in msg
    for what in ("mod.threshold: checkpoint has 0.5, this run has 0.6", "zero_stage: checkpoint has 1",
                 "seq_len: checkpoint has 32, this run has 64"):
        assert what in msg, msg


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back(tiny, tmp_path, capfd):
    ref = tmp_path / "ref"
    run_ranks(train_worker, 1, tiny, ref, "ds_configs/zero1.json", {"max_steps": 6})
    out = tmp_path / "run"
    run_ranks(train_worker, 1, tiny, out, "ds_configs/zero1.json",
              {"max_steps": 6, "save_every": 2, "exit_after_steps": 4})
    newest = out / "checkpoints" / "step_000004"
    victim = max((p for p in newest.iterdir() if p.name.endswith("optim_states.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])  # a torn write
    run_ranks(train_worker, 1, tiny, out, "ds_configs/zero1.json", {"max_steps": 6, "save_every": 2})
    assert "FALLING BACK to the previous good checkpoint 'step_000002'" in capfd.readouterr().out
    a, b = losses(ref), losses(out)
    for s in range(1, 7):
        assert a[s]["loss/lm"] == b[s]["loss/lm"]
