"""Cluster launch logic without a cluster: node-list expansion, the exact per-node commands of each
launcher (dry run), the 70B memory plans (fit / refuse), and a simulated 2-node x 2-rank srun world
(4 CPU processes that get their ranks from SLURM_* variables only)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import free_port, losses, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
from mod_train.parallel import cluster as plan  # noqa: E402  (what launch/slurm/plan.py runs)

ADAPT = ["--ds", "ds_configs/zero3.json", "--model", "m", "--recipe", "r.yaml", "--out", "o", "--train.max_steps", "9"]


def test_expand_nodelist():
    assert plan.expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert plan.expand_nodelist("a1,b[9-10]") == ["a1", "b9", "b10"]
    assert plan.expand_nodelist("node7") == ["node7"]


def test_launcher_commands_for_a_node_list():
    nodes = plan.expand_nodelist("n[1-2]")
    tail = "launch/adapt.py --ds ds_configs/zero3.json --model m --recipe r.yaml --out o --train.max_steps 9"
    c = plan.commands(nodes, 4, "torchrun", ADAPT, port=1234, job="55")
    assert c["step"] == ("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun --nnodes=2 "
                         "--nproc_per_node=4 --rdzv_id=55 --rdzv_backend=c10d --rdzv_endpoint=n1:1234 " + tail)
    c = plan.commands(nodes, 4, "deepspeed", ADAPT, port=1234)
    assert c["hostfile"] == "n1 slots=4\nn2 slots=4\n"
    assert c["per_node"]["n2"] == ("deepspeed --hostfile=$HOSTFILE --no_ssh --node_rank=1 --master_addr=n1 "
                                   "--master_port=1234 " + tail)
    c = plan.commands(nodes, 4, "srun", ADAPT, port=1234)
    assert c["step"].startswith("srun --nodes=2 --ntasks-per-node=4 --kill-on-bad-exit=1 "
                                "--export=ALL,MASTER_ADDR=n1,MASTER_PORT=1234,")
    assert c["step"].endswith("python " + tail)


def _sbatch(script, **env):
    # PYTHON: the scripts run `python` from PATH by default; CI does not activate the venv, so name ours.
    e = {**os.environ, "DRY_RUN": "1", "SLURM_JOB_ID": "77", "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(ROOT / "launch" / "slurm" / script)], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("script", ["llama70b_zero3_offload.sbatch", "llama70b_tp8_zero3.sbatch"])
def test_70b_examples_print_a_fitting_memory_plan(script):
    p = _sbatch(script, SLURM_JOB_NODELIST="gpu[01-08]")
    assert p.returncode == 0, p.stderr[-3000:]
    for item in ("parameters (model)", "optimizer states", "activations", "TOTAL per GPU", "PLAN FITS",
                 "seq_len 8192", "[gpu08] [ranks 56..63]"):
        assert item in p.stdout, p.stdout


def test_plan_that_cannot_fit_is_refused_before_launch():
    env = dict(SLURM_JOB_NODELIST="gpu[01-02]", MODEL="x", ARCH="llama3-70b", RECIPE="r", OUT="o",
               DS="ds_configs/zero1.json", DRY_RUN="0", PATH=os.environ["PATH"])
    p = _sbatch("adapt.sbatch", **env)
    assert p.returncode == 3 and "REFUSED" in p.stdout and "plan refused; not launching" in p.stdout


@pytest.mark.slow
def test_simulated_two_nodes_srun_world(tmp_path):
    """4 processes as srun would start them on 2 nodes x 2 GPUs: no RANK/WORLD_SIZE, only SLURM_*."""
    model = make_tiny_model(tmp_path / "model")
    port = free_port()
    procs = []
    for r in range(4):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(r), SLURM_NTASKS="4", SLURM_LOCALID=str(r % 2), SLURM_NODEID=str(r // 2),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", WANDB_MODE="disabled",
                   PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "launch/adapt.py", "--ds", "ds_configs/zero2.json",
                                       "--model", model, "--recipe", "synthetic", "--out", str(tmp_path / "run"),
                                       "--train.max_steps", "2", "--train.seq_len", "32", "--train.precision",
                                       "fp32", "--train.progress", "false"],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:]
    assert "completed at step 2" in outs[0]
    m = losses(tmp_path / "run")
    assert m[2]["tokens"] == 2 * 4 * 32  # 4 data-parallel ranks
