"""Checks that run before the first training step and before anything is written.

* the output folder can be created (not a file, parent writable);
* every ``val_targets`` ``.bin`` is a safe, well-formed, non-empty set;
* a resume checkpoint matches the config: network, embedding size, head, margin loss (its state,
  e.g. AdaFace's running statistics, is restored), number of classes (Partial FC) and memory
  size (PM, QAPM). Another world size is fine (the checkpoint is
  re-sharded); anything else is refused with the key to change, not a tensor-size dump.

Dataset problems (empty or inconsistent ``.rec``/``.idx``/``property``) are refused when the dataset
is opened, which also happens before the first step and before any write.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import checkpoint_path, load_training_checkpoint
from .config import ConfigError

# head tensors whose first dimension counts classes (Partial FC) or memory slots (PM, QAPM)
_ROWS_KEY = {"weight": "num_classes", "last_update_step": "num_classes", "memory": "memory_size",
             "slot_class": "memory_size", "slot_step": "memory_size"}


def check_output(cfg: Any) -> None:
    """``cfg.output`` is a folder or can be made one."""
    output = Path(cfg.output)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"config key 'output' = {str(output)!r} is a file, not a folder")
    parent = next((p for p in [output, *output.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"config key 'output' = {str(output)!r}: {parent} is not writable")


def check_val_targets(cfg: Any) -> None:
    """Every ``val_targets`` set that exists loads safely and holds pairs (missing ones are skipped later)."""
    from ..data.binsets import load_bin_encoded

    for name in cfg.get("val_targets") or []:
        path = Path(cfg.rec) / f"{name}.bin"
        if path.is_file():
            try:
                load_bin_encoded(str(path))
            except (ValueError, OSError) as exc:
                raise ConfigError(f"config key 'val_targets' ({name!r}): {exc}") from None


def _shape_mismatch(expected: dict[str, torch.Tensor], saved: dict[str, Any]) -> tuple[str, tuple, tuple] | None:
    """The first tensor of ``expected`` absent from ``saved`` or of another shape: (name, saved, expected)."""
    for name, tensor in expected.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        other = saved.get(name)
        if not isinstance(other, torch.Tensor):
            return name, (), tuple(tensor.shape)
        if tuple(other.shape) != tuple(tensor.shape):
            return name, tuple(other.shape), tuple(tensor.shape)
    return None


def check_resume(cfg: Any, world_size: int, backbone: nn.Module, head: nn.Module) -> None:
    """Refuse a resume whose checkpoints were trained with another network, embedding size, head,
    number of classes or memory size; names the config key and both values."""
    output = Path(cfg.output)
    first = checkpoint_path(output, 0)
    if not first.is_file():
        return  # resume.py reports the missing checkpoint
    state = load_training_checkpoint(first, mmap=True)
    where = f"the checkpoint {first}"
    saved_backbone = {k[len("module."):] if k.startswith("module.") else k: v
                      for k, v in state["state_dict_backbone"].items()}
    mismatch = _shape_mismatch(backbone.state_dict(), saved_backbone)
    if mismatch:
        name, saved, wanted = mismatch
        saved_dim = int(saved_backbone["features.weight"].shape[0]) if "features.weight" in saved_backbone else None
        if saved_dim is not None and saved_dim != cfg.embedding_size and name.startswith(("fc.", "features.")):
            raise ConfigError(f"config key 'embedding_size' = {cfg.embedding_size} but {where} was trained with "
                              f"{saved_dim}")
        raise ConfigError(f"config key 'network' = {cfg.network!r} does not match {where}: its backbone "
                          f"{'lacks' if not saved else 'has ' + str(list(saved)) + ' for'} {name!r}"
                          f"{'' if not saved else f', the network here has {list(wanted)}'}")
    meta = state.get("protomem", {})
    saved_head = meta.get("head")
    if saved_head is not None and saved_head != cfg.head:
        raise ConfigError(f"config key 'head' = {cfg.head!r} but {where} was trained with {saved_head!r}")
    check_resumed_margin(cfg, meta, state["state_dict_softmax_fc"], head, where)
    old_world = int(meta.get("world_size", world_size))
    saved_states = [state["state_dict_softmax_fc"]] + [
        load_training_checkpoint(checkpoint_path(output, r), mmap=True)["state_dict_softmax_fc"]
        for r in range(1, old_world) if checkpoint_path(output, r).is_file()]
    here = head.state_dict()
    for name, key in _ROWS_KEY.items():
        if name not in here or not all(isinstance(s.get(name), torch.Tensor) for s in saved_states):
            continue
        rows = sum(int(s[name].shape[0]) for s in saved_states)
        wanted = int(getattr(head, key))
        if rows != wanted:
            raise ConfigError(f"config key {key!r} = {wanted} but {where} holds {rows} "
                              f"{'class rows' if key == 'num_classes' else 'memory slots'} over {old_world} rank(s)")
        if here[name].dim() == 2 and saved_states[0][name].shape[1] != here[name].shape[1]:
            raise ConfigError(f"config key 'embedding_size' = {cfg.embedding_size} but {where} holds "
                              f"{int(saved_states[0][name].shape[1])}-d head rows")


def check_resumed_margin(cfg: Any, meta: dict, saved_head: dict, head: nn.Module, where: str) -> None:
    """Refuse a checkpoint trained with another margin loss: its name (recorded since margins have a
    registry; older checkpoints used ``"combined"``) or its state entries differ from this head's."""
    from ..registry import margin_name

    wanted = margin_name(cfg)
    saved = meta.get("margin", "combined" if "head" in meta else None)
    here = {k for k in head.state_dict() if k.startswith("margin_loss.")}
    there = {k for k in saved_head if k.startswith("margin_loss.")}
    if (saved is not None and saved != wanted) or here != there:
        trained = repr(saved) if saved is not None else f"a margin whose state holds {sorted(there) or 'nothing'}"
        raise ConfigError(f"config key 'margin' = {wanted!r} but {where} was trained with {trained}")
