"""Tensor parallelism with DeepSpeed AutoTP.

AutoTP (`"tensor_parallel": {"autotp_size": T}` in the DeepSpeed config) shards the attention and MLP
linears of every decoder block when `deepspeed.initialize` builds the engine; a router is a
`Linear(d, 1)` that AutoTP leaves replicated. Its input (the residual stream) is identical on all
ranks of a TP group after the row-parallel all-reduce, so every TP rank takes the same routing
decisions without any extra collective; the trainer feeds a TP group identical data.

Global ranks are laid out as (data-parallel, tensor-parallel): ranks r*T .. r*T+T-1 form one TP group
and read data shard r.
"""
from __future__ import annotations


def tp_groups(tp_size: int):
    """DeepSpeed's TP/DP process groups as an `mpu`, created before deepspeed.initialize so that its
    batch-size check counts data-parallel ranks only."""
    from deepspeed.utils import groups
    groups._init_tp_mesh_device(tensor_model_parallel_size=tp_size)
    return groups


def dp_rank_of(rank: int, tp_size: int) -> int:
    return rank // tp_size
