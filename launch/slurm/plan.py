#!/usr/bin/env python
"""Plan a (multi-node) MoDification job: memory check + the exact launch commands.

Run by launch/slurm/adapt.sbatch before anything is allocated; runnable anywhere as a dry run:

    python launch/slurm/plan.py --nodes "gpu[01-04]" --gpus_per_node 8 --gpu_mem_gb 80 --launcher srun \\
        --dry_run true -- --ds ds_configs/zero3_offload.json --model meta-llama/Meta-Llama-3-70B \\
        --arch llama3-70b --recipe data_recipes/offline_long_mix.yaml --out runs/70b --train.seq_len 8192

Everything after `--` is launch/adapt.py's arguments (plus `--arch <preset>`: a built-in architecture, no
download). Prints the per-GPU memory estimate and exits with status 3 if the plan cannot fit; with
`--print step|hostfile` prints only that, for scripts. Logic: mod_train/parallel/cluster.py.
"""
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from mod_train import cli
from mod_train.config import RunConfig


def _env(name, default):
    return field(default_factory=lambda: type(default)(os.environ.get(name, default)))


@dataclass
class PlanConfig:
    nodes: str = _env("SLURM_JOB_NODELIST", "localhost")
    """SLURM host list, e.g. 'gpu[01-04]' (default: $SLURM_JOB_NODELIST)."""
    gpus_per_node: int = _env("GPUS_PER_NODE", 8)
    """Ranks per node (default: $GPUS_PER_NODE or 8)."""
    gpu_mem_gb: float = _env("GPU_MEM_GB", 80.0)
    """Memory of one GPU in GiB (default: $GPU_MEM_GB or 80)."""
    launcher: Literal["srun", "torchrun", "deepspeed"] = _env("LAUNCHER", "srun")
    """How ranks start (default: $LAUNCHER or srun)."""
    port: int = _env("MASTER_PORT", 29500)
    """Rendezvous port (default: $MASTER_PORT or 29500)."""
    job: str = _env("SLURM_JOB_ID", "local")
    """Job id of the torchrun rendezvous (default: $SLURM_JOB_ID)."""
    dry_run: bool = False
    """Also print every node's command."""
    memory_check: bool = True
    """Print the memory plan and refuse (exit 3) what cannot fit."""
    print: Optional[Literal["step", "hostfile"]] = None
    """Print only this (for scripts)."""


def main(argv):
    from mod_train.parallel import cluster, memory
    k = argv.index("--") if "--" in argv else len(argv)
    o, adapt_args = cli.parse(PlanConfig, argv[:k], prog="plan.py", description=__doc__), argv[k + 1:]
    if k == len(argv):
        raise cli.ConfigError("usage: plan.py [options] -- <launch/adapt.py arguments>")
    arch = adapt_args[adapt_args.index("--arch") + 1] if "--arch" in adapt_args else None
    if arch:
        del adapt_args[adapt_args.index("--arch"):adapt_args.index("--arch") + 2]
    nodes = cluster.expand_nodelist(o.nodes)
    world = len(nodes) * o.gpus_per_node
    cmds = cluster.commands(nodes, o.gpus_per_node, o.launcher, adapt_args, o.port, o.job)
    if o.print:
        print(cmds.get(o.print, ""), end="" if o.print == "hostfile" else "\n")
        return 0
    if o.memory_check:
        run = cli.parse(RunConfig, adapt_args, prog="adapt.py")
        est, ds = cluster.memory_plan(run, world, arch)
        print(cluster.describe(est, ds, run.train, len(nodes), o.gpus_per_node, o.gpu_mem_gb))
        try:
            memory.check(est, o.gpu_mem_gb)
        except memory.PlanDoesNotFit as e:
            print(f"REFUSED: {e}", flush=True)
            return 3
        print("PLAN FITS")
    print(f"== launch ({o.launcher}) on {', '.join(nodes)}\n" + (f"# hostfile:\n{cmds['hostfile']}" if "hostfile" in cmds
                                                                  else "") + cmds["step"])
    for nd, c in cmds["per_node"].items() if o.dry_run else ():
        print(f"[{nd}] {c}")


if __name__ == "__main__":
    cli.main(main, "plan.py")
