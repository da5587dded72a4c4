"""Count the operations that make the host wait for the device, on any device (CPU included).

On a GPU these operations block the Python thread until the queued kernels have run: reading a
value (``.item()``, ``bool()``, ``int()``, ``float()``: ``aten._local_scalar_dense``), ops whose
output size depends on the data (``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing
and assignment, ``repeat_interleave`` without ``output_size``, ``bincount``), ``equal``, copies
from the device to the host, ``Tensor.tolist()`` / ``Tensor.numpy()``, and tensors made from host
data (``torch.tensor(x)``, which a GPU step copies from pageable memory, a stream sync). Counting the same
operations on CPU tells how many syncs a step would pay on a GPU: :class:`HostSyncCounter`
is a dispatch mode that records each such call.
"""
from __future__ import annotations

import traceback
from collections import Counter
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALWAYS = {
    "aten._local_scalar_dense", "aten.nonzero", "aten.argwhere", "aten._unique", "aten._unique2",
    "aten.unique_dim", "aten.unique_consecutive", "aten.unique_dim_consecutive", "aten.masked_select",
    "aten.bincount", "aten.equal", "aten.is_nonzero",
}
_INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_", "aten._unsafe_index_put"}
_COPIES = {"aten._to_copy", "aten.copy_", "aten.to"}


def _packet(func: Any) -> str:
    return f"aten.{func.__name__.split('.')[0]}" if hasattr(func, "__name__") else str(func)


def _has_mask_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()))


def _is_device_to_host(func_name: str, args: tuple, kwargs: dict) -> bool:
    if func_name == "aten.copy_":
        dst, src = args[0], args[1]
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.device.type == "cpu"
    src = args[0] if args else None
    device = kwargs.get("device")
    if device is None and len(args) > 1 and isinstance(args[1], (torch.device, str)):
        device = args[1]
    return (isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta")
            and device is not None and torch.device(device).type == "cpu")


class HostSyncCounter(TorchDispatchMode):
    """Dispatch mode counting host-device synchronising operations, by op name.

    ``with HostSyncCounter() as syncs: step()`` then ``syncs.total`` and ``syncs.counts``;
    ``where=True`` also keeps the innermost project frame of each call (``syncs.sites``).
    ``Tensor.tolist``/``Tensor.numpy`` do not go through the dispatcher; they are counted by
    wrapping them while the mode is active.
    """

    def __init__(self, where: bool = False) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self.where = where
        self._saved: dict[str, Any] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _record(self, name: str) -> None:
        self.counts[name] += 1
        if self.where:
            frames = [f for f in traceback.extract_stack()[:-2]
                      if "protomem_plugin" in f.filename and not f.filename.endswith("host_syncs.py")]
            site = f"{frames[-1].filename.split('protomem_plugin/')[-1]}:{frames[-1].lineno}" if frames else "?"
            self.sites[f"{name} @ {site}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = _packet(func)
        if name in _ALWAYS:
            self._record(name)
        elif name in _INDEXING and _has_mask_index(args):
            self._record(f"{name} (bool mask)")
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None:
            self._record(name)
        elif name in _COPIES and _is_device_to_host(name, args, kwargs):
            self._record(f"{name} (device to host)")
        elif name == "aten.lift_fresh":  # torch.tensor(host data): a pageable host-to-device copy on a GPU
            self._record("torch.tensor (host data)")
        return func(*args, **kwargs)

    def __enter__(self):
        for method in ("tolist", "numpy"):
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def counted(tensor, *a, _original=original, _name=f"Tensor.{method}", **k):
                self._record(_name)
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved.clear()
        return super().__exit__(*exc)


def count_host_syncs(fn, *args: Any, where: bool = False, **kwargs: Any) -> tuple[Any, HostSyncCounter]:
    """Run ``fn(*args, **kwargs)`` under a :class:`HostSyncCounter`; return its result and the counter."""
    counter = HostSyncCounter(where=where)
    with counter:
        result = fn(*args, **kwargs)
    return result, counter


def summary(counter: HostSyncCounter, steps: Optional[int] = None) -> dict[str, Any]:
    """JSON-ready counts (per step when ``steps`` is given)."""
    scale = 1.0 / steps if steps else 1.0
    return {"total": counter.total * scale, "by_op": {k: v * scale for k, v in sorted(counter.counts.items())}}
