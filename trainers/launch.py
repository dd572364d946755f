"""Process-group set-up shared by every training job, and the ``--nproc N`` shortcut for torchrun.

    lum pretrain --nproc 2 ...      # re-executes as: torchrun --standalone --nproc-per-node 2 <lum> pretrain ...
    torchrun --standalone --nproc-per-node 2 .venv/bin/lum pretrain ...   # the same, spelled out

``relaunch_under_torchrun`` replaces the current process with torchrun when ``--nproc`` > 1 and we are not
already a torchrun child. ``init`` returns (rank, world size, device) and starts the process group: NCCL on
CUDA, gloo on CPU; a single process without torchrun gets no group (``dist.is_initialized()`` is False).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(nproc: int | None, argv: list[str] | None = None) -> None:
    """Exec ``torchrun --standalone --nproc-per-node N`` on this command line (minus ``--nproc``) when N > 1."""
    if not nproc or nproc <= 1 or under_torchrun():
        return
    argv = list(sys.argv if argv is None else argv)
    cleaned: list[str] = []
    skip = False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", argv[0], *cleaned]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def init(backend: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Starts the process group under torchrun; a lone process gets none."""
    if under_torchrun():
        local = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
