"""Elastic resume (train.elastic): a run saved at one world size continues at another on CPU/gloo ranks, with
the model and optimizer state through DeepSpeed's universal checkpoint, the data re-sharded by document and
the global batch kept; what cannot be kept is refused in one line."""
import json
import random
import re

import pytest

from harness import losses, make_tiny_model_with_tokenizer, run_ranks, train_worker
from mod_train.train import checkpoint as ckpt

SEQ = 32
RUN = {"max_steps": 6, "seq_len": SEQ}
FIRST = {**RUN, "save_every": 3, "exit_after_steps": 3}  # steps 1-3, checkpoint step_000003
ELASTIC = {**RUN, "elastic": True}
STAGE0 = {"zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
# Routers start dense (gate 0.95 over the threshold 0.5): with the harness's zero-initialised routers every gate
# starts exactly on the threshold, a tie that float noise breaks, and uninterrupted runs on 1 and 2 ranks
# already differ by 4e-4 at step 2 (measured; dense or random-router runs differ by 5e-8).
MOD = {"router_init": "dense"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model + tokenizer and a recipe whose documents fill exactly one row each (min_doc_tokens =
    max_doc_tokens = seq_len, open_docs 1): rank r of N takes documents r, r + N, ... so every optimizer step's
    global batch is the same set of documents at any world size that keeps the global batch."""
    d = tmp_path_factory.mktemp("elastic")
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(60, 90))) for _ in range(64)]
    with open(d / "docs.jsonl", "w") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"title": f"doc{i}", "text": t}) + "\n")
    model = make_tiny_model_with_tokenizer(d / "model", docs)
    recipe = d / "recipe.yaml"
    recipe.write_text(f"name: rows\ntokenizer: {model}\nopen_docs: 1\nstages:\n  - seq_len: {SEQ}\nsources:\n"
                      f"  - name: docs\n    type: jsonl\n    path: {d / 'docs.jsonl'}\n    min_doc_tokens: {SEQ}\n"
                      f"    max_doc_tokens: {SEQ}\n")
    return model, str(recipe)


def run(world, setup, out, ds, train):
    """-> {step: set of documents in that step's global batch} over all ranks."""
    model, recipe = setup
    steps = {}
    for res in run_ranks(train_worker, world, model, out, ds, train, MOD, recipe=recipe, record_docs=True):
        for s, docs in res["seen"].items():
            steps.setdefault(s, set()).update(docs)
    return steps


def assert_continues(ref, got, rtol):
    for s in ref:
        for k in ("loss/lm", "loss/aux", "routing/rate_mean"):
            assert got[s][k] == pytest.approx(ref[s][k], rel=rtol, abs=0), (s, k, ref[s][k], got[s][k])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)], ids=["2-1", "1-2"])
def test_elastic_resume_keeps_documents_and_the_loss_curve(setup, tmp_path, stage, before, after, capfd):
    """2 -> 1 and 1 -> 2 ranks under ZeRO-0 (full states on every rank: no conversion), 1, 2 and 3, saved after
    step 3 of 6.

    Documents: every step's global batch holds the same documents as the uninterrupted run's (so the run as a
    whole sees the same set, none twice, none skipped).
    Loss: with the same documents in every step's global batch the resumed steps compute the same gradient as
    the uninterrupted run; only the order of floating-point sums differs (the gradient all-reduce over another
    number of ranks, accumulation over 2 micro-batches instead of 1, ZeRO partitions of another size, the fp32
    states gathered and re-split by the universal checkpoint). Measured: at most 4.4e-8 relative over steps
    4-6 in all eight cases (and in bf16), under one fp32 ulp of a loss near 5.5 (8.7e-8). rtol 1e-6 leaves room
    for ~10 ulps of drift, and is ~800x below what a wrong optimizer state does: DeepSpeed's ZeRO-3 universal
    load shares one Adam step counter between the param groups (elastic.load_universal undoes it), which moved
    step 6's loss by 8e-4; a wrong learning-rate position or a repeated batch moves it by more.
    """
    ds = f"ds_configs/zero{stage}.json" if stage else STAGE0
    batch = {"grad_accum": 2 // before}  # a global batch of 2 rows
    ref = run(before, setup, tmp_path / "ref", ds, {**RUN, **batch})
    out = tmp_path / "run"
    first = run(before, setup, out, ds, {**FIRST, **batch})
    assert sorted(first) == [1, 2, 3]
    capfd.readouterr()
    second = run(after, setup, out, ds, {**ELASTIC, **batch})  # this run's grad_accum is recomputed
    said = capfd.readouterr().out
    how = "from the universal checkpoint step_000003_universal" if stage else "as saved"
    assert re.search(rf"elastic resume from step_000003: {before} -> {after} ranks .*grad_accum {2 // before} -> "
                     rf"{2 // after} keeps the global batch of 2 rows; model and optimizer state {how}", said), said
    assert sorted(second) == [4, 5, 6]
    resumed = {**first, **second}
    assert resumed == ref  # the same documents in every step's global batch
    docs = [d for s in ref.values() for d in s]
    assert len(docs) == len(set(docs)) == 12
    a, b = losses(tmp_path / "ref"), losses(out)
    assert sorted(b) == list(range(1, 7))
    assert_continues(a, b, rtol=1e-6)
    assert (out / "checkpoints" / "step_000003_universal" / "SOURCE.json").is_file() == (stage > 0)
    meta = ckpt.load_meta(out / "checkpoints" / "step_000006")
    assert meta["fingerprint"]["world_size"] == after and meta["train"]["grad_accum"] == 2 // after


@pytest.mark.slow
def test_elastic_resume_twice(setup, tmp_path):
    """2 -> 1 -> 2 ranks (ZeRO-1), saved after steps 3 and 6 of 9: the second resume re-shards a data state that an
    elastic resume wrote (its skip layers), and the run still matches the uninterrupted one step by step."""
    ds, long = "ds_configs/zero1.json", {"max_steps": 9, "seq_len": SEQ}
    ref = run(2, setup, tmp_path / "ref", ds, long)
    out = tmp_path / "run"
    seen = run(2, setup, out, ds, {**long, "save_every": 3, "exit_after_steps": 3})
    seen.update(run(1, setup, out, ds, {**long, "save_every": 3, "exit_after_steps": 3, "elastic": True}))
    seen.update(run(2, setup, out, ds, {**long, "elastic": True}))
    assert seen == ref and sorted(seen) == list(range(1, 10))
    assert_continues(losses(tmp_path / "ref"), losses(out), rtol=1e-6)  # as in the test above


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_elastic_resume_in_bf16(setup, tmp_path, stage):
    """bf16 (what a GPU run uses), 2 -> 1 ranks: the fp32 master weights and Adam states travel through the universal
    checkpoint and the bf16 weights are derived from them, so the curve continues as in fp32 (measured 4.3e-8)."""
    ds, bf16 = f"ds_configs/zero{stage}.json", {"precision": "bf16"}
    run(2, setup, tmp_path / "ref", ds, {**RUN, **bf16})
    out = tmp_path / "run"
    run(2, setup, out, ds, {**FIRST, **bf16})
    run(1, setup, out, ds, {**ELASTIC, **bf16})
    assert_continues(losses(tmp_path / "ref"), losses(out), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_elastic_resume_with_lora(setup, tmp_path, stage):
    """LoRA (frozen base weights, adapters + routers in the optimizer), ZeRO-1 and ZeRO-3, 2 -> 1 ranks: the base
    weights come from --model, the adapters and routers and their Adam states from the universal checkpoint."""
    ds = f"ds_configs/zero{stage}.json"
    lora = {"trainable": "lora", "lora_rank": 4, "lora_target_modules": ["q_proj", "v_proj"]}
    run(2, setup, tmp_path / "ref", ds, {**RUN, **lora})
    out = tmp_path / "run"
    run(2, setup, out, ds, {**FIRST, **lora})
    run(1, setup, out, ds, {**ELASTIC, **lora})
    assert_continues(losses(tmp_path / "ref"), losses(out), rtol=1e-6)  # as in the test above


@pytest.mark.slow
def test_elastic_refusals_are_one_line(setup, tmp_path):
    """Without the flag another world size is refused naming it; 2 -> 3 ranks cannot keep a global batch of 4
    rows (micro-batch 1): one line listing the sizes that can, before any conversion."""
    ds = "ds_configs/zero1.json"
    out = tmp_path / "run"
    run(2, setup, out, ds, {**FIRST, "grad_accum": 2})
    with pytest.raises(RuntimeError) as e:
        run(1, setup, out, ds, {**RUN, "grad_accum": 4})
    assert "world_size: checkpoint has 2, this run has 1 (--train.elastic true resumes on another world size)" \
        in str(e.value)
    with pytest.raises(RuntimeError) as e:
        run(2, setup, out, ds, {**RUN, "grad_accum": 1})
    assert "global_batch: checkpoint has 4, this run has 2 (--train.elastic true recomputes grad_accum to keep it)" \
        in str(e.value)
    with pytest.raises(RuntimeError) as e:
        run(3, setup, out, ds, {**ELASTIC, "grad_accum": 2})
    line = next(x for x in str(e.value).splitlines() if "IncompatibleCheckpoint" in x)
    assert line.endswith("train.elastic: the global batch of 4 rows (micro_batch_size 1 x grad_accum 2 x 2 "
                         "data-parallel ranks) cannot be kept on 3 data-parallel ranks at micro_batch_size 1 (4 is "
                         "not a multiple of 3); resume on 1, 2, 4 data-parallel rank(s)"), line
    assert not list((out / "checkpoints").glob("*_universal*"))


@pytest.mark.slow
def test_failed_conversion_is_one_line_on_every_rank_then_retried(setup, tmp_path, monkeypatch):
    """ds_to_universal failing on rank 0 (the other rank waiting on the folder) stops both ranks with rank 0's
    line; the next attempt converts afresh and trains."""
    from deepspeed.checkpoint import ds_to_universal
    ds, out = "ds_configs/zero1.json", tmp_path / "run"
    run(1, setup, out, ds, {**FIRST, "grad_accum": 2})

    def boom(args):
        raise AssertionError("a converter defect\nsecond line")
    with monkeypatch.context() as m:
        m.setattr(ds_to_universal, "main", boom)  # the forked ranks inherit it
        with pytest.raises(RuntimeError) as e:
            run(2, setup, out, ds, ELASTIC)
    lines = [x for x in str(e.value).splitlines() if x.startswith("mod_train.train.checkpoint.IncompatibleCheckpoint")]
    assert len(lines) == 2 and lines[0] == lines[1], lines  # the same line on both ranks
    assert "could not convert" in lines[0] and "(AssertionError: a converter defect; log: " in lines[0]
    assert (out / "checkpoints" / "step_000003_universal.failed").is_file()
    assert sorted(run(2, setup, out, ds, ELASTIC)) == [4, 5, 6]
    assert not (out / "checkpoints" / "step_000003_universal.failed").exists()


def _meta(world=2, tp=1, pp=1, zero=1, mb=1, ga=2):
    return {"fingerprint": {"world_size": world, "tensor_parallel": tp, "pipeline_stages": pp, "zero_stage": zero,
                            "global_batch": mb * ga * world // (tp * pp)},
            "train": {"micro_batch_size": mb, "grad_accum": ga}}


def test_elastic_plan_keeps_the_global_batch_or_refuses_in_one_line():
    """The plan alone (no engine): what is kept, what is refused, each refusal one line naming what would work."""
    from pathlib import Path
    from mod_train.config import TrainConfig
    from mod_train.train import elastic
    d = Path("ck/step_000010")
    tc = TrainConfig(micro_batch_size=1, grad_accum=2)
    assert elastic.plan(d, _meta(), tc, world=2, tp=1, pp=1) is None  # resumes as saved
    p = elastic.plan(d, _meta(), tc, world=4, tp=1, pp=1)
    assert (p.grad_accum, p.universal, p.reshard) == (1, True, True)
    assert p.line() == ("elastic resume from step_000010: 2 -> 4 ranks (2 -> 4 data-parallel); grad_accum 2 -> 1 "
                        "keeps the global batch of 4 rows; model and optimizer state from the universal checkpoint "
                        "step_000010_universal; data re-sharded by document")
    assert not elastic.plan(d, _meta(zero=0), tc, world=1, tp=1, pp=1).universal  # ZeRO-0: states replicated
    same = elastic.plan(d, _meta(), TrainConfig(micro_batch_size=1, grad_accum=1), world=2, tp=1, pp=1)
    assert (same.grad_accum, same.universal, same.reshard) == (2, False, False)  # a later restart of the same size
    refusals = {
        "pipeline": (_meta(world=4, pp=2), dict(world=2, tp=1, pp=1),
                     "has 1 tensor-parallel x 2 pipeline x 2 data-parallel ranks, this run 1 x 1 x 2: DeepSpeed "
                     "0.19.8's universal checkpoint cannot re-shard pipeline stages; resume on 4 ranks with the same "
                     "layout, or train with autotp_size 1 and no pipeline stages to resume elastically"),
        "tp": (_meta(world=4, tp=2), dict(world=2, tp=2, pp=1),
               "has 2 tensor-parallel x 1 pipeline x 2 data-parallel ranks, this run 2 x 1 x 1: DeepSpeed 0.19.8's "
               "universal checkpoint cannot re-shard tensor-parallel states (measured: its converter mis-sizes the "
               "AutoTP-sharded embedding of a ZeRO-3 checkpoint; TP with ZeRO-1/2 is untested and refused too); "
               "resume on 4 ranks with the same layout"),
        "tp size": (_meta(world=4, tp=2), dict(world=4, tp=1, pp=1), "this run 1 x 1 x 4"),
        "batch": (_meta(), dict(world=3, tp=1, pp=1),
                  "the global batch of 4 rows (micro_batch_size 1 x grad_accum 2 x 2 data-parallel ranks) cannot be "
                  "kept on 3 data-parallel ranks at micro_batch_size 1 (4 is not a multiple of 3); resume on 1, 2, 4 "
                  "data-parallel rank(s)"),
    }
    for what, (meta, layout, msg) in refusals.items():
        with pytest.raises(ckpt.IncompatibleCheckpoint) as e:
            elastic.plan(d, meta, tc, **layout)
        assert str(e.value).startswith("train.elastic: ") and msg in str(e.value) and "\n" not in str(e.value), what
    with pytest.raises(ckpt.IncompatibleCheckpoint, match=r"or a --train.micro_batch_size that divides 3\)?"):
        elastic.plan(d, _meta(mb=2, ga=3), TrainConfig(micro_batch_size=2), world=4, tp=1, pp=1)
