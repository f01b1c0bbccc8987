"""trainable: lora (peft adapters, routers trained fully): a short DeepSpeed run trains only adapters and routers;
the export merges the adapters into a plain MoD directory that reloads with trust_remote_code and gives the
unmerged model's logits; the KD teacher (routing and adapters off) is the dense original; bad fields are one line."""
import pytest
import torch
from conftest import randomize_routers, tiny_model

from harness import losses, make_tiny_model, run_ranks, train_worker

LORA = {"trainable": "lora", "lora_rank": 4, "lora_alpha": 8.0, "router_lr": 1e-2, "max_steps": 3,
        "objective": "lm+kd"}


def _tiny_lora(seed=0, b_std=0.5):
    """A tiny MoD model with random routers and LoRA adapters whose B is random (so the adapters matter)."""
    import copy
    from mod_train import MoDConfig, modify
    from mod_train.config import TrainConfig
    from mod_train.train import lora
    dense = tiny_model("llama", layers=4, seed=seed).eval()
    m = randomize_routers(modify(copy.deepcopy(dense), MoDConfig(layers="all", router_init="zero")))
    tc = TrainConfig(**{k: v for k, v in LORA.items() if k.startswith(("trainable", "lora_"))})
    lora.apply(m, tc)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, b_std, generator=torch.Generator().manual_seed(len(n)))
    return dense, m.eval(), tc


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """(dense model dir, run dir) of a 3-step ZeRO-1 LoRA run with KD on one process."""
    root = tmp_path_factory.mktemp("lora")
    tiny = make_tiny_model(root / "model")
    res = run_ranks(train_worker, 1, tiny, root / "run", "ds_configs/zero1.json", LORA)
    assert res[0]["status"] == "completed"
    return tiny, root / "run"


def _checkpoint_state(run):
    from mod_train.train import checkpoint as ckpt
    from mod_train.train.export import load_state_dict, resolve
    root, tag = resolve(run)
    return load_state_dict(root, tag, ckpt.load_meta(root / tag))


def test_lora_run_trains_only_adapters_and_routers(lora_run):
    from safetensors.torch import load_file
    tiny, run = lora_run
    sd, orig = _checkpoint_state(run), load_file(f"{tiny}/model.safetensors")
    m = losses(run)
    assert sorted(m) == [1, 2, 3] and m[1]["loss/kd"] >= 0 and m[3]["loss/kd"] > 0
    base = {k.replace(".base_layer", ""): v for k, v in sd.items() if "lora_" not in k and "router" not in k}
    assert set(base) == set(orig)  # every dense weight, under its own name once the wrapper is taken off
    for k, v in orig.items():
        assert torch.equal(base[k], v.float()), k  # bit-for-bit: frozen
    lora_b = [v for k, v in sd.items() if "lora_B" in k]
    assert len(lora_b) == 4 * 7 and all(v.abs().max() > 0 for v in lora_b)  # every projection adapted, trained
    routers = [v for k, v in sd.items() if "router" in k and k.endswith("weight")]
    assert routers and all(v.abs().max() > 0 for v in routers)  # router_init='zero': moved off zero


def test_lora_resume_is_exact(lora_run, tmp_path):
    """Adapters are ordinary module parameters: stopped after 2 steps and resumed, the run ends where the
    uninterrupted one did (losses and every weight)."""
    tiny, ref = lora_run
    out = tmp_path / "run"
    cut = run_ranks(train_worker, 1, tiny, out, "ds_configs/zero1.json", {**LORA, "save_every": 1, "exit_after_steps": 2})
    assert cut[0]["status"] == "exited" and cut[0]["step"] == 2
    done = run_ranks(train_worker, 1, tiny, out, "ds_configs/zero1.json", LORA)
    assert done[0]["status"] == "completed" and done[0]["step"] == 3
    assert losses(out)[3]["loss/lm"] == pytest.approx(losses(ref)[3]["loss/lm"], rel=1e-6)
    a, b = _checkpoint_state(ref), _checkpoint_state(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RuntimeError, match="lora"):  # other adapters cannot resume this run
        run_ranks(train_worker, 1, tiny, out, "ds_configs/zero1.json", {**LORA, "lora_rank": 8, "max_steps": 4})


def test_export_merges_adapters_and_reloads(lora_run, tmp_path):
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from mod_train.config import TrainConfig
    from mod_train.train import lora
    from mod_train.train.export import export
    _, run = lora_run
    dest = export(run, tmp_path / "export")
    saved = load_file(dest / "model.safetensors")
    assert not [k for k in saved if "lora_" in k or "base_layer" in k]
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["model_type"].startswith("mod_") and "auto_map" in cfg and "peft" not in json.dumps(cfg)
    # the unmerged model: the export's own architecture with the checkpoint's adapters, run through peft
    unmerged = AutoModelForCausalLM.from_pretrained(dest).eval()
    lora.apply(unmerged, TrainConfig(**{k: v for k, v in LORA.items() if k.startswith(("trainable", "lora_"))}))
    res = unmerged.load_state_dict(_checkpoint_state(run), strict=False)
    assert not res.unexpected_keys and not [k for k in res.missing_keys if "inv_freq" not in k]
    reloaded = AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=True).eval()
    assert type(reloaded).__name__ == "MoDLlamaForCausalLM" and not lora.lora_layers(reloaded)
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = unmerged(input_ids=ids).logits, reloaded(input_ids=ids).logits
        with lora.adapters_disabled(unmerged):
            base = unmerged(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, ref, atol=1e-4)  # the adapters did change the function, and were merged


def test_merge_equals_unmerged_in_memory():
    from mod_train.train import lora
    _, m, _ = _tiny_lora()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = m(ids).logits
        lora.merge(m)
        got = m(ids).logits
    assert not lora.lora_layers(m) and not [n for n, _ in m.named_parameters() if "lora_" in n]
    assert "peft_config" not in vars(m)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_lora_teacher_is_the_dense_original():
    """trainable='lora': build_teacher makes no copy; the student's own module with routing and adapters off is the
    dense model, and the adapters are on (and trainable) again afterwards."""
    from mod_train.config import RunSpec, TrainConfig
    from mod_train.train.engine import Built, build_teacher
    dense, m, tc = _tiny_lora()
    built = Built(engine=object(), model=m, group_names=[], n_trainable=0, n_params=0, accepts_doc_ids=True)
    teacher = build_teacher(RunSpec(model="unused", out="unused"), TrainConfig(objective="kd", trainable="lora"),
                            m.mod_config, {}, built)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = dense(ids).logits
        torch.testing.assert_close(teacher({"input_ids": ids}), ref, rtol=1e-5, atol=1e-5)
        student = m(ids).logits
        with m.routing_disabled():
            adapted = m(ids).logits
    assert not torch.allclose(student, ref, atol=1e-3)   # the student itself routes
    assert not torch.allclose(adapted, ref, atol=1e-3)   # and its adapters are back on after the teacher
    assert all(p.requires_grad for n, p in m.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("field,value", [("lora_rank", 0), ("lora_alpha", -1.0), ("lora_dropout", 1.0),
                                         ("lora_target_modules", []), ("lora_target_modules", ["q_proj", "router"])])
def test_bad_lora_field_is_one_line_naming_it(field, value):
    from mod_train.config import ConfigError, TrainConfig
    with pytest.raises(ConfigError) as e:
        TrainConfig(trainable="lora", **{field: value}).validate()
    assert str(e.value).startswith(f"train.{field} = ") and "\n" not in str(e.value)


def test_unknown_target_module_is_one_line():
    from mod_train import MoDConfig, modify
    from mod_train.config import ConfigError, TrainConfig
    from mod_train.train import lora
    m = modify(tiny_model("llama", layers=2), MoDConfig(layers="all"))
    with pytest.raises(ConfigError, match=r"^train\.lora_target_modules = \['qproj'\]: no such linear layer"):
        lora.apply(m, TrainConfig(trainable="lora", lora_target_modules=["qproj"]))


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_under_zero_2_and_3_trains_and_exports(stage, tmp_path):
    """ZeRO-3: the base weights are partitioned when the adapters are injected; the engine partitions the new
    adapter parameters. The export has the frozen weights as they were and the adapters merged."""
    from safetensors.torch import load_file
    from mod_train.train.export import export
    tiny = make_tiny_model(tmp_path / "model")
    res = run_ranks(train_worker, 1, tiny, tmp_path / "run", f"ds_configs/zero{stage}.json", {**LORA, "max_steps": 2})
    assert res[0]["status"] == "completed"
    sd, orig = _checkpoint_state(tmp_path / "run"), load_file(f"{tiny}/model.safetensors")
    for k, v in orig.items():
        assert torch.equal(sd[k.replace("_proj.", "_proj.base_layer.")], v), k
    assert all(v.abs().max() > 0 for k, v in sd.items() if "lora_B" in k)
    saved = load_file(export(tmp_path / "run", tmp_path / "export") / "model.safetensors")
    assert set(saved) == set(orig) | {k for k in sd if "router" in k}
    assert any(not torch.equal(saved[k], v) for k, v in orig.items() if "_proj" in k)  # adapters merged in


def test_memory_plan_counts_adapters_and_no_teacher_copy():
    """Llama-3-8B, r=16 on all seven projections: 42M adapter parameters, 32 layers x 16 x (q, o: 4096 + 4096;
    k, v: 4096 + 1024; gate, up, down: 4096 + 14336); optimizer state for those only, no frozen teacher copy."""
    from mod_train.config import TrainConfig
    from mod_train.parallel import memory
    c, ds = memory.PRESETS["llama3-8b"], {"zero_optimization": {"stage": 1}}
    assert memory.count_lora_params(c, 16, TrainConfig().lora_target_modules) == 41_943_040
    plan = {t: memory.plan_from(c, ds, TrainConfig(trainable=t, objective="lm+kd", precision="bf16"), 8)
            for t in ("full", "routers", "lora")}
    assert plan["lora"].teacher == plan["routers"].teacher == 0 < plan["full"].teacher
    assert plan["lora"].optim - plan["routers"].optim == pytest.approx(41_943_040 * 12 / 8, rel=1e-6)
    assert plan["lora"].optim < plan["full"].optim / 100


@pytest.mark.slow
def test_lora_zero3_two_ranks_match_one_process(tmp_path):
    """ZeRO-3 on 2 ranks: the adapters (created from the same seed on each rank, partitioned by the engine) and the
    free teacher give the losses of one unpartitioned process with the same global batch."""
    stage0 = {"zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
    tiny = make_tiny_model(tmp_path / "model")
    run_ranks(train_worker, 1, tiny, tmp_path / "ref", stage0, {**LORA, "grad_accum": 2})
    run_ranks(train_worker, 2, tiny, tmp_path / "z3", "ds_configs/zero3.json", LORA)
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "z3")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        for k in ("loss/lm", "loss/kd", "loss/aux"):
            assert a[s][k] == pytest.approx(b[s][k], rel=2e-5, abs=1e-6), (s, k, a[s][k], b[s][k])
    assert a[3]["loss/kd"] > 0


def test_routers_only_stage_then_lora(tmp_path):
    """router_stage_steps=2: the first two steps move the routers only (the adapters stay at their init, their
    lr is 0), the third moves the adapters too; the schedule of the other groups starts after the stage."""
    from mod_train.config import TrainConfig
    from mod_train.train.optim import group_lr_lambdas
    tc = TrainConfig(max_steps=6, warmup_steps=1, router_stage_steps=2)
    router, other = group_lr_lambdas(tc, ["router", "decay"])
    assert [other(s) for s in range(3)] == [0.0, 0.0, 0.5] and router(0) == 0.5
    tiny = make_tiny_model(tmp_path / "model")
    runs = {}
    for steps in (2, 3):
        res = run_ranks(train_worker, 1, tiny, tmp_path / f"run{steps}", "ds_configs/zero1.json",
                        {**LORA, "max_steps": steps, "router_stage_steps": 2})
        assert res[0]["status"] == "completed"
        runs[steps] = _checkpoint_state(tmp_path / f"run{steps}")
    lora_b = {k: v for k, v in runs[2].items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() == 0 for v in lora_b.values())  # B starts at zero and did not move
    assert any(v.abs().max() > 0 for k, v in runs[2].items() if "router" in k and k.endswith("weight"))
    assert all(runs[3][k].abs().max() > 0 for k in lora_b)
