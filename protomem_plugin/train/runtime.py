"""Process setup for training: torchrun environment, device, seeds and RNG states."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Runtime:
    """Where this process runs: rank, world size, local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_runtime(backend: str | None = None) -> Runtime:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``).

    Without those variables the run is one plain process and no process group is created. NCCL is
    used on GPUs, gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = local_device(local_rank, torch.cuda.device_count() if use_cuda else 0)
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if use_cuda else "gloo")
        timeout = timedelta(minutes=30)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            # torchrun keeps one store for every restart of the group (--max-restarts): keys of this attempt
            # only, or a restarted rank may read a dead rank's address (gloo: "connectFullMesh failed ...
            # Connection refused"; NCCL: pytorch/pytorch#167288)
            store, rank, world_size = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
            dist.init_process_group(backend, store=dist.PrefixStore(f"protomem/attempt_{attempt}", store), rank=rank,
                                    world_size=world_size, timeout=timeout)
    return Runtime(rank, world_size, local_rank, device)


def leave_process_group() -> None:
    """Destroy the process group at the end of a finished run, so that no rank exits while the backend's
    threads still run (a gloo rank could abort at exit: "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(local_rank: int, visible_gpus: int) -> torch.device:
    """The GPU of this process: ``cuda:LOCAL_RANK`` when it sees all of its node's GPUs,
    ``cuda:0`` when each process sees one (SLURM per-task binding, ``CUDA_VISIBLE_DEVICES`` per
    rank); the CPU without GPUs. Any other count that ``local_rank`` does not fit is an error."""
    if visible_gpus <= 0:
        return torch.device("cpu")
    if visible_gpus == 1:
        return torch.device("cuda", 0)
    if local_rank >= visible_gpus:
        raise RuntimeError(f"LOCAL_RANK {local_rank} but this process sees only {visible_gpus} GPUs; "
                           "give each process one GPU or all of the node's GPUs")
    return torch.device("cuda", local_rank)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed torch, numpy and random alike on every rank (backbone initialisation matches)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True


def capture_rng_state() -> dict[str, torch.Tensor | list]:
    """torch CPU and this process's CUDA generator state (tensors, loadable with ``weights_only=True``).

    Only the current device's CUDA state is saved (a rank uses one GPU), so the checkpoint does not
    depend on how many GPUs the machine shows.
    """
    state: dict[str, torch.Tensor | list] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def cuda_state_for_this_device(state: dict, local_rank: int) -> torch.Tensor | None:
    """This process's CUDA generator state from a checkpoint's RNG states, old or new layout.

    Older checkpoints hold ``cuda``: one state per GPU the saving machine showed; the entry of this
    process's local rank is taken when it exists, else the first (one GPU per process).
    """
    if "cuda_device" in state:
        return state["cuda_device"]
    states = state.get("cuda") or []
    if not states:
        return None
    return states[local_rank] if local_rank < len(states) else states[0]


def restore_rng_state(state: dict, local_rank: int = 0) -> None:
    """Inverse of :func:`capture_rng_state`; a CUDA state is restored to the current device only."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda_state = cuda_state_for_this_device(state, local_rank)
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)
