"""Unit tests (no distributed world): the one run configuration (typed YAML, --section.key, --help), DeepSpeed config filling/refusals, lr schedule,
parameter groups and trainable selection, memory plans, checkpoint bookkeeping."""
import json
import math
import os

import pytest

from pathlib import Path

from mod_train import MoDConfig, cli
from mod_train.config import ConfigError, RunConfig, TrainConfig
from mod_train.parallel import dsconfig, memory
from mod_train.train import checkpoint as ckpt
from mod_train.train.optim import lr_lambda, param_groups, set_trainable


def test_overrides_types_and_did_you_mean():
    cfg = cli.parse(RunConfig, ["--model", "m", "--out", "o", "--ds", "x.json", "--mod.threshold", "0.55",
                                "--train.max_steps=100", "--mod.layers", "[1,3]", "--train.train_modules",
                                "[mlp,norm]", "--train.router_lr", "null", "--train.grad_checkpointing", "true"])
    t, m = cfg.train, cfg.mod
    assert (cfg.ds, m.threshold, t.max_steps, m.layers, t.train_modules, t.router_lr, t.grad_checkpointing) == \
        ("x.json", 0.55, 100, [1, 3], ["mlp", "norm"], None, True)
    base = ["--model", "m", "--out", "o"]
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        cli.parse(RunConfig, base + ["--train.max_step", "3"])
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        cli.parse(RunConfig, base + ["--trian.lr", "3"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        cli.parse(RunConfig, base + ["--train.max_steps", "many"])
    with pytest.raises(ConfigError, match="train.grad_checkpointing"):
        cli.parse(RunConfig, base + ["--train.grad_checkpointing", "maybe"])
    with pytest.raises(ConfigError, match="'threshold', 'topk'"):
        cli.parse(RunConfig, base + ["--mod.routing", "topkk"])
    with pytest.raises(ConfigError, match="train.log_every = 0"):
        cli.parse(RunConfig, base + ["--train.log_every", "0"])


def test_yaml_is_typed_by_the_dataclasses(tmp_path):
    """`lr: 1e-4` (a string to PyYAML) arrives as a float; a typo in a file is refused with the closest key;
    the shipped main-job YAML is a complete RunConfig."""
    good = tmp_path / "run.yaml"
    good.write_text("model: m\nout: o\ntrain:\n  lr: 1e-4\n  betas: [0.9, 0.99]\nmod:\n  layers: all\n")
    cfg = cli.parse(RunConfig, ["--config", str(good), "--train.lr", "2e-4"])
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.betas[0], float) and cfg.mod.layers == "all"
    assert cli.parse(RunConfig, ["--config", str(good)]).train.lr == 1e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nout: o\ntrain:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        cli.parse(RunConfig, ["--config", str(bad)])
    main = cli.parse(RunConfig, ["--config", "launch/main_cpu.yaml"])
    assert main.train.lr == 1e-3 and main.train.trainable == "lora" and main.mod.target_rate == 0.7308
    assert main.init == "routed" and main.mod.rate_hold == "window" and main.eval.lengths


@pytest.mark.parametrize("launcher", ["adapt.py", "main.py", "eval.py", "bench.py", "ablate.py", "export.py",
                                      "bench_train.py", "build_data.py", "bench_data.py", "fetch_corpus.py", "curve.py",
                                      "slurm/plan.py"])
def test_every_launcher_is_thin_and_documents_its_fields(launcher, capsys, monkeypatch):
    """--help lists each field with its one-line doc; launchers stay thin and never edit sys.path."""
    import importlib.util
    path = Path("launch") / launcher
    text = path.read_text()
    assert "sys.path.insert" not in text and len(text.splitlines()) <= 85
    spec = importlib.util.spec_from_file_location(f"launcher_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--config CONFIG" in out
    if launcher in ("adapt.py", "main.py"):
        assert "--train.lr" in out and "Peak learning rate of the base-model parameters" in out
        assert "--mod.routing {threshold,topk}" in out


def test_bad_setting_is_one_line_before_any_model(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "launch/adapt.py", "--model", str(tmp_path / "nowhere"), "--out",
                          str(tmp_path / "o"), "--recipe", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "recipe file not found" in out.stderr, out.stderr


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload", "zero3_tp2", "pipeline"])
def test_presets_fill_every_auto(name):
    tc = TrainConfig(micro_batch_size=2, grad_accum=3, precision="bf16", lr=1e-4, grad_clip=0.5)
    ds = dsconfig.fill(dsconfig.load(f"ds_configs/{name}.json"), tc, world_size=4, hidden_size=64)
    assert "\"auto\"" not in json.dumps(ds)
    dp = 4 // (dsconfig.tp_size(ds) * dsconfig.pp_stages(ds))
    assert ds["train_batch_size"] == 2 * 3 * dp and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["optimizer"]["params"]["lr"] == 1e-4
    assert ds["optimizer"]["params"]["torch_adam"] is True  # CPU


def test_configs_that_cannot_work_are_refused():
    with pytest.raises(dsconfig.DSConfigError, match="fp16 is not supported on CPU"):
        dsconfig.fill(dsconfig.load("ds_configs/zero2.json"), TrainConfig(precision="fp16"), 2)
    ds = dsconfig.load("ds_configs/pipeline.json")
    ds["zero_optimization"]["stage"] = 2
    with pytest.raises(dsconfig.DSConfigError, match="ZeRO stage 0 or 1"):
        dsconfig.fill(ds, TrainConfig(precision="fp32"), 2)
    with pytest.raises(dsconfig.DSConfigError, match="not divisible"):
        dsconfig.fill(dsconfig.load("ds_configs/zero3_tp2.json"), TrainConfig(precision="fp32"), 3)
    hf = dsconfig.for_hf(dsconfig.fill(dsconfig.load("ds_configs/zero3_tp2.json"), TrainConfig(precision="fp32"), 4))
    assert "tensor_parallel" not in hf and "train_batch_size" not in hf


def test_lr_schedule_warmup_then_cosine():
    tc = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = lr_lambda(tc)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def _tiny_mod():
    from conftest import tiny_model
    from mod_train import modify
    return modify(tiny_model(), MoDConfig())


def test_trainable_modes_and_router_param_group():
    m = _tiny_mod()
    n, total = set_trainable(m, TrainConfig(trainable="routers"))
    assert n == 2 * (32 + 1) and total > n
    assert all(p.requires_grad == ("router" in k) for k, p in m.named_parameters())
    set_trainable(m, TrainConfig(trainable="routers+modules", train_modules=["mlp"]))
    assert all(p.requires_grad == ("router" in k or "mlp" in k) for k, p in m.named_parameters())
    set_trainable(m, TrainConfig(trainable="full"))
    groups = {g["name"]: g for g in param_groups(m, TrainConfig(lr=1e-5, router_lr=1e-3, weight_decay=0.1))}
    assert groups["router"]["lr"] == 1e-3 and groups["router"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])


def test_memory_plan_70b():
    total, _, _ = memory.count_params(memory.PRESETS["llama3-70b"])
    assert 70.0e9 < total < 71.0e9
    c = memory.PRESETS["llama3-70b"]
    fits = memory.estimate(c, zero_stage=3, dp=64, precision="bf16", seq_len=8192, offload_optimizer=True,
                           offload_param=True)
    memory.check(fits, 80)
    plain = memory.estimate(c, zero_stage=1, dp=16, precision="bf16", seq_len=8192)
    assert plain.weights == pytest.approx(total * 2, rel=0.01)
    with pytest.raises(memory.PlanDoesNotFit, match="largest item is weights"):
        memory.check(plain, 80)
    nockpt = memory.estimate(c, zero_stage=3, dp=64, seq_len=8192, grad_ckpt=False)
    ck = memory.estimate(c, zero_stage=3, dp=64, seq_len=8192, grad_ckpt=True)
    assert nockpt.activations > 10 * ck.activations


def test_find_resume_skips_incomplete_and_reports(tmp_path, capsys):
    for s in (2, 4, 6):
        d = tmp_path / ckpt.tag_for(s)
        d.mkdir()
        (d / "a.pt").write_bytes(b"x" * 10)
        if s != 6:
            ckpt.write_manifest(d)
    (tmp_path / "latest").write_text(ckpt.tag_for(4))
    assert ckpt.find_resume(tmp_path) == "step_000004"  # step 6 is a partial save newer than latest
    (tmp_path / "step_000004" / "a.pt").write_bytes(b"x" * 3)
    assert ckpt.find_resume(tmp_path) == "step_000002"
    assert "FALLING BACK" in capsys.readouterr().out
    diffs = ckpt.compare_fingerprints({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
    assert diffs == ["b.c: checkpoint has 2, this run has 3"]


def test_cuda_arch_list_set_when_unset_and_cuda_present(monkeypatch, capsys):
    """issue 16 item 5: DeepSpeed's op builder cannot parse torch's 'sm_90a' (CUDA 13, Hopper), so every launcher
    (parallel.dist.init, before DeepSpeed is imported) sets TORCH_CUDA_ARCH_LIST to the visible devices'
    capabilities when it is unset, in one line on rank 0; never when the user set it, never without CUDA."""
    import torch
    from mod_train.parallel import dist as pdist
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: [(9, 0), (8, 0), (9, 0)][i])
    assert pdist.default_cuda_arch_list() == "8.0;9.0"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "[mod_train] TORCH_CUDA_ARCH_LIST was unset: set to '8.0;9.0'" in out, out
    assert pdist.default_cuda_arch_list() is None and capsys.readouterr().out == ""  # set now: left alone
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")  # the user's value, whatever it is
    assert pdist.default_cuda_arch_list() is None and os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0a"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setenv("RANK", "1")  # other ranks set it silently
    assert pdist.default_cuda_arch_list() == "8.0;9.0" and capsys.readouterr().out == ""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pdist.default_cuda_arch_list() is None and "TORCH_CUDA_ARCH_LIST" not in os.environ
    assert capsys.readouterr().out == ""

    class Called(Exception):
        pass

    def called():
        raise Called

    monkeypatch.setattr(pdist, "default_cuda_arch_list", called)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(Called):  # init() takes this step before its DeepSpeed imports and the process group
        pdist.init()
