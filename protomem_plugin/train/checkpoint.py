"""Checkpoints in arcface_torch's format, written atomically.

* ``output/model.pt``: the plain backbone state_dict (no ``module.`` prefix).
* ``output/checkpoint_gpu_{rank}.pt``: epoch, global_step, state_dict_backbone,
  state_dict_softmax_fc, state_optimizer, state_lr_scheduler, plus extra entries under their own keys.

Every file is written to a temporary file in the same directory, flushed, fsync'ed and renamed over
the target, so a crash mid-write leaves the previous file intact.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_FILENAME = "model.pt"
CHECKPOINT_KEYS = ("epoch", "global_step", "state_dict_backbone", "state_dict_softmax_fc",
                   "state_optimizer", "state_lr_scheduler")


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, has the wrong type or lacks a required key."""


def checkpoint_path(output_dir: str | os.PathLike, rank: int) -> Path:
    """``output_dir/checkpoint_gpu_{rank}.pt``."""
    return Path(output_dir) / f"checkpoint_gpu_{rank}.pt"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    Writes ``.{name}.*.tmp`` in the same directory, flushes and fsyncs it, then ``os.replace``s it onto
    ``path``. On any error the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode as open() under umask
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in unwrap_model(module).state_dict().items()}


def save_model_pt(backbone: nn.Module, output_dir: str | os.PathLike) -> Path:
    """Write ``output_dir/model.pt``: the backbone's state_dict on CPU, without wrapper prefixes."""
    return atomic_torch_save(_cpu_state_dict(backbone), Path(output_dir) / MODEL_FILENAME)


def save_training_checkpoint(output_dir: str | os.PathLike, rank: int, *, epoch: int, global_step: int,
                             backbone: nn.Module, head: nn.Module,
                             optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                             extra: dict[str, Any] | None = None) -> Path:
    """Write ``output_dir/checkpoint_gpu_{rank}.pt`` in arcface_torch's resume format.

    ``extra`` entries (e.g. ``{"protomem": {...}}``) are stored under their own top-level keys, which
    must not collide with the arcface_torch keys.
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(CHECKPOINT_KEYS))
    if clash:
        raise ValueError(f"extra keys {clash} collide with arcface_torch checkpoint keys")
    state = {
        "epoch": int(epoch),
        "global_step": int(global_step),
        "state_dict_backbone": unwrap_model(backbone).state_dict(),
        "state_dict_softmax_fc": unwrap_model(head).state_dict(),
        "state_optimizer": optimizer.state_dict(),
        "state_lr_scheduler": lr_scheduler.state_dict(),
        **extra,
    }
    return atomic_torch_save(state, checkpoint_path(output_dir, rank))


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format, the only one torch.load can memory-map


def _is_zip_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(ZIP_MAGIC)) == ZIP_MAGIC


def _load(path: Path, map_location: Any, mmap: bool = False) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        # files in torch's legacy (non-zip) format cannot be memory-mapped: they are read whole
        mmap = mmap and _is_zip_file(path)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except OSError:
        raise
    except Exception as err:  # torch.load signals corruption with many exception types
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err


def load_training_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *,
                             mmap: bool = False) -> dict[str, Any]:
    """Load a ``checkpoint_gpu_{rank}.pt`` with ``weights_only=True``.

    With ``mmap=True`` (and ``map_location="cpu"``) the file is memory-mapped: the tensors are views
    of the file and only the pages that are read come into memory, so taking a few keys or a slice
    of a tensor costs what is read, not the file's size. Such tensors keep the file mapped while any
    of them lives: copy what must outlive the load. Files in torch's legacy (non-zip) format are
    read whole.

    Raises FileNotFoundError if ``path`` does not exist and :class:`CheckpointError` (a ValueError)
    naming the file if it is corrupt, not a dict, or lacks one of :data:`CHECKPOINT_KEYS`.
    """
    path = Path(path)
    state = _load(path, map_location, mmap)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks key(s) {missing}")
    return state


def load_model_pt(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """Load a ``model.pt`` backbone state_dict with ``weights_only=True``.

    A leading ``module.`` on every key (a DDP-wrapped save) is removed. Raises FileNotFoundError or
    :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    state = _load(path, map_location)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state_dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
