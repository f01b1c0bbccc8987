"""Distributed initialisation that works under the deepspeed launcher, torchrun, srun and as a
single plain process (which gets a one-rank gloo/nccl world of its own). Every training launcher passes
through `init()` before DeepSpeed is imported, so it also gives DeepSpeed's op builder a CUDA arch list it
can parse (`default_cuda_arch_list`)."""
from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_cuda_arch_list() -> str | None:
    """Set TORCH_CUDA_ARCH_LIST, when it is unset and CUDA is available, to the visible devices' compute
    capabilities as "major.minor" joined by ";" (e.g. "9.0"), and say so in one line (rank 0). Returns the value
    set, else None: a value the user set, or a machine without CUDA, is left alone.

    Unset, DeepSpeed's op builder (JIT-built ops under ZeRO, e.g. on an H200 with CUDA 13) falls back to torch's
    own arch list, whose 'sm_90a' it cannot parse (ValueError: invalid literal for int() with base 10: '0a')."""
    import torch
    if "TORCH_CUDA_ARCH_LIST" in os.environ or not torch.cuda.is_available():
        return None
    caps = sorted({tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
    if not caps:
        return None
    value = ";".join(f"{major}.{minor}" for major, minor in caps)
    os.environ["TORCH_CUDA_ARCH_LIST"] = value
    if os.environ.get("RANK", "0") == "0":
        print(f"[mod_train] TORCH_CUDA_ARCH_LIST was unset: set to {value!r} (this machine's GPUs) for DeepSpeed's "
              "op builder; set it yourself to choose other architectures", flush=True)
    return value


def init() -> tuple[int, int, int]:
    """Initialise torch.distributed (idempotent). Returns (rank, world_size, local_rank)."""
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:  # srun, one task per GPU
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:  # a plain process: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    default_cuda_arch_list()  # before DeepSpeed is imported and builds any op
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   auto_mpi_discovery=False)
    if get_accelerator().device_name() == "cuda":
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def shutdown() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
