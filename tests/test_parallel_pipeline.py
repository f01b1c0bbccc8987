"""Pipeline parallelism: the MoD model split into 2 DeepSpeed PipelineModule stages trains with the
same losses (LM and auxiliary) and routing statistics as the single-process model; the pipeline
checkpoint exports to a HF model; ZeRO-2/3 with a pipeline is refused."""
import pytest
import torch

from harness import losses, make_tiny_model, run_ranks, train_worker

STAGE0 = {"zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.slow
def test_pipeline_two_stages_matches_reference(tiny, tmp_path):
    train = {"max_steps": 3, "grad_accum": 2}
    ref = tmp_path / "ref"
    run_ranks(train_worker, 1, tiny, ref, STAGE0, train)
    out = tmp_path / "pp"
    run_ranks(train_worker, 2, tiny, out, "ds_configs/pipeline.json", train)
    a, b = losses(ref), losses(out)
    assert sorted(a) == sorted(b)
    for s in a:
        for k in ("loss/lm", "loss/aux", "routing/rate_l1", "routing/gate_l3"):
            assert a[s][k] == pytest.approx(b[s][k], rel=2e-5, abs=1e-6), (s, k, a[s][k], b[s][k])
    import mod_train  # noqa: F401
    from transformers import AutoModelForCausalLM
    from mod_train.train.export import export
    m = AutoModelForCausalLM.from_pretrained(export(out, tmp_path / "hf"))
    assert m.model.layers[3].router.weight.shape == (1, 32)
    ids = torch.randint(0, 128, (1, 16))
    assert torch.isfinite(m(ids, labels=ids).loss)


def test_pipeline_with_zero3_is_refused():
    from mod_train.parallel import dsconfig
    from mod_train.config import TrainConfig
    ds = dsconfig.load("ds_configs/pipeline.json")
    ds["zero_optimization"]["stage"] = 3
    with pytest.raises(dsconfig.DSConfigError, match="only with ZeRO stage 0 or 1"):
        dsconfig.fill(ds, TrainConfig(precision="fp32"), world_size=2)
