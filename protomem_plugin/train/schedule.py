"""Optimizer and learning-rate schedule as arcface_torch's train_v2.py builds them."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from .config import check_head_lr_scale

SGD_MOMENTUM = 0.9
OPTIMIZERS = ("sgd", "adamw")


class WarmupPolynomialFactor:
    """LR multiplier at step ``t``: ``t / w`` during warmup, then ``(1 - (t - w) / (T - w)) ** power``.

    Past ``T`` the multiplier stays 0. A plain object (not a lambda) so ``LambdaLR.state_dict()`` stores
    its settings and a resumed run checks against them.
    """

    def __init__(self, warmup_steps: int, total_steps: int, power: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.power = power

    def __call__(self, step: int) -> float:
        w, total = self.warmup_steps, self.total_steps
        if step < w:
            return step / w
        progress = min(step - w, total - w) / (total - w)
        return (1.0 - progress) ** self.power


def build_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       power: float = 2.0) -> LRScheduler:
    """Linear warmup from 0 to the base lr over ``warmup_steps``, then polynomial decay to 0 at
    ``total_steps`` (the closed form of arcface_torch's ``PolynomialLRWarmup``). Call ``step()`` once
    per optimizer step; the lr after ``t`` calls is ``base_lr * factor(t)``.
    """
    warmup_steps, total_steps = int(warmup_steps), int(total_steps)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")
    return LambdaLR(optimizer, WarmupPolynomialFactor(warmup_steps, total_steps, float(power)))


_MISSING = object()


def _cfg_value(cfg: Any, key: str, default: Any = _MISSING) -> Any:
    try:
        return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)
    except (KeyError, AttributeError):
        if default is not _MISSING:
            return default
        raise ValueError(f"config key {key!r} is missing (needed to build the optimizer)") from None


def build_optimizer(cfg: Any, params_backbone: Iterable[torch.nn.Parameter],
                    params_head: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Optimizer from ``cfg.optimizer`` (``"sgd"``: momentum 0.9, or ``"adamw"``), ``cfg.lr`` and
    ``cfg.weight_decay``. Two parameter groups as in arcface_torch: 0 = backbone at ``lr``, 1 = head at
    ``lr * cfg.head_lr_scale`` (the head group may be empty: memory heads have no parameters).
    """
    name = _cfg_value(cfg, "optimizer")
    lr = float(_cfg_value(cfg, "lr"))
    weight_decay = float(_cfg_value(cfg, "weight_decay"))
    head_lr = lr * check_head_lr_scale(_cfg_value(cfg, "head_lr_scale", 1.0))
    groups = [{"params": list(params_backbone)}, {"params": list(params_head), "lr": head_lr}]
    if not groups[0]["params"]:
        raise ValueError("params_backbone is empty: nothing to optimize")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"config key 'optimizer' = {name!r} is not supported; valid: {', '.join(OPTIMIZERS)}")
