"""The distillation objective: the KD loss is the hand-computed forward KL with the LM loss's masking; the
routing-off teacher is the dense model exactly; KD training under ZeRO-3 on 2 ranks matches one process."""
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from harness import losses, make_tiny_model, run_ranks, train_worker
from mod_train.train.objective import kd_loss

STAGE0 = {"zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}


def test_kd_loss_is_the_masked_forward_kl():
    g = torch.Generator().manual_seed(0)
    B, S, V, T = 2, 7, 11, 2.0
    s, t = torch.randn(B, S, V, generator=g), torch.randn(B, S, V, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 3] = -100                       # first token of a packed document (or padding)
    doc = torch.zeros(B, S, dtype=torch.long)
    doc[1, 5:] = 1                            # row 1: a document starts at position 5
    total, n = 0.0, 0
    for b in range(B):
        for i in range(S - 1):
            if labels[b, i + 1] == -100 or doc[b, i + 1] != doc[b, i]:
                continue
            p = torch.softmax(t[b, i] / T, -1).double()
            q = torch.softmax(s[b, i] / T, -1).double()
            total += float((p * (p.log() - q.log())).sum())
            n += 1
    assert n == B * (S - 1) - 2
    assert kd_loss(s, t, labels, T, doc).item() == pytest.approx(total * T * T / n, rel=1e-5)
    assert kd_loss(s, s, labels, T, doc).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_routing_off_teacher_is_the_dense_model(arch):
    from mod_train import MoDConfig, modify
    from conftest import randomize_routers
    dense = tiny_model(arch, layers=4).eval()
    ids = torch.randint(0, dense.config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = dense(ids).logits
    m = modify(tiny_model(arch, layers=4), MoDConfig(layers="all", router_init="zero")).eval()
    randomize_routers(m)
    with torch.no_grad():
        routed = m(ids).logits
        with m.routing_disabled():
            off = m(ids)
        again = m(ids).logits
    torch.testing.assert_close(off.logits, ref, rtol=1e-5, atol=1e-5)
    assert float(off.aux_loss) == 0.0 and not off.routing
    assert not torch.allclose(routed, ref, atol=1e-3)       # routing was on, and is back on after the block
    torch.testing.assert_close(again, routed)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_kd") / "model")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_kd_two_ranks_match_one_process(stage, tiny, tmp_path):
    """ZeRO-3: the frozen teacher is partitioned like the student; ZeRO-1: a plain replicated copy."""
    train = {"objective": "lm+kd", "kd_weight": 2.0, "max_steps": 3}
    keys = ("loss/lm", "loss/kd", "loss/aux")
    if stage == 3:  # the hidden-state term too: taps on the partitioned student and teacher
        train.update(kd_hidden_weight=0.5, kd_hidden_layers=[1, -1])
        keys += ("loss/kd_hidden",)
    run_ranks(train_worker, 1, tiny, tmp_path / "ref", STAGE0, {**train, "grad_accum": 2})
    run_ranks(train_worker, 2, tiny, tmp_path / "z3", f"ds_configs/zero{stage}.json", train)
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "z3")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        for k in keys:
            assert a[s][k] == pytest.approx(b[s][k], rel=2e-5, abs=1e-6), (s, k, a[s][k], b[s][k])
    assert a[1]["loss/kd"] > 0 and all(math.isfinite(a[s]["loss/kd"]) for s in a)
    if stage == 3:
        assert a[1]["loss/kd_hidden"] > 0


def test_hidden_loss_is_the_masked_cosine_distance():
    from mod_train.train.objective import hidden_loss
    g = torch.Generator().manual_seed(1)
    B, S, H = 2, 6, 5
    st = {j: torch.randn(B, S, H, generator=g) for j in (1, 3)}
    te = {j: torch.randn(B, S, H, generator=g) for j in (1, 3)}
    labels = torch.ones(B, S, dtype=torch.long)
    labels[1, 2] = -100                       # position 1 of row 1 is not scored
    per_layer = []
    for j in (1, 3):
        d = [1 - float(torch.dot(st[j][b, i], te[j][b, i]) / (st[j][b, i].norm() * te[j][b, i].norm()))
             for b in range(B) for i in range(S - 1) if not (b == 1 and i == 1)]
        per_layer.append(sum(d) / len(d))
    assert hidden_loss(st, te, labels).item() == pytest.approx(sum(per_layer) / 2, rel=1e-5)
    assert hidden_loss(te, te, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_taps_match_across_mod_dense_and_pruned_students():
    """The hidden state after original layer j is read the same way from a MoD model (routing off), the dense HF
    model and a pruned one whose deleted layers come after j; a deleted layer is refused by name."""
    from mod_train import MoDConfig, modify
    from mod_train.config import ConfigError, TrainConfig
    from mod_train.mod.prune import prune_layers
    from mod_train.train.objective import capture_hidden, resolve_hidden_layers
    torch.manual_seed(0)
    dense = tiny_model("llama", layers=4).eval()
    ids = torch.randint(0, dense.config.vocab_size, (1, 8))
    mod = modify(tiny_model("llama", layers=4), MoDConfig(layers="all", router_init="zero")).eval()
    mod.load_state_dict(dense.state_dict(), strict=False)
    pruned = prune_layers(tiny_model("llama", layers=4).eval(), [2])
    pruned.load_state_dict({k: v for k, v in dense.state_dict().items() if ".layers.2." not in k and ".layers.3." not in k}
                           | {k.replace(".layers.3.", ".layers.2."): v for k, v in dense.state_dict().items()
                              if ".layers.3." in k})
    assert pruned.config.pruned_layers == [2]
    with torch.no_grad():
        with mod.routing_disabled(), capture_hidden(mod, [1, 3]) as hm:
            mod(ids)
        with capture_hidden(dense, [1, 3]) as hd:
            ref = dense(ids, output_hidden_states=True).hidden_states
        with capture_hidden(pruned, [1, 3]) as hp:
            pruned(ids)
    torch.testing.assert_close(hm[1], ref[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hd[1], ref[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hp[1], ref[2], rtol=1e-5, atol=1e-5)   # layers before the deleted one
    assert not torch.allclose(hp[3], hd[3], atol=1e-3)                 # after it: the pruned path differs
    torch.testing.assert_close(hm[3], hd[3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="kd_hidden_layers.*deleted"):
        with capture_hidden(pruned, [2]):
            pass
    tc = TrainConfig(objective="kd", kd_hidden_weight=1.0, kd_hidden_layers=[1, -1])
    assert resolve_hidden_layers(tc, 4) == [1, 3]
    with pytest.raises(ConfigError, match=r"kd_hidden_layers = \[1, 7\]"):
        resolve_hidden_layers(TrainConfig(objective="kd", kd_hidden_weight=1.0, kd_hidden_layers=[1, 7]), 4)
    with pytest.raises(ConfigError, match="kd_hidden_weight"):
        TrainConfig(objective="lm", kd_hidden_weight=1.0).validate()


def test_routers_only_teacher_is_the_student_with_routing_off():
    """trainable='routers': build_teacher builds no second copy; it runs the student's own module with routing
    off, which gives the dense model's logits."""
    import copy
    from conftest import randomize_routers
    from mod_train import MoDConfig, modify
    from mod_train.config import RunSpec, TrainConfig
    from mod_train.train.engine import Built, build_teacher
    dense = tiny_model("llama", layers=4).eval()
    m = randomize_routers(modify(copy.deepcopy(dense), MoDConfig(layers="all", router_init="zero")))
    built = Built(engine=object(), model=m, group_names=[], n_trainable=0, n_params=0, accepts_doc_ids=True)
    teacher = build_teacher(RunSpec(model="unused", out="unused"), TrainConfig(objective="kd", trainable="routers"),
                            m.mod_config, {}, built)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(teacher({"input_ids": ids}), dense(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(m(ids).logits, dense(ids).logits, atol=1e-3)  # the student itself routes


@pytest.mark.slow
def test_routers_only_kd_runs_on_zero3(tiny, tmp_path):
    train = {"objective": "kd", "trainable": "routers", "router_lr": 1e-2, "max_steps": 2}
    res = run_ranks(train_worker, 2, tiny, tmp_path, "ds_configs/zero3.json", train)
    assert all(r["status"] == "completed" for r in res)
    m = losses(tmp_path)
    assert m[1]["loss/kd"] > 0 and math.isfinite(m[2]["loss/kd"])


def _bench(model, out):
    from mod_train.experiments.bench_train import TrainBenchConfig, run_train_bench
    return run_train_bench(TrainBenchConfig(model=model, seq_len=32, steps=1, warmup=1, rates=[0.5], kd=True,
                                            ds=str(Path(__file__).resolve().parents[1] / "ds_configs/zero1.json"),
                                            out=out))


def test_train_bench_times_the_kd_step_against_the_plain_step(tiny, tmp_path):
    """launch/bench_train.py --kd: every configuration also runs with a frozen teacher, reported as the ratio of
    its step time to the same configuration's LM step (the figure in docs/training.md). In a forked rank: the
    in-process DeepSpeed groups must not leak into the parent that forks the other tests' ranks."""
    res = run_ranks(_bench, 1, tiny, str(tmp_path / "b"))[0]
    by = {r["config"]: r for r in res["results"]}
    assert sorted(by) == ["dense", "dense_kd", "mod_r0.5", "mod_r0.5_kd"]
    for name in ("dense_kd", "mod_r0.5_kd"):
        assert by[name]["step_vs_plain"] == pytest.approx(by[name]["median_step_s"] / by[name[:-3]]["median_step_s"])
    assert "step_vs_plain" not in by["dense"] and by["mod_r0.5"]["realised_rate"] < 1.0
