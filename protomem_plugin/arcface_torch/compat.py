"""Run-time fixes that let an unmodified arcface_torch checkout run on the torch we pin, and on a CPU.

Each fix is applied only when needed and announced with one line:

* ``verbose``: recent torch releases removed the ``verbose`` argument of ``LRScheduler.__init__``, which
  arcface_torch's ``PolynomialLRWarmup`` still passes; the argument is dropped.
* CPU fallback, only when no CUDA device exists (for trying a job out, and for our tests):
  ``init_process_group("nccl")`` uses gloo, ``torch.cuda.set_device`` and ``.cuda()`` do nothing,
  and ``DistributedDataParallel`` is built without ``device_ids`` for a module on the CPU.
* one process without torchrun: the torchrun environment of a single process on a free port is set,
  so train_v2 takes its ``env://`` branch instead of its fixed ``tcp://127.0.0.1:12584`` and two
  runs on one machine do not collide.
"""
from __future__ import annotations

import functools
import inspect
import os
import socket

import torch

__all__ = ["apply_cpu_fallback", "fix_scheduler_verbose", "note", "set_single_process_env"]


def note(message: str) -> None:
    """Print one ``protomem:`` line, on rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        print(f"protomem: {message}", flush=True)


def fix_scheduler_verbose() -> bool:
    """Let ``LRScheduler.__init__`` accept and ignore ``verbose`` where torch no longer takes it."""
    from torch.optim import lr_scheduler

    init = lr_scheduler.LRScheduler.__init__
    if "verbose" in inspect.signature(init).parameters or getattr(init, "_protomem_fix", False):
        return False

    @functools.wraps(init)
    def accepting_verbose(self, optimizer, last_epoch=-1, verbose=None):
        init(self, optimizer, last_epoch)

    accepting_verbose._protomem_fix = True
    lr_scheduler.LRScheduler.__init__ = accepting_verbose
    note(f"compatibility fix: torch {torch.__version__}'s LRScheduler takes no 'verbose' argument, which "
         "arcface_torch's PolynomialLRWarmup passes; it is dropped")
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> bool:
    """Outside torchrun, give this process the environment of a one-process torchrun job."""
    if "RANK" in os.environ:
        return False
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return True


def apply_cpu_fallback() -> bool:
    """Without CUDA, make train_v2's CUDA/NCCL calls run on the CPU with gloo."""
    if torch.cuda.is_available():
        return False
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    init_process_group = dist.init_process_group

    @functools.wraps(init_process_group)
    def gloo_instead_of_nccl(backend=None, *args, **kwargs):
        if backend in (None, "nccl") or (isinstance(backend, str) and "nccl" in backend):
            backend = "gloo"
        return init_process_group(backend, *args, **kwargs)

    class CpuDistributedDataParallel(DistributedDataParallel):
        """DDP that drops ``device_ids``/``output_device`` for a module on the CPU."""

        def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
            if all(p.device.type == "cpu" for p in module.parameters()):
                device_ids = output_device = None
            super().__init__(module, device_ids, output_device, *args, **kwargs)

    dist.init_process_group = gloo_instead_of_nccl
    torch.nn.parallel.DistributedDataParallel = CpuDistributedDataParallel
    torch.cuda.set_device = lambda device: None
    torch.nn.Module.cuda = lambda self, device=None: self
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    note("no CUDA device: CPU fallback (nccl -> gloo, .cuda() and torch.cuda.set_device do nothing, "
         "DDP without device_ids); for trying a job out, not for training at scale")
    return True
