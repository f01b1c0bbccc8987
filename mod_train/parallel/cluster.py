"""Planning a multi-node job: SLURM host lists, the per-node launch commands, the per-GPU memory plan.

Used by launch/slurm/plan.py (and through it launch/slurm/adapt.sbatch) before anything is allocated.
Launchers: srun (one task per GPU: ranks from SLURM_PROCID; SIGUSR1/SIGTERM reach every rank directly, the
recommended mode for preemption), torchrun (c10d rendezvous, one task per node), deepspeed (--no_ssh per node
with a generated hostfile).
"""
from __future__ import annotations

import re
import shlex

from mod_train.parallel import dsconfig, memory


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


def memory_plan(run, world: int, arch: str | None = None):
    """(estimate, filled ds config) of RunConfig `run` on `world` ranks; `arch` names a memory.PRESETS entry
    (no download), otherwise the model's config.json is read (AutoConfig, no weights)."""
    if arch:
        cfg = memory.PRESETS[arch]
    else:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(run.model).to_dict()
    ds = dsconfig.fill(dsconfig.load(run.ds), run.train, world, hidden_size=cfg["hidden_size"])
    return memory.plan_from(cfg, ds, run.train, world), ds


def describe(est, ds: dict, tc, n_nodes: int, gpus: int, gpu_gib: float) -> str:
    """The memory plan as printed before a launch: the layout line, then the per-GPU table."""
    return (f"== memory plan: {n_nodes} node(s) x {gpus} GPU(s) = {n_nodes * gpus} ranks; ZeRO-"
            f"{dsconfig.zero_stage(ds)}, TP {dsconfig.tp_size(ds)}, PP {dsconfig.pp_stages(ds)}, seq_len "
            f"{tc.seq_len}, micro-batch {tc.micro_batch_size}, {tc.precision}, activation checkpointing "
            f"{'on' if tc.grad_checkpointing else 'off'}\n" + est.table(gpu_gib))
