"""Resuming from ``output/checkpoint_gpu_{rank}.pt``, also on a different number of ranks.

Same world size: every rank loads its own file. Different world size: every rank reads all the old
files and rebuilds its share: the head through ``head.merge_shard_states`` (memory slots go to
their new owner shards, Partial FC centres are re-split), the optimizer state of the head's
parameters re-split the same way, and the sampler position converted to the new global batch.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import checkpoint_path, load_training_checkpoint
from .config import ConfigError
from .runtime import Runtime


def _old_world_size(output: Path) -> int:
    first = checkpoint_path(output, 0)
    if not first.is_file():
        raise ConfigError(f"config key 'resume' is set but {first} does not exist")
    ranks = sorted(int(m.group(1)) for p in output.glob("checkpoint_gpu_*.pt")
                   if (m := re.fullmatch(r"checkpoint_gpu_(\d+)\.pt", p.name)))
    state = load_training_checkpoint(first)
    return int(state.get("protomem", {}).get("world_size", len(ranks)))


def _reshard_optimizer_state(states: list[dict], source: dict, head: nn.Module) -> dict:
    """Optimizer state of ``source`` with the head group's per-class tensors re-split for this rank."""
    merged = copy.deepcopy(source)
    head_params = merged["param_groups"][-1]["params"] if len(merged["param_groups"]) > 1 else []
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


def load_resume_state(output: str, runtime: Runtime, backbone: nn.Module, head: nn.Module,
                      optimizer: torch.optim.Optimizer, scheduler: Any, loader: Any) -> dict[str, Any]:
    """Load the checkpoint(s) into the modules; return epoch, global_step and the extra state."""
    out = Path(output)
    old_world = _old_world_size(out)
    if old_world == runtime.world_size:
        state = load_training_checkpoint(checkpoint_path(out, runtime.rank), map_location="cpu")
        head.load_state_dict(state["state_dict_softmax_fc"])
        optimizer.load_state_dict(state["state_optimizer"])
    else:
        states = [load_training_checkpoint(checkpoint_path(out, r), map_location="cpu") for r in range(old_world)]
        state = states[min(runtime.rank, old_world - 1)]
        if not hasattr(head, "merge_shard_states"):
            raise ConfigError(f"head {type(head).__name__} cannot resume on {runtime.world_size} ranks "
                              f"from a checkpoint of {old_world} ranks")
        head.load_state_dict(head.merge_shard_states([s["state_dict_softmax_fc"] for s in states]))
        optimizer.load_state_dict(_reshard_optimizer_state([s["state_optimizer"] for s in states],
                                                           state["state_optimizer"], head))
    backbone.load_state_dict(state["state_dict_backbone"])
    scheduler.load_state_dict(state["state_lr_scheduler"])
    extra = dict(state.get("protomem", {}))
    loader_state = extra.get("loader")
    epoch = int(state["epoch"])
    if loader_state is not None and int(loader_state["epoch"]) == epoch:
        position = int(loader_state["position"])
        old_batch = int(extra.get("global_batch", 0))
        new_batch = loader.sampler.batch_size * runtime.world_size
        if old_batch and old_batch != new_batch:
            position = position * old_batch // new_batch
        loader.load_state_dict({"epoch": epoch, "position": min(position, len(loader)), "seed": loader_state["seed"]})
    else:
        loader.set_epoch(epoch)
    return {"epoch": epoch, "global_step": int(state["global_step"]), **extra}
