"""``protomem-train --dry-run``: check that a config builds, without data, GPUs or memory.

The backbone and the head are built on PyTorch's meta device (shapes only, no storage), so a
WebFace42M job with millions of classes is checked in a second on any machine. The data keys are
checked for presence and consistency, not against files.
"""
from __future__ import annotations

from typing import Any

import torch

from ..backbones import get_model
from ..losses import build_margin_loss
from ..registry import build_head
from .config import ConfigError

__all__ = ["dry_run"]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def dry_run(cfg: Any) -> dict[str, Any]:
    """Build network and head on the meta device; return what they are and the data keys' state.

    Raises :class:`ConfigError` naming the key when the network, the head or a data key fails.
    """
    summary: dict[str, Any] = {"network": cfg.network, "head": cfg.head}
    with torch.device("meta"):
        try:
            backbone = get_model(cfg.network, dropout=float(cfg.get("dropout", 0.0)), fp16=bool(cfg.fp16),
                                 num_features=cfg.embedding_size)
        except Exception as exc:
            raise ConfigError(f"config key 'network' = {cfg.network!r}: the backbone does not build: {exc}") from exc
        image = torch.empty(2, 3, cfg.image_size, cfg.image_size)
        out = backbone.eval()(image)
        if tuple(out.shape) != (2, cfg.embedding_size):
            raise ConfigError(f"network {cfg.network!r} gives embeddings of shape {tuple(out.shape[1:])}, "
                              f"config key 'embedding_size' is {cfg.embedding_size}")
        try:
            margin = build_margin_loss(cfg)
        except ValueError as exc:
            raise ConfigError(f"config key 'margin' = {cfg.get('margin')!r}: the margin does not build: {exc}") from exc
        try:
            head = build_head(cfg, margin)
        except Exception as exc:
            raise ConfigError(f"config key 'head' = {cfg.head!r}: the head does not build: {exc}") from exc
    summary.update(backbone_parameters=sum(p.numel() for p in backbone.parameters()), head_state=_count(head),
                   head_state_bytes=_bytes(head.parameters()) + _bytes(head.buffers()),
                   head_trainable_bytes=_bytes(p for p in head.parameters() if p.requires_grad),
                   head_class=type(head).__name__)
    if hasattr(head, "memory_size"):
        summary["memory_slots"] = int(head.memory_size)
    missing = [k for k in ("rec", "num_classes", "num_image", "num_epoch") if cfg.get(k) is None]
    if missing:
        raise ConfigError(f"data config key(s) {missing} missing")
    summary.update(rec=cfg.rec, num_classes=cfg.num_classes, num_image=cfg.num_image, dali=bool(cfg.get("dali")))
    return summary
