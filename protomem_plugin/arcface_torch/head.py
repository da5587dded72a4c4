"""``PartialFC_V2`` under the hook: still a class, building the head that ``config.head`` names.

arcface_torch's ``partial_fc_v2.py`` refers to its class by name inside its own methods
(``super(PartialFC_V2, self).__init__()``), so the name in that module must stay bound to the
original class. The hook therefore leaves the module untouched and registers a view of it in
``sys.modules``: the same attributes, except that ``PartialFC_V2`` is a subclass of the original
whose construction returns our head when ``config.head`` is set, and the original otherwise.
``isinstance(head, PartialFC_V2)`` holds for both; subclasses of the name construct normally.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Callable

import torch

from ..losses import CombinedMarginLoss, has_forward_hooks
from .compat import note
from ..registry import build_head, build_margin, margin_name

__all__ = ["dispatching_class", "equivalent_margin", "install_head"]


def _arcface_call(margin_loss: Callable, embedding_size: int, num_classes: int, sample_rate: float = 1.0,
                  fp16: bool = False) -> dict[str, Any]:
    return dict(margin_loss=margin_loss, embedding_size=embedding_size, num_classes=num_classes,
                sample_rate=sample_rate, fp16=fp16)


def equivalent_margin(margin_loss: Callable) -> Callable:
    """arcface_torch's own ``losses.CombinedMarginLoss`` as the project's margin of the same
    ``s, m1, m2, m3`` and filtering threshold, which a head can run fused
    (:mod:`protomem_plugin.heads.fused`): the same values and gradients (straight-through), except
    for ArcFace targets beyond ``theta = pi - m2``, where arcface_torch's ``cos(theta + m2)`` turns
    back up and the project's target keeps decreasing (see :class:`~protomem_plugin.losses.CombinedMarginLoss`).
    Any other callable (a subclass, the user's own margin) is returned as it is."""
    cls = type(margin_loss)
    if cls.__module__ != "losses" or cls.__qualname__ != "CombinedMarginLoss":
        return margin_loss
    if isinstance(margin_loss, torch.nn.Module) and has_forward_hooks(margin_loss):
        return margin_loss
    try:
        values = [float(getattr(margin_loss, key)) for key in ("s", "m1", "m2", "m3", "interclass_filtering_threshold")]
    except (AttributeError, TypeError, ValueError):
        return margin_loss
    return CombinedMarginLoss(*values)


def dispatching_class(original: type, cfg: Any) -> type:
    """A subclass of ``original`` that builds ``cfg.head`` from the registry when it is set."""
    built: list[type] = []

    class DispatchingMeta(type(original)):
        def __call__(cls, *args, **kwargs):
            if cls is not dispatcher:
                return super().__call__(*args, **kwargs)
            if not cfg.get("head"):
                return original(*args, **kwargs)
            call = _arcface_call(*args, **kwargs)
            merged = dict(cfg)
            merged.update(embedding_size=call["embedding_size"], num_classes=call["num_classes"],
                          sample_rate=call["sample_rate"], fp16=call["fp16"])
            # train_v2 always builds CombinedMarginLoss; a config that selects another margin gets that one
            margin_loss = call["margin_loss"] if margin_name(merged) == "combined" else build_margin(merged)
            given, margin_loss = margin_loss, equivalent_margin(margin_loss)
            if margin_loss is not given:
                note(f"train_v2's CombinedMarginLoss(s={given.s}, m1={given.m1}, m2={given.m2}, m3={given.m3}) runs as "
                     "protomem's CombinedMarginLoss of the same values and gradients, which PM and QAPM fuse")
            head = build_head(merged, margin_loss)
            built.append(type(head))
            return head

        def __instancecheck__(cls, obj) -> bool:
            if cls is dispatcher:
                return isinstance(obj, (original, *built))
            return super().__instancecheck__(obj)

        def __subclasscheck__(cls, sub) -> bool:
            if cls is dispatcher:
                return issubclass(sub, (original, *built))
            return super().__subclasscheck__(sub)

    dispatcher = DispatchingMeta(original.__name__, (original,), {
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": f"{original.__name__} under protomem's hook: builds config.head ({cfg.get('head') or 'unset'}).",
    })
    return dispatcher


def install_head(cfg: Any, module_name: str = "partial_fc_v2") -> type:
    """Import arcface_torch's head module and publish a view whose ``PartialFC_V2`` dispatches."""
    real = importlib.import_module(module_name)
    original = getattr(real, "_protomem_original", real.PartialFC_V2)  # installing twice wraps the original once
    view = types.ModuleType(real.__name__, real.__doc__)
    view.__dict__.update(real.__dict__)
    view.PartialFC_V2 = dispatching_class(original, cfg)
    view._protomem_original = original
    sys.modules[module_name] = view
    return view.PartialFC_V2
