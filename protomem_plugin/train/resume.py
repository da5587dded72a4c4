"""Resuming from ``output/checkpoint_gpu_{rank}.pt``, also on a different number of ranks.

Same world size: every rank loads its own file. Different world size: every rank opens all the old
files and rebuilds its share: the head through ``head.merge_shard_states`` (memory slots go to
their new owner shards, Partial FC centres are re-split), the optimizer state of the head's
parameters re-split the same way (``head.shard_rows``), the backbone, the rest of the optimizer
state, the LR schedule and the extra state taken from one old file, and the sampler position
converted to the new global batch.

Host memory. The files are memory-mapped (``torch.load(mmap=True)``): opening one reads its pickled
metadata only, and a rank reads only the pages of what it takes: its rows of each old head shard
and of their optimizer state, and one file's backbone. The old world size comes from the
``protomem`` entry of rank 0's file at the cost of that metadata (arcface_torch's own checkpoints,
which have no such entry, count their ``checkpoint_gpu_*.pt`` files). The files are opened afresh
for each of three phases (head, optimizer, the rest) and dropped after it, so the pages one phase
read leave memory before the next phase reads its own. Whatever is kept is copied: the modules and
the optimizer own their tensors and the returned extra state holds no view of a file, so no old
file stays mapped after the return.
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import checkpoint_path, load_training_checkpoint
from .config import ConfigError
from .runtime import Runtime


def checkpoint_ranks(output: str | Path) -> list[int]:
    """The ranks whose ``checkpoint_gpu_{rank}.pt`` exists in ``output``, sorted."""
    return sorted(int(m.group(1)) for p in Path(output).glob("checkpoint_gpu_*.pt")
                  if (m := re.fullmatch(r"checkpoint_gpu_(\d+)\.pt", p.name)))


def _old_world_size(output: Path) -> int:
    first = checkpoint_path(output, 0)
    if not first.is_file():
        raise ConfigError(f"config key 'resume' is set but {first} does not exist")
    ranks = checkpoint_ranks(output)
    # memory-mapped: unpickling reads the metadata only, no tensor data; the file is unmapped on return
    state = load_training_checkpoint(first, mmap=True)
    return int(state.get("protomem", {}).get("world_size", len(ranks)))


def complete_checkpoint(output: str | Path) -> tuple[int, int]:
    """``(global_step, world_size)`` of the checkpoint set in ``output`` if it is complete.

    Complete: the file of every rank of the saving run (``protomem.world_size`` of rank 0's file, else
    the number of files) exists, loads (its metadata; memory-mapped, no tensor data is read) and holds
    the same global step. Otherwise :class:`ConfigError` naming the key ``resume``, the folder and
    what is wrong. Files are written atomically and the trainer puts every rank's new file in place
    only once all ranks have written theirs, so a set is incomplete only if a run died between two
    renames or the folder was edited by hand.
    """
    out = Path(output)
    ranks = checkpoint_ranks(out)
    problems, steps, world_size = [], {}, len(ranks)
    for rank in ranks:
        if rank >= world_size:  # left by an earlier run on more ranks (the saving run had world_size)
            break
        try:
            state = load_training_checkpoint(checkpoint_path(out, rank), mmap=True)
        except (OSError, ValueError) as err:
            problems.append(f"{checkpoint_path(out, rank).name} cannot be read ({err})")
            continue
        steps[rank] = int(state["global_step"])
        if rank == 0:
            world_size = int(state.get("protomem", {}).get("world_size", len(ranks)))
        del state
    missing = [r for r in range(world_size) if r not in ranks]
    if missing:
        names = ", ".join(checkpoint_path(out, r).name for r in missing)
        problems.insert(0, f"the run had {world_size} ranks but {names} missing")
    if len(set(steps.values())) > 1:
        problems.append("the files are of different steps (" + ", ".join(f"rank {r}: {s}" for r, s in steps.items())
                        + ")")
    if problems:
        raise ConfigError(f"config key 'resume': the checkpoints in {out} are not a complete set: "
                          f"{'; '.join(problems)}; restore them or choose another 'output' folder")
    return steps[0], world_size


def resume_decision(resume: Any, output: str | Path) -> int | None:
    """Whether this run resumes: the global step of the complete checkpoint it resumes from, or None.

    ``resume`` is the config key: True needs a complete checkpoint set in ``output``; "auto" takes it
    if ``output`` holds any checkpoint, else starts; False starts, and refuses an ``output`` that
    already holds checkpoints (a new run would overwrite them). Only reads; raises ConfigError.
    """
    out = Path(output)
    ranks = checkpoint_ranks(out) if out.is_dir() else []
    if not resume:
        if ranks:
            raise ConfigError(
                f"config key 'resume' is False but {out} already holds checkpoints (checkpoint_gpu_{ranks[0]}.pt"
                f"{', ...' if len(ranks) > 1 else ''}): set resume=True or resume='auto' to continue that run, or "
                "choose another 'output' folder; a new run would overwrite them")
        return None
    if resume == "auto" and not ranks:
        return None
    if 0 not in ranks:
        raise ConfigError(f"config key 'resume' is set but {checkpoint_path(out, 0)} does not exist")
    return complete_checkpoint(out)[0]


def _owned(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples copied (no view of a mapped file)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _owned(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_owned(v) for v in obj)
    return obj


def _module_state(state: dict) -> dict:
    """A module state_dict with its extra states copied.

    ``load_state_dict`` copies parameters and buffers but hands extra states (e.g. a sampler's RNG
    state) to ``set_extra_state`` as they are. The dict type and its ``_metadata`` are kept.
    """
    keys = [k for k in state if k.endswith("_extra_state")]
    if not keys:
        return state
    state = copy.copy(state)
    for k in keys:
        state[k] = _owned(state[k])
    return state


def _load_optimizer(optimizer: torch.optim.Optimizer, state_dict: dict, loaded: list[dict], copy_views: bool) -> None:
    """``optimizer.load_state_dict``, then copy the state tensors that are still those of ``loaded``.

    On the CPU ``load_state_dict`` keeps the given tensors when their dtype and device fit; from a
    memory-mapped file they would be views of it.
    """
    optimizer.load_state_dict(state_dict)
    if not copy_views:
        return
    views = {v.untyped_storage().data_ptr() for s in loaded for entry in s["state"].values()
             for v in entry.values() if isinstance(v, torch.Tensor)}
    for entry in optimizer.state.values():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in views:
                entry[key] = value.clone()


def _reshard_optimizer_state(states: list[dict], source: dict, head: nn.Module) -> dict:
    """Optimizer state of ``source`` with the head group's per-class tensors re-split for this rank.

    Only this rank's rows of the old head state are read (``head.shard_rows``); the other entries
    are ``source``'s own, not copied.
    """
    merged = {**source, "state": dict(source["state"])}
    head_params = source["param_groups"][-1]["params"] if len(source["param_groups"]) > 1 else []
    for pid in head_params:
        per_rank = [s["state"].get(pid) for s in states]
        if any(p is None for p in per_rank) or not hasattr(head, "shard_rows"):
            merged["state"].pop(pid, None)
            continue
        new = {}
        for key, value in per_rank[0].items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                new[key] = head.shard_rows([p[key] for p in per_rank])
            else:
                new[key] = value
        merged["state"][pid] = new
    return merged


def _opener(output: Path, mmap: bool) -> Callable[[list[int]], list[dict[str, Any]]]:
    """``open(ranks)``: the old checkpoints of ``ranks``.

    Memory-mapped, every call maps them afresh (cheap) so that each phase's pages are released with
    its dicts; read whole (``mmap=False``), every file is loaded once and kept.
    """
    loaded: dict[int, dict[str, Any]] = {}

    def open_ranks(ranks: list[int]) -> list[dict[str, Any]]:
        if mmap:
            return [load_training_checkpoint(checkpoint_path(output, r), map_location="cpu", mmap=True) for r in ranks]
        for r in ranks:
            if r not in loaded:
                loaded[r] = load_training_checkpoint(checkpoint_path(output, r), map_location="cpu")
        return [loaded[r] for r in ranks]

    return open_ranks


def check_resumed_lrs(optimizer: torch.optim.Optimizer, lr: float, head_lr_scale: float) -> None:
    """Refuse a resumed optimizer whose base lrs (``initial_lr``) are not ``lr`` and ``lr * head_lr_scale``.

    The checkpoint's groups keep their own lrs, so a changed ``lr`` or ``head_lr_scale`` would be
    silently ignored. Checked only for two groups whose head group has parameters or an
    ``initial_lr`` (arcface_torch's checkpoints: equal lrs, i.e. ``head_lr_scale`` 1).
    """
    groups = optimizer.param_groups
    if len(groups) != 2 or not (groups[1]["params"] or "initial_lr" in groups[1]):
        return
    backbone_lr, head_lr = groups[0].get("initial_lr"), groups[1].get("initial_lr")
    if backbone_lr is None or head_lr is None:
        return
    hint = "set it back to the checkpoint's value or start a new output folder"
    if not math.isclose(backbone_lr, lr, rel_tol=1e-9):
        raise ConfigError(f"config key 'lr' = {lr!r} but the resumed checkpoint was trained with {backbone_lr!r}; {hint}")
    if not math.isclose(head_lr, backbone_lr * head_lr_scale, rel_tol=1e-9):
        saved = head_lr / backbone_lr if backbone_lr else math.nan
        raise ConfigError(f"config key 'head_lr_scale' = {head_lr_scale!r} but the resumed checkpoint was trained "
                          f"with {saved!r}; {hint}")


def load_resume_state(output: str, runtime: Runtime, backbone: nn.Module, head: nn.Module,
                      optimizer: torch.optim.Optimizer, scheduler: Any, loader: Any, *,
                      mmap: bool = True, lrs: tuple[float, float] | None = None) -> dict[str, Any]:
    """Load the checkpoint(s) into the modules; return epoch, global_step and the extra state.

    ``mmap=False`` reads every file it needs whole (as resuming did before memory-mapping; for file
    systems where mapping is slow or unavailable); the loaded state is the same. ``lrs = (lr,
    head_lr_scale)`` of the config: refuse a checkpoint trained with others (:func:`check_resumed_lrs`).
    """
    out = Path(output)
    old_world = _old_world_size(out)
    same = old_world == runtime.world_size
    if not same and not hasattr(head, "merge_shard_states"):
        raise ConfigError(f"head {type(head).__name__} cannot resume on {runtime.world_size} ranks "
                          f"from a checkpoint of {old_world} ranks")
    ranks = [runtime.rank] if same else list(range(old_world))
    source = runtime.rank if same else min(runtime.rank, old_world - 1)  # backbone, schedule, extra state
    open_ranks = _opener(out, mmap)

    heads = [s["state_dict_softmax_fc"] for s in open_ranks(ranks)]
    head.load_state_dict(_module_state(heads[0] if same else head.merge_shard_states(heads)))
    del heads

    optims = [s["state_optimizer"] for s in open_ranks(ranks)]
    own = optims[ranks.index(source)]
    _load_optimizer(optimizer, own if same else _reshard_optimizer_state(optims, own, head), optims, copy_views=mmap)
    del optims, own

    state = open_ranks([source])[0]
    backbone.load_state_dict(_module_state(state["state_dict_backbone"]))
    scheduler.load_state_dict(_owned(state["state_lr_scheduler"]))
    if lrs is not None:
        check_resumed_lrs(optimizer, *lrs)
    extra = _owned(dict(state.get("protomem", {})))
    epoch, global_step = int(state["epoch"]), int(state["global_step"])
    del state

    loader_state = extra.get("loader")
    if loader_state is not None and int(loader_state["epoch"]) == epoch:
        position = int(loader_state["position"])
        old_batch = int(extra.get("global_batch", 0))
        new_batch = loader.sampler.batch_size * runtime.world_size
        if old_batch and old_batch != new_batch:
            position = position * old_batch // new_batch
        loader.load_state_dict({"epoch": epoch, "position": min(position, len(loader)), "seed": loader_state["seed"]})
    else:
        loader.set_epoch(epoch)
    return {"epoch": epoch, "global_step": global_step, **extra}
