"""Never train on the wrong thing silently (issue 12): one test per defect, each failing before its fix.

Tokenizer agreement, one run per output directory, honest resume (changed settings applied or
refused), checksummed checkpoints, data exhaustion, bad and non-UTF-8 lines, early validation, export
from the checkpoint alone, missing folders, NaN guard, SIGINT, shard index, disk-full saves.
docs/training.md ("What is guaranteed") maps each fault to its test here.
"""
import errno
import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import pytest

from harness import (TINY_MOD, TINY_TRAIN, losses, make_tiny_model, make_tiny_model_with_tokenizer, run_ranks,
                     start_ranks, train_worker, train_worker_probe, wait_for_step, write_tiny_recipe)
from mod_train.train import checkpoint as ckpt

ZERO1 = "ds_configs/zero1.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """(model with its own tokenizer, recipe naming that tokenizer) in one folder."""
    return write_tiny_recipe(tmp_path_factory.mktemp("data"))


def worker(model, out, train=None, recipe="synthetic", probe=None, ds=ZERO1, **spec):
    from mod_train import MoDConfig
    from mod_train.config import TrainConfig
    from mod_train.train.trainer import RunSpec, train as run
    tc = TrainConfig(**{**TINY_TRAIN, **(train or {})})
    return run(RunSpec(model=model, out=str(out), ds=ds, recipe=recipe, **spec), tc, MoDConfig(**TINY_MOD),
               after_setup=probe)


def spec_and_tc(model, out, recipe="synthetic", train=None, **spec):
    from mod_train.config import TrainConfig
    from mod_train.train.trainer import RunSpec
    return RunSpec(model=model, out=str(out), recipe=recipe, **spec), TrainConfig(**{**TINY_TRAIN, **(train or {})})


def events(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"event"' in x]


# -- 1. tokenizer agreement ------------------------------------------------------------------------------

def test_recipe_tokenizer_must_agree_with_the_models(tiny_data, tmp_path):
    from mod_train.train.preflight import PreflightError, preflight, tokenizer_identity
    model, recipe = tiny_data
    other = make_tiny_model_with_tokenizer(tmp_path / "other", ["completely different words " * 5, "zebra quartz"] * 20)
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(recipe).read_text().replace(f"tokenizer: {model}", f"tokenizer: {other}"))
    with pytest.raises(PreflightError) as e:
        preflight(*spec_and_tc(model, tmp_path / "o1", str(bad)))
    assert str(other) in str(e.value) and str(model) in str(e.value) and "allow_tokenizer_mismatch" in str(e.value)
    # the explicit override trains with the model's tokenizer, and that one is what the run records
    plan = preflight(*spec_and_tc(model, tmp_path / "o2", str(bad), allow_tokenizer_mismatch=True))
    assert plan.tokenizer_source == model
    # the same tokenizer in another folder (or under a recipe alias) is recognised by content
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    same = tmp_path / "same.yaml"
    same.write_text(Path(recipe).read_text().replace(f"tokenizer: {model}", f"tokenizer: {copy}"))
    assert preflight(*spec_and_tc(model, tmp_path / "o3", str(same))).tokenizer_id == tokenizer_identity(plan.tokenizer)


def test_offline_recipe_alias_smollm2_agrees_with_the_smollm2_folder(tmp_path):
    from transformers import AutoTokenizer
    from mod_train.data import load_recipe
    from mod_train.offline import smollm2_path
    from mod_train.train.preflight import check_tokenizer_agreement
    copy = tmp_path / "smol"
    copy.mkdir()
    for f in Path(smollm2_path()).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, copy / f.name)
    rec = load_recipe({"name": "r", "tokenizer": "smollm2", "stages": [{"seq_len": 64}],
                       "sources": [{"name": "s", "type": "hub", "hub_id": "x/y"}]})
    check_tokenizer_agreement(rec, AutoTokenizer.from_pretrained(copy), str(copy), allow_mismatch=False)


@pytest.mark.parametrize("script", ["llama70b_tp8_zero3.sbatch", "llama70b_zero3_offload.sbatch"])
def test_cluster_examples_use_the_hub_recipe_with_the_models_tokenizer(tiny_data, tmp_path, script):
    import subprocess
    import sys
    from mod_train.data import load_recipe
    from mod_train.train.preflight import preflight
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu[01-08]", "PYTHON": sys.executable}
    p = subprocess.run(["bash", f"launch/slurm/{script}"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--recipe data_recipes/hub_long_mix.yaml" in p.stdout and "offline_long_mix" not in p.stdout
    rec = load_recipe(root / "data_recipes/hub_long_mix.yaml")  # the schema, offline
    assert rec.tokenizer == "model" and {s.type for s in rec.sources} == {"hub"}
    assert {s.name for s in rec.sources} == {"web", "code", "books"}
    model, _ = tiny_data  # any model: its own tokenizer is the run's, nothing to disagree with
    plan = preflight(*spec_and_tc(model, tmp_path / "o", str(root / "data_recipes/hub_long_mix.yaml"),
                                  {"seq_len": 64}))
    assert plan.tokenizer_source == model


def test_training_data_is_tokenised_by_the_runs_tokenizer(tiny_data, tmp_path):
    from transformers import AutoTokenizer
    from mod_train.data import build_stream
    model, recipe = tiny_data
    tok = AutoTokenizer.from_pretrained(model)
    s = build_stream(recipe, seq_len=32, seed=0, dp_rank=0, dp_world_size=1, tokenizer=tok)
    assert s.tok is tok


# -- 2. one run per output directory ---------------------------------------------------------------------

@pytest.mark.slow
def test_second_run_on_the_same_out_is_refused(tiny, tmp_path):
    first = start_ranks(train_worker_probe, 1, tiny, tmp_path, ZERO1, {"max_steps": 1000}, delay=0.3)
    wait_for_step(tmp_path, 1)
    with pytest.raises(RuntimeError) as e:
        run_ranks(worker, 1, tiny, tmp_path, {"max_steps": 2})
    assert "RunLocked" in str(e.value) and f"pid {first.pids()[0]}" in str(e.value)
    os.kill(first.pids()[0], signal.SIGTERM)
    results, _, codes = first.join(timeout=60)
    assert results[0]["status"] == "preempted" and codes == [0]
    assert not (tmp_path / "RUN.lock").exists()  # released at the end


def test_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path, capsys):
    import multiprocessing as mp
    import socket
    from mod_train.train.lock import RunLock, RunLocked
    ctx = mp.get_context("fork")
    held = ctx.Event()

    def hold(ev):
        RunLock(tmp_path).acquire()
        ev.set()
        import time
        time.sleep(60)

    p = ctx.Process(target=hold, args=(held,))
    p.start()
    assert held.wait(10)
    with pytest.raises(RunLocked, match=f"pid {p.pid}"):
        RunLock(tmp_path).acquire()
    p.kill()
    p.join()
    lock = RunLock(tmp_path)
    lock.acquire()  # the holder is dead: stale
    assert "taking over a stale run lock" in capsys.readouterr().out
    assert json.loads((tmp_path / "RUN.lock").read_text())["host"] == socket.gethostname()
    lock.release()
    # another host: refused while its heartbeat goes on, taken over once it stops (requeue after a crash)
    import threading
    (tmp_path / "RUN.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(0.05):
            os.utime(tmp_path / "RUN.lock")

    beat = threading.Thread(target=heartbeat)
    beat.start()
    with pytest.raises(RunLocked, match="host elsewhere"):
        RunLock(tmp_path, heartbeat_s=0.2).acquire()
    stop.set()
    beat.join()
    lock = RunLock(tmp_path, heartbeat_s=0.2)
    lock.acquire()
    assert "no heartbeat for 1 s while we watched" in capsys.readouterr().out
    lock.release()


# -- 3. changed settings on resume -------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_applies_changed_lr_and_refuses_fixed_settings(tiny, tmp_path, capfd):
    from mod_train.config import TrainConfig
    from mod_train.train.optim import lr_lambda
    base = {"max_steps": 4, "save_every": 2, "lr": 3e-3}
    run_ranks(worker, 1, tiny, tmp_path, {**base, "exit_after_steps": 2})
    run_ranks(worker, 1, tiny, tmp_path, {**base, "lr": 1e-3})
    f = lr_lambda(TrainConfig(**{**TINY_TRAIN, **base}))
    m = losses(tmp_path)
    assert m[2]["lr"] == pytest.approx(3e-3 * f(2)) and m[4]["lr"] == pytest.approx(1e-3 * f(4))
    meta = ckpt.load_meta(tmp_path / "checkpoints" / "step_000004")
    assert meta["train"]["lr"] == 1e-3 and meta["changed_on_resume"]["step 2"]["lr"] == [3e-3, 1e-3]
    assert "resumed with changed settings (applied): lr 0.003 -> 0.001" in capfd.readouterr().out
    with pytest.raises(RuntimeError) as e:
        run_ranks(worker, 1, tiny, tmp_path, {**base, "seed": 7})
    assert "IncompatibleCheckpoint" in str(e.value) and "train.seed: checkpoint has 1234, this run has 7" in str(e.value)
    res = run_ranks(worker, 1, tiny, tmp_path, {**base, "max_steps": 3})
    assert res[0]["step"] == 4 and "max_steps 3 is below the checkpoint's step 4" in capfd.readouterr().out


# -- 4. same-size corruption -------------------------------------------------------------------------------

@pytest.mark.slow
def test_zeroed_block_in_optimizer_state_falls_back_loudly(tiny, tmp_path, capfd):
    """Two ranks: rank 1's ZeRO shard is damaged, only rank 1 verifies it, both ranks fall back together."""
    run = {"max_steps": 6, "save_every": 2}
    run_ranks(worker, 2, tiny, tmp_path, {**run, "exit_after_steps": 4}, ds="ds_configs/zero2.json")
    first = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if "step" in r and "event" not in r}
    newest = tmp_path / "checkpoints" / "step_000004"
    victim = next(newest.glob("*zero_pp_rank_1_*optim_states.pt"))
    assert json.loads((newest / "MANIFEST.json").read_text())["files"][victim.name]["rank"] == 1
    data = bytearray(victim.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(4096)
    victim.write_bytes(bytes(data))  # same size, different bytes
    assert ckpt.check_complete(newest, hashes=None) is None  # sizes alone cannot see it
    run_ranks(worker, 2, tiny, tmp_path, run, ds="ds_configs/zero2.json")
    out = capfd.readouterr().out
    assert "does not match its checksum" in out and "FALLING BACK to the previous good checkpoint 'step_000002'" in out
    again = losses(tmp_path)
    for s in (3, 4):
        assert again[s]["loss/lm"] == first[s]["loss/lm"]  # replayed from step 2, bit for bit


# -- 5. data exhaustion; recipe path spelling ----------------------------------------------------------------

@pytest.mark.slow
def test_data_exhaustion_ends_with_checkpoint_and_rerun_finishes(tiny_data, tmp_path, capfd):
    model, recipe = tiny_data
    budget = tmp_path / "budget.yaml"
    budget.write_text(Path(recipe).read_text().replace("  - seq_len: 64\n", "  - seq_len: 64\n    tokens: 192\n"))
    res = run_ranks(worker, 1, model, tmp_path / "run", {"max_steps": 10, "seq_len": None}, str(budget))
    assert res[0] == {"status": "data_exhausted", "step": 3, "rank": 0}
    assert "the data ran out at step 3" in capfd.readouterr().out
    assert ckpt.find_resume(tmp_path / "run" / "checkpoints") == "step_000003"
    # the same recipe under another spelling of its path, from the same directory: accepted, ends at once
    other_spelling = str(tmp_path / "run" / ".." / "budget.yaml")
    res = run_ranks(worker, 1, model, tmp_path / "run", {"max_steps": 10, "seq_len": None}, other_spelling)
    assert res[0]["status"] == "data_exhausted" and res[0]["step"] == 3


# -- 6. bad-line tolerance; 9. non-UTF-8 -----------------------------------------------------------------------

def _jsonl(path, n_good, bad_lines=(), at=0):
    lines = [json.dumps({"text": f"doc {i} " + "word " * 30, "title": f"d{i}"}).encode() for i in range(n_good)]
    lines[at:at] = list(bad_lines)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _recipe(path, max_bad_fraction=0.01, **src):
    from mod_train.data import load_recipe
    return load_recipe({"name": "t", "tokenizer": "smollm2", "eos_token": "<|endoftext|>", "seed": 3,
                        "max_bad_fraction": max_bad_fraction, "stages": [{"seq_len": 64}],
                        "sources": [{"name": "s", "path": path, "shuffle_block": 16, **src}]})


def _rows(stream, n):
    return [next(stream) for _ in range(n)]


def test_bad_lines_count_once_per_line_over_the_whole_file(tmp_path):
    from mod_train.data import DataError, PackedStream
    f = _jsonl(tmp_path / "a.jsonl", 400, [b"{broken", b"not json", b"[1, 2]"])  # 0.75 % < 1 %
    s = PackedStream(_recipe(f), stage=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _rows(s, 600)  # several passes over the file
    assert s._readers[0].epoch >= 2 and s._bad.bad[f] == 3 and s._bad.seen[f] == 403
    over = _jsonl(tmp_path / "b.jsonl", 100, [b"{x"] * 5)  # 4.8 %: refused when the pass ends
    with warnings.catch_warnings(), pytest.raises(DataError, match="5 of 105 records"):
        warnings.simplefilter("ignore")
        _rows(PackedStream(_recipe(over), stage=0), 400)


def test_non_utf8_line_is_skipped_naming_file_and_line(tmp_path):
    from mod_train.data import PackedStream
    f = _jsonl(tmp_path / "a.jsonl", 300, [b'{"text": "caf\xe9 latin-1", "title": "x"}'], at=4)
    s = PackedStream(_recipe(f, shuffle_block=0), stage=0)
    with pytest.warns(UserWarning, match=rf"{f}:5: not UTF-8 \(byte 0xe9"):
        _rows(s, 10)
    assert s._bad.bad[f] == 1
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "good.txt").write_text("fine words " * 200)
    (texts / "bad.txt").write_bytes(b"\xff\xfe broken " * 200)
    with pytest.warns(UserWarning, match=r"bad.txt: not UTF-8"):
        _rows(PackedStream(_recipe(str(texts), type="text", max_bad_fraction=0.5, shuffle_block=0), stage=0), 3)


# -- 7. early validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, field", [
    ({"recipe": "no/such/recipe.yaml"}, "RunSpec.recipe"),
    ({"out": "FILE/sub"}, "RunSpec.out"),
    ({"train": {"log_every": 0}}, "train.log_every"),
    ({"train": {"save_every": -1}}, "train.save_every"),
    ({"train": {"seq_len": 1}}, "train.seq_len"),
    ({"train": {"seq_len": 1024}}, "exceeds the model's 512 positions"),
    ({"model": "MISSING"}, "RunSpec.model"),
])
def test_bad_settings_are_refused_before_any_model_is_loaded(tiny, tmp_path, case, field):
    from mod_train.train.preflight import PreflightError, preflight
    (tmp_path / "FILE").write_text("a file, not a folder")
    model = str(tmp_path / "missing_model") if case.get("model") == "MISSING" else tiny
    out = str(tmp_path / case["out"]) if "out" in case else str(tmp_path / "out")
    spec, tc = spec_and_tc(model, out, case.get("recipe", "synthetic"), case.get("train"))
    with pytest.raises(PreflightError) as e:
        preflight(spec, tc)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_missing_teacher_is_one_line_before_any_model_is_loaded(tiny, tmp_path, monkeypatch):
    """issue 18 item 2: --teacher naming a missing folder used to load the student, then die on the hub's
    'Repo id must be in the form ...'. Now preflight, and the launcher before its probe start, refuse it in one
    line naming the field, the value and the fix; a teacher of another vocabulary is refused there too."""
    import importlib.util
    import time
    import transformers
    from mod_train.config import ConfigError
    from mod_train.train.preflight import PreflightError, check_locations, preflight

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the bad --teacher was refused")
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_load))
    gone = str(tmp_path / "teachers" / "gone")
    spec, tc = spec_and_tc(tiny, tmp_path / "o", train={"objective": "kd"}, teacher=gone)
    t0 = time.perf_counter()
    with pytest.raises(PreflightError) as e:
        preflight(spec, tc)
    msg = str(e.value)
    assert time.perf_counter() - t0 < 10 and "\n" not in msg, msg
    assert msg.startswith(f"RunSpec.teacher = {gone!r}: the local folder does not exist") and "hub id" in msg, msg
    with pytest.raises(PreflightError, match="RunSpec.teacher = .*: the local folder does not exist"):
        preflight(*spec_and_tc(tiny, tmp_path / "o", teacher=gone))  # refused even where no objective reads it
    other = make_tiny_model(tmp_path / "other_vocab", vocab=256)
    with pytest.raises(PreflightError, match=r"RunSpec.teacher = .*: its vocabulary has 256 tokens, the student's "
                                             r"128 .*; give a teacher that uses the student's tokenizer$"):
        preflight(*spec_and_tc(tiny, tmp_path / "o", train={"objective": "kd"}, teacher=other))
    check_locations(spec_and_tc(tiny, tmp_path / "o", teacher="org/name", tokenizer="org/tok")[0])  # hub ids pass
    assert preflight(*spec_and_tc(tiny, tmp_path / "o", train={"objective": "kd"}, teacher=tiny)).hf_config
    path = Path(__file__).resolve().parents[1] / "launch" / "adapt.py"
    spec_ = importlib.util.spec_from_file_location("launcher_adapt_teacher", path)
    adapt = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(adapt)
    with pytest.raises(ConfigError, match="RunSpec.teacher = .*: the local folder does not exist"):
        adapt.main(["--model", tiny, "--out", str(tmp_path / "o2"), "--teacher", gone, "--init", "probe",
                    "--train.objective", "kd"])


@pytest.mark.slow
def test_trainer_runs_preflight_first(tiny, tmp_path):
    with pytest.raises(RuntimeError) as e:
        run_ranks(worker, 1, tiny, tmp_path, {"log_every": 0})
    assert "train.log_every = 0" in str(e.value) and "ZeroDivisionError" not in str(e.value)


# -- 8. export from the checkpoint alone ---------------------------------------------------------------------------

@pytest.mark.slow
def test_export_needs_only_the_checkpoint(tiny_data, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import mod_train  # noqa: F401
    from mod_train.train.export import export
    from mod_train.train.preflight import tokenizer_identity
    model, recipe = tiny_data
    moved = tmp_path / "model"
    shutil.copytree(model, moved)
    run_ranks(worker, 1, str(moved), tmp_path / "run", {"max_steps": 2, "seq_len": None}, recipe)
    want = tokenizer_identity(AutoTokenizer.from_pretrained(moved))
    shutil.rmtree(moved)  # the base folder is gone
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    dest = export(tmp_path / "run", "hf")
    m = AutoModelForCausalLM.from_pretrained(dest)
    assert m.config.num_hidden_layers == 4 and tokenizer_identity(AutoTokenizer.from_pretrained(dest)) == want


# -- 10. missing local folders ---------------------------------------------------------------------------------------

def test_missing_local_folder_is_reported_as_missing_not_as_hub_id(tiny, tmp_path, monkeypatch):
    from mod_train.eval.report import EvalConfig
    from mod_train.paths import MissingPathError, check_model_location
    from mod_train.train.export import export
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for value in ("runs/x-hf", "./x", str(tmp_path / "gone")):
        with pytest.raises(MissingPathError, match="the local folder does not exist"):
            check_model_location(value, "RunSpec.model")
    check_model_location("meta-llama/Meta-Llama-3-8B", "RunSpec.model")  # a hub id stays a hub id
    with pytest.raises(MissingPathError, match="EvalConfig.mod = 'runs/x-hf'"):
        EvalConfig(dense=tiny, mod="runs/x-hf").validate()
    with pytest.raises(MissingPathError, match="the folder does not exist"):
        export("runs/x", "dest")


# -- 11. smaller ones ---------------------------------------------------------------------------------------------------

def _poison_loss_at(step):
    def probe(trainer):
        eng = trainer.engine
        orig = eng.forward

        def forward(*args, **kwargs):
            out = orig(*args, **kwargs)
            if trainer.step + 1 == step:
                out.loss = out.loss * float("nan")
            return out
        eng.forward = forward
    return probe


@pytest.mark.slow
def test_nan_loss_stops_with_term_and_step_keeping_last_good_checkpoint(tiny, tmp_path):
    with pytest.raises(RuntimeError) as e:
        run_ranks(worker, 1, tiny, tmp_path, {"max_steps": 6, "save_every": 2}, probe=_poison_loss_at(3))
    msg = str(e.value)
    assert "NonFiniteLoss: non-finite loss/lm = nan" in msg and "at step 3" in msg and "step_000002" in msg
    assert ckpt.list_tags(tmp_path / "checkpoints") == ["step_000002"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000002"
    assert events(tmp_path)[-1]["event"] == "non_finite"


@pytest.mark.slow
def test_sigint_checkpoints_and_exits_cleanly(tiny, tmp_path):
    ranks = start_ranks(train_worker_probe, 1, tiny, tmp_path, ZERO1, {"max_steps": 1000}, delay=0.2)
    wait_for_step(tmp_path, 2)
    os.kill(ranks.pids()[0], signal.SIGINT)
    results, errors, codes = ranks.join(timeout=60)
    assert not errors and codes == [0] and results[0]["status"] == "preempted"
    tag = (tmp_path / "checkpoints" / "latest").read_text()
    assert tag == ckpt.tag_for(results[0]["step"]) and ckpt.check_complete(tmp_path / "checkpoints" / tag) is None


def test_eval_lengths_are_checked_and_warned_beyond_max_positions(tiny):
    from mod_train.eval.report import EvalConfig
    with pytest.raises(ValueError, match="EvalConfig.lengths = \\[0\\]"):
        EvalConfig(dense=tiny, mod_from_dense=True, lengths=[0]).validate()
    with pytest.warns(UserWarning, match=r"\[1024\] exceed the dense model's max_position_embeddings 512"):
        EvalConfig(dense=tiny, mod_from_dense=True, lengths=[256, 1024]).validate()


def test_interrupted_shard_rebuild_leaves_no_stale_index(tmp_path, monkeypatch):
    import numpy as np
    from mod_train.data import build as B
    f = _jsonl(tmp_path / "a.jsonl", 200)
    r = _recipe(f)
    B.build(r, rows=4, out=tmp_path / "shards", shard_rows=2, progress=False)
    assert (tmp_path / "shards" / "index.json").is_file()
    calls, real = [], np.savez

    def failing_savez(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C during the second shard of the rebuild
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(B.np, "savez", failing_savez)
    with pytest.raises(KeyboardInterrupt):
        B.build(r, rows=6, out=tmp_path / "shards", shard_rows=2, progress=False)
    assert not (tmp_path / "shards" / "index.json").exists()


def _disk_full_on_save(n):
    def probe(trainer):
        orig = trainer.engine.save_checkpoint
        calls = []

        def save_checkpoint(*a, **k):
            calls.append(1)
            orig(*a, **k)
            if len(calls) == n:  # the shards are (partly) written, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        trainer.engine.save_checkpoint = save_checkpoint
    return probe


@pytest.mark.slow
def test_disk_full_save_says_so_and_keeps_the_previous_checkpoint(tiny, tmp_path):
    with pytest.raises(RuntimeError) as e:
        run_ranks(worker, 1, tiny, tmp_path, {"max_steps": 6, "save_every": 2}, probe=_disk_full_on_save(2))
    msg = str(e.value)
    assert "CheckpointSaveError" in msg and "No space left on device" in msg and "free disk space" in msg
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000002"
    assert not (tmp_path / "checkpoints" / "step_000004").exists()


def test_every_train_setting_is_either_applied_or_refused_on_resume():
    import dataclasses
    from mod_train.config import TrainConfig
    own_keys = {"precision", "trainable", "train_modules", "seq_len"}  # fingerprinted under their own names
    own_keys |= {"lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules"}  # under trainable.lora
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields == set(ckpt.MAY_CHANGE) | set(ckpt.TRAIN_FIXED) | own_keys
    assert not set(ckpt.MAY_CHANGE) & (set(ckpt.TRAIN_FIXED) | own_keys)
