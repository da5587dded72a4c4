"""A dispatch-mode probe that records large tensors an operation creates (memory-copy checks)."""
from torch.utils._python_dispatch import TorchDispatchMode
import torch


class LargeOutputs(TorchDispatchMode):
    """Records op outputs of at least ``numel`` elements that do not share ``keep``'s storage."""

    def __init__(self, numel: int, keep: torch.Tensor):
        super().__init__()
        self.numel, self.keep, self.found = numel, keep, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                if t.untyped_storage().data_ptr() != self.keep.untyped_storage().data_ptr():
                    self.found.append((str(func), tuple(t.shape), t.dtype))
        return out
