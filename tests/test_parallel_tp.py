"""AutoTP: 2 tensor-parallel ranks give the single-process reference losses, the routers stay
replicated with identical routing on both TP ranks, TP composes with ZeRO-3, and the consolidated
weights export to a full HF model."""
import pytest
import torch

from harness import losses, make_tiny_model, run_ranks, train_worker

STAGE0 = {"zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _tp_probe(model, out):
    res = train_worker(model, out, "ds_configs/zero3_tp2.json", {"max_steps": 3}, trace_routing=True)
    from mod_train.train.trainer import Trainer  # noqa: F401
    return res


@pytest.mark.slow
def test_autotp2_zero3_matches_reference_with_identical_routing(tiny, tmp_path):
    ref = tmp_path / "ref"
    run_ranks(train_worker, 1, tiny, ref, STAGE0, {"max_steps": 3})
    out = tmp_path / "tp"
    r0, r1 = run_ranks(train_worker, 2, tiny, out, "ds_configs/zero3_tp2.json", {"max_steps": 3}, trace_routing=True)
    a, b = losses(ref), losses(out)
    for s in a:
        for k in ("loss/lm", "loss/aux", "routing/rate_mean"):
            assert a[s][k] == pytest.approx(b[s][k], rel=1e-4, abs=1e-6), (s, k)
    # routers replicated: every TP rank computes the same router logits, hence the same routing
    assert len(r0["trace"]) == len(r1["trace"]) > 0
    for (n0, z0), (n1, z1) in zip(r0["trace"], r1["trace"]):
        assert n0 == n1 and z0.shape == z1.shape
        assert torch.equal(z0 >= 0, z1 >= 0) and torch.equal(z0, z1)
    # consolidated weights -> full HF model
    import mod_train  # noqa: F401
    from transformers import AutoModelForCausalLM
    from mod_train.train.export import export
    m = AutoModelForCausalLM.from_pretrained(export(out, tmp_path / "hf"))
    assert m.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    assert m.model.layers[1].router.weight.shape == (1, 32)
