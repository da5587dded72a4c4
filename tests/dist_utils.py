"""Run a function on several gloo processes of this machine (real torch.distributed)."""
import os
import socket
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, timeout_s=None):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            **timeout)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s=None) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined by gloo.

    ``timeout_s`` bounds every collective: a rank left waiting fails instead of hanging the test.
    """
    mp.spawn(_entry, args=(world_size, free_port(), fn, args, timeout_s), nprocs=world_size, join=True)
