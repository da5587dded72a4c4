"""Checkpoints in arcface_torch's format, written atomically.

* ``output/model.pt``: the plain backbone state_dict (no ``module.`` prefix).
* ``output/checkpoint_gpu_{rank}.pt``: epoch, global_step, state_dict_backbone,
  state_dict_softmax_fc, state_optimizer, state_lr_scheduler, plus extra entries under their own keys.

Every file is written to a temporary file in the same directory, flushed, fsync'ed and renamed over
the target, so a crash mid-write leaves the previous file intact.
"""
from __future__ import annotations

import errno
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


class CheckpointWriteError(OSError):
    """A checkpoint or ``model.pt`` could not be written (disk full, file size limit, I/O error).

    The message names the file and the cause in one line; the file keeps its previous content and no
    temporary file is left behind. ``errno`` is the cause's, when it has one.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class _RecordingWriter:
    """A file whose writes keep the ``OSError`` they raise: ``torch.save`` reports a failed write as an
    unrelated ``RuntimeError`` of its zip writer, which hides the cause (e.g. no space left)."""

    def __init__(self, f) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def write_error(path: Path, err: BaseException) -> CheckpointWriteError:
    """:class:`CheckpointWriteError` naming ``path`` and the cause of ``err`` in one line."""
    code = getattr(err, "errno", None)
    text = str(err).strip()
    cause = os.strerror(code) if code else (text.splitlines()[0] if text else type(err).__name__)
    hint = {errno.ENOSPC: "free space there or choose another 'output' folder",
            errno.EFBIG: "over the file size limit of the process, ulimit -f, or of the file system",
            errno.EDQUOT: "free space or choose another 'output' folder"}.get(code)
    detail = f" ({hint})" if hint else ""
    return CheckpointWriteError(f"cannot write {path}: {cause}{detail}; the previous file is kept", code)


def discard_temporary(tmp: Path) -> None:
    """Remove a temporary file of :func:`write_temporary` (nothing if it is gone)."""
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def write_temporary(obj: Any, path: str | os.PathLike) -> Path:
    """First half of :func:`atomic_torch_save`: ``torch.save`` into ``.{name}.*.tmp`` beside ``path``,
    flushed and fsynced; ``path`` is untouched. Returns the temporary file for :func:`commit_temporary`.

    On failure the temporary file is removed and :class:`CheckpointWriteError` names ``path`` and the
    cause (``No space left on device``, ``File too large``, ...).
    """
    path = Path(path)
    tmp_name = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode as open() under umask
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        discard_temporary(tmp_name)
        if not isinstance(err, Exception):
            raise
        raise write_error(path, writer.error if writer is not None and writer.error is not None else err) from None
    return tmp_name


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed run left in ``output_dir`` (``.checkpoint_gpu_*.pt.*.tmp``,
    ``.model.pt.*.tmp``); call it before this run writes any. Returns the removed files."""
    stale = [*Path(output_dir).glob(".checkpoint_gpu_*.pt.*.tmp"), *Path(output_dir).glob(f".{MODEL_FILENAME}.*.tmp")]
    for tmp in stale:
        discard_temporary(tmp)
    return stale


def commit_temporary(tmp: Path, path: str | os.PathLike) -> Path:
    """Second half of :func:`atomic_torch_save`: rename ``tmp`` onto ``path`` (atomic), fsync the folder."""
    path = Path(path)
    try:
        os.replace(tmp, path)
    except BaseException as err:
        discard_temporary(tmp)
        if not isinstance(err, Exception):
            raise
        raise write_error(path, err) from None
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    Writes ``.{name}.*.tmp`` in the same directory, flushes and fsyncs it, then ``os.replace``s it onto
    ``path``. On any error the temporary file is removed, ``path`` keeps its previous content and
    :class:`CheckpointWriteError` (an ``OSError``) names ``path`` and the cause.
    """
    return commit_temporary(write_temporary(obj, path), path)


def _cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in unwrap_model(module).state_dict().items()}


def save_model_pt(backbone: nn.Module, output_dir: str | os.PathLike) -> Path:
    """Write ``output_dir/model.pt``: the backbone's state_dict on CPU, without wrapper prefixes."""
    return atomic_torch_save(_cpu_state_dict(backbone), Path(output_dir) / MODEL_FILENAME)


def save_training_checkpoint(output_dir: str | os.PathLike, rank: int, **state: Any) -> Path:
    """Write ``output_dir/checkpoint_gpu_{rank}.pt`` in arcface_torch's resume format.

    Keywords as :func:`stage_training_checkpoint`; raises :class:`CheckpointWriteError` when the file
    cannot be written (the previous one is kept).
    """
    path = checkpoint_path(output_dir, rank)
    return commit_temporary(stage_training_checkpoint(output_dir, rank, **state), path)


def stage_training_checkpoint(output_dir: str | os.PathLike, rank: int, *, epoch: int, global_step: int,
                              backbone: nn.Module, head: nn.Module,
                              optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                              extra: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of ``rank`` to a temporary file beside ``checkpoint_gpu_{rank}.pt``; return it.

    :func:`commit_temporary` then puts it in place (the trainer does so once every rank has written
    its own, so that a failed write on one rank leaves every rank's previous checkpoint in place).
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
    return write_temporary(state, checkpoint_path(output_dir, rank))


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
