#!/usr/bin/env python
"""Plan a (multi-node) MoDification job: memory check + the exact launch commands.

Run by launch/slurm/adapt.sbatch before anything is allocated; runnable anywhere as a dry run:

    python launch/slurm/plan.py --nodes "gpu[01-04]" --gpus-per-node 8 --gpu-mem-gb 80 --launcher srun \
        --dry-run -- --ds ds_configs/zero3_offload.json --model meta-llama/Meta-Llama-3-70B \
        --arch llama3-70b --recipe data_recipes/offline_long_mix.yaml --out runs/70b --train.seq_len 8192

Prints the per-GPU memory estimate (weights, gradients, optimizer states, activations at the chosen
sequence length) and exits with status 3 if the plan cannot fit. Without --dry-run it prints only the
command for the launcher to `eval`. --arch names a built-in architecture preset (no download);
otherwise the model's config.json is read (AutoConfig, no weights).
Launchers: srun (one task per GPU: ranks from SLURM_PROCID; SIGUSR1/SIGTERM reach every rank
directly, the recommended mode for preemption), torchrun (c10d rendezvous, one task per node),
deepspeed (--no_ssh per node with a generated hostfile).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def expand_nodelist(spec: str) -> list[str]:
    """'gpu[01-03,07],cpu5' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5'] (SLURM hostlist syntax)."""
    out, i, parts, depth, cur = [], 0, [], 0, ""
    for ch in spec:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    for p in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", p)
        if not m:
            out.append(p)
            continue
        pre, body, post = m.groups()
        for rng in body.split(","):
            if "-" in rng:
                a, b = rng.split("-")
                for k in range(int(a), int(b) + 1):
                    out.append(f"{pre}{k:0{len(a)}d}{post}")
            else:
                out.append(f"{pre}{rng}{post}")
    return out


def commands(nodes, gpus, launcher, adapt_args, port=29500, job="local", python="python") -> dict:
    head, n = nodes[0], len(nodes)
    a = " ".join(shlex.quote(x) for x in adapt_args)
    env = f"MASTER_ADDR={head} MASTER_PORT={port} OMP_NUM_THREADS=${{OMP_NUM_THREADS:-4}}"
    if launcher == "srun":
        step = (f"srun --nodes={n} --ntasks-per-node={gpus} --kill-on-bad-exit=1 --export=ALL,{env.replace(' ', ',')} "
                f"{python} launch/adapt.py {a}")
        per_node = {nd: f"[ranks {i * gpus}..{i * gpus + gpus - 1}] env RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID "
                        f"WORLD_SIZE={n * gpus} {env} {python} launch/adapt.py {a}" for i, nd in enumerate(nodes)}
        return {"step": step, "per_node": per_node}
    if launcher == "torchrun":
        tr = (f"torchrun --nnodes={n} --nproc_per_node={gpus} --rdzv_id={job} --rdzv_backend=c10d "
              f"--rdzv_endpoint={head}:{port} launch/adapt.py {a}")
        step = f"srun --nodes={n} --ntasks-per-node=1 --kill-on-bad-exit=1 {tr}"
        return {"step": step, "per_node": {nd: tr for nd in nodes}}
    if launcher == "deepspeed":
        hostfile = "".join(f"{nd} slots={gpus}\n" for nd in nodes)
        ds = (f"deepspeed --hostfile=$HOSTFILE --no_ssh --node_rank=$SLURM_NODEID --master_addr={head} "
              f"--master_port={port} launch/adapt.py {a}")
        step = f"srun --nodes={n} --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(ds)}"
        per_node = {nd: ds.replace("$SLURM_NODEID", str(i)) for i, nd in enumerate(nodes)}
        return {"step": step, "per_node": per_node, "hostfile": hostfile}
    raise SystemExit(f"unknown launcher {launcher!r}: srun, torchrun or deepspeed")


def memory_plan(adapt_args, world, gpu_gib, arch=None):
    import importlib.util
    spec = importlib.util.spec_from_file_location("adapt", os.path.join(os.path.dirname(__file__), "..", "adapt.py"))
    adapt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adapt)
    args, mod, tc = adapt.parse(adapt_args)
    from mod_train.parallel import dsconfig, memory
    if arch:
        cfg = memory.PRESETS[arch]
    else:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(args.model).to_dict()
    ds = dsconfig.fill(dsconfig.load(args.ds), tc, world, hidden_size=cfg["hidden_size"])
    est = memory.plan_from(cfg, ds, tc, world)
    return est, ds, tc


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: plan.py [options] -- <launch/adapt.py arguments>")
    k = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default=os.environ.get("SLURM_JOB_NODELIST", "localhost"))
    ap.add_argument("--gpus-per-node", type=int, default=int(os.environ.get("GPUS_PER_NODE", 8)))
    ap.add_argument("--gpu-mem-gb", type=float, default=float(os.environ.get("GPU_MEM_GB", 80)))
    ap.add_argument("--launcher", default=os.environ.get("LAUNCHER", "srun"), choices=["srun", "torchrun", "deepspeed"])
    ap.add_argument("--port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    ap.add_argument("--job", default=os.environ.get("SLURM_JOB_ID", "local"))
    ap.add_argument("--dry-run", action="store_true", help="print the plan and every node's command")
    ap.add_argument("--no-memory-check", action="store_true")
    ap.add_argument("--print", choices=["step", "hostfile"], default=None, help="print only this (for scripts)")
    o = ap.parse_args(argv[:k])
    adapt_args = argv[k + 1:]
    arch = None
    if "--arch" in adapt_args:
        j = adapt_args.index("--arch")
        arch = adapt_args[j + 1]
        del adapt_args[j:j + 2]
    nodes = expand_nodelist(o.nodes)
    world = len(nodes) * o.gpus_per_node
    cmds = commands(nodes, o.gpus_per_node, o.launcher, adapt_args, o.port, o.job)
    if o.print:
        print(cmds.get(o.print, ""), end="" if o.print == "hostfile" else "\n")
        return 0
    if not o.no_memory_check:
        from mod_train.parallel import memory
        est, ds, tc = memory_plan(adapt_args, world, o.gpu_mem_gb, arch)
        from mod_train.parallel import dsconfig
        print(f"== memory plan: {len(nodes)} node(s) x {o.gpus_per_node} GPU(s) = {world} ranks; ZeRO-"
              f"{dsconfig.zero_stage(ds)}, TP {dsconfig.tp_size(ds)}, PP {dsconfig.pp_stages(ds)}, "
              f"seq_len {tc.seq_len}, micro-batch {tc.micro_batch_size}, {tc.precision}, "
              f"activation checkpointing {'on' if tc.grad_checkpointing else 'off'}")
        print(est.table(o.gpu_mem_gb))
        try:
            memory.check(est, o.gpu_mem_gb)
        except memory.PlanDoesNotFit as e:
            print(f"REFUSED: {e}", flush=True)
            return 3
        print("PLAN FITS")
    print(f"== launch ({o.launcher}) on {', '.join(nodes)}")
    if "hostfile" in cmds:
        print("# hostfile:\n" + cmds["hostfile"], end="")
    print(cmds["step"])
    if o.dry_run:
        for nd, c in cmds["per_node"].items():
            print(f"[{nd}] {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
