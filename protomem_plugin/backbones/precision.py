"""Mixed precision for backbone trunks, as arcface_torch's ``fp16`` flag does it."""
from __future__ import annotations

import contextlib

import torch

_AUTOCAST_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}


def trunk_autocast(x: torch.Tensor, enabled: bool) -> contextlib.AbstractContextManager:
    """Autocast context for a backbone trunk fed with ``x``.

    float16 on CUDA, bfloat16 on CPU; a no-op when ``enabled`` is false or on other devices.
    """
    dtype = _AUTOCAST_DTYPES.get(x.device.type)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=dtype)


def cuda_autocast(x: torch.Tensor, enabled: bool) -> contextlib.AbstractContextManager:
    """float16 autocast switched on (``enabled``) or off when ``x`` is on CUDA; a no-op elsewhere."""
    if x.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.float16, enabled=enabled)
