"""The recovery toolkit of a conversion: the straight-through gate (x1 forward, router still learns), one compute
budget over all routed layers (global scope), the annealed rate schedule and the threshold controller that
realises it, and the block-influence start that contains static depth pruning."""
import copy

import pytest
import torch
from conftest import randomize_routers, tiny_model

from harness import losses, make_tiny_model, run_ranks, train_worker
from mod_train import MoDConfig, fit_routers_to_importance, modify
from mod_train.config import TrainConfig
from mod_train.mod.prune import allocate_budget, block_influence, prune_layers
from mod_train.train.rate import scheduled_rate


def test_ste_gate_is_one_forward_and_trains_the_router():
    dense = tiny_model("llama", layers=4)
    ids = torch.randint(0, 128, (2, 10))
    m = modify(copy.deepcopy(dense), MoDConfig(layers="all", router_init="dense", gate_form="ste"))
    with torch.no_grad():  # every token runs (g = 0.95 >= 0.5) and its update is x1: the dense model
        torch.testing.assert_close(m(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    m.train()
    m(ids, labels=ids).loss.backward()
    assert all(float(m.model.layers[j].router.weight.grad.abs().sum()) > 0 for j in m.routed_layers)
    paper = modify(copy.deepcopy(dense), MoDConfig(layers="all", router_init="dense"))
    with torch.no_grad():
        assert not torch.allclose(paper(ids).logits, dense(ids).logits, atol=1e-3)  # x 0.95 differs


def test_rate_schedule_values():
    tc = TrainConfig(rate_warmup_steps=4, rate_start=1.0)
    assert [scheduled_rate(tc, 0.5, s) for s in (0, 1, 2, 4, 9)] == [1.0, 0.875, 0.75, 0.5, 0.5]
    assert scheduled_rate(TrainConfig(), 0.5, 0) == 0.5


def _train_routers(scope: str, steps: int = 120):
    m = modify(tiny_model("llama", layers=4), MoDConfig(layers="all", router_init="zero", target_rate=0.5,
                                                      target_weight=5.0, target_scope=scope)).train()
    randomize_routers(m, std=0.5)
    with torch.no_grad():  # layers start far apart: one nearly closed, one nearly open
        for j, b in zip(m.routed_layers, (-1.5, -0.5, 0.5, 1.5)):
            m.model.layers[j].router.bias.fill_(b)
    opt = torch.optim.Adam([p for n, p in m.named_parameters() if "router" in n], lr=0.05)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        out = m(ids, labels=ids)
        opt.zero_grad()
        out.aux_loss.backward()
        opt.step()
    return {j: float(r["rate"]) for j, r in m(ids, labels=ids).routing.items()}


def test_global_scope_holds_the_mean_while_layers_differ():
    g = _train_routers("global")
    assert sum(g.values()) / len(g) == pytest.approx(0.5, abs=0.05)
    assert max(g.values()) - min(g.values()) > 0.3, g  # one budget: the layers keep different shares
    per_layer = _train_routers("layer")
    assert all(abs(r - 0.5) < 0.1 for r in per_layer.values()), per_layer


def test_allocated_start_equals_static_pruning():
    """All-or-nothing allocation (4 routed layers, budget 0.5: two layers skipped whole) with the x1 gate is
    exactly the dense model with those two layers deleted, on the calibration text."""
    dense = tiny_model("llama", layers=4)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids}]
    bi = block_influence(dense, batches)
    m = modify(copy.deepcopy(dense), MoDConfig(layers="all", gate_form="ste"))
    alloc = allocate_budget(bi, m.routed_layers, 0.5)
    skipped = sorted(j for j, r in alloc.items() if r == 0.0)
    assert len(skipped) == 2 and sorted(alloc.values()) == [0.0, 0.0, 1.0, 1.0]
    assert skipped == sorted(sorted(bi, key=bi.get)[:2])  # the least influential layers
    fit_routers_to_importance(m, batches, rate=alloc)
    pruned = prune_layers(copy.deepcopy(dense), skipped)
    with torch.no_grad():
        out = m(ids)
        torch.testing.assert_close(out.logits, pruned(ids).logits, rtol=1e-5, atol=1e-5)
    assert {j: float(r["rate"]) for j, r in out.routing.items()} == alloc
    assert allocate_budget(bi, m.routed_layers, 0.6)[sorted(bi, key=bi.get)[1]] == pytest.approx(0.4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_rate") / "model")


def test_threshold_controller_realises_the_schedule(tiny, tmp_path):
    """rate_control='thresholds': the realised rate of every step follows the annealed schedule, with routers
    that barely move (lr 1e-9), so the thresholds alone do it; global scope lets layers differ."""
    train = {"max_steps": 8, "rate_control": "thresholds", "rate_warmup_steps": 4, "rate_start": 1.0,
             "router_lr": 1e-9, "seq_len": 64}
    mod = {"router_init": "zero", "target_rate": 0.4, "target_scope": "global", "layers": "all", "gate_form": "ste"}
    run_ranks(train_worker, 1, tiny, tmp_path, "ds_configs/zero1.json", train, mod, init_routers="random")
    m = losses(tmp_path)
    for s in range(2, 9):  # step s ran with thresholds set from step s-1's logits, for the target of step s-1
        want = scheduled_rate(TrainConfig(**{k: v for k, v in train.items() if k.startswith("rate")}), 0.4, s - 1)
        assert m[s]["routing/rate_mean"] == pytest.approx(want, abs=0.08), (s, m[s]["routing/rate_mean"], want)
    rates = [m[8][f"routing/rate_l{j}"] for j in range(4)]
    assert max(rates) - min(rates) > 0.05, rates


def test_global_post_hoc_calibration_keeps_the_allocation():
    from mod_train import calibrate_thresholds
    m = modify(tiny_model("llama", layers=4), MoDConfig(layers="all", router_init="zero")).eval()
    randomize_routers(m, std=2.0)
    with torch.no_grad():
        for j, b in zip(m.routed_layers, (-2.0, -0.5, 0.5, 2.0)):
            m.model.layers[j].router.bias.fill_(b)
    ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(3))
    calibrate_thresholds(m, [{"input_ids": ids}], 0.5, scope="global")
    with torch.no_grad():
        rates = [float(r["rate"]) for r in m(ids).routing.values()]
    assert sum(rates) / 4 == pytest.approx(0.5, abs=0.02)
    assert rates == sorted(rates) and rates[-1] - rates[0] > 0.3, rates  # each layer keeps its own share


def test_controller_and_calibration_keep_off_layers_off(tiny, tmp_path):
    """An off layer (p = 1, a deleted layer of the allocated start) stays off under the threshold controller and
    post-hoc calibration, and counts as rate 0 in the global budget: the other layers make up the mean."""
    train = {"max_steps": 4, "rate_control": "thresholds", "router_lr": 1e-9, "seq_len": 64}
    mod = {"router_init": "zero", "target_rate": 0.4, "target_scope": "global", "layers": "all", "gate_form": "ste",
           "layer_thresholds": {1: 1.0}}
    run_ranks(train_worker, 1, tiny, tmp_path, "ds_configs/zero1.json", train, mod, init_routers="random")
    m = losses(tmp_path)
    for s in range(2, 5):
        assert m[s]["routing/rate_l1"] == 0.0
        assert m[s]["routing/rate_mean"] == pytest.approx(0.4, abs=0.08), (s, m[s]["routing/rate_mean"])
    from mod_train import calibrate_thresholds
    model = modify(tiny_model("llama", layers=4), MoDConfig(layers="all", router_init="zero",
                                                            layer_thresholds={2: 1.0})).eval()
    randomize_routers(model, std=2.0)
    ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(3))
    for scope in ("layer", "global"):
        calibrate_thresholds(model, [{"input_ids": ids}], 0.5, scope=scope)
        assert model.mod_config.is_off(2), scope
        with torch.no_grad():
            rates = {j: float(r["rate"]) for j, r in model(ids).routing.items()}
        assert rates[2] == 0.0
        want = 0.5 if scope == "layer" else 0.5 * 4 / 3  # global: the three others carry the budget
        assert sum(v for j, v in rates.items() if j != 2) / 3 == pytest.approx(want, abs=0.03), (scope, rates)
