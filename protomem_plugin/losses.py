"""Margin losses with arcface_torch's calling convention ``margin_loss(logits, labels) -> logits``.

``logits`` are cosines of shape ``(B, C_local)``; ``labels`` hold, for every row, the column of its
target on this shard or ``-1`` when the target lives on another shard. The returned tensor is the
scaled logit matrix that a softmax cross-entropy consumes.
"""
from __future__ import annotations

import math

import torch
from torch import nn

GRADIENT_MODES = ("straight_through", "exact")


class CombinedMarginLoss(nn.Module):
    """``s * (cos(m1 * theta + m2) - m3)`` on the target column, ``s * cos(theta)`` elsewhere.

    * ArcFace: ``m1=1, m2>0, m3=0``; CosFace: ``m1=1, m2=0, m3>0``; any combination is allowed.
    * ``gradient="straight_through"`` (default) reproduces arcface_torch: the margin shifts the
      target's *value* but its gradient with respect to ``cos(theta)`` is that of the plain cosine
      (``s``). It is the default because it keeps arcface_torch's training dynamics (drop-in results)
      and because the exact derivative ``d cos(theta+m)/d cos(theta)`` grows without bound as
      ``theta -> 0``, which Prototype Memory hits often (a positive prototype contains the sample).
    * ``gradient="exact"`` differentiates the closed form
      ``cos(theta+m) = c cos(m) - sin(m) sqrt(1-c^2)`` (angular margins generalised to ``m1``), with
      ``1-c^2`` clamped at ``eps`` so the gradient stays finite.
    * ``theta`` beyond ``theta0 = (pi - m2) / m1`` (where the angle would pass pi and ``cos`` would turn
      back up) uses ``c - c0 - 1 - m3`` with ``c0 = cos(theta0)``: it meets the margin curve
      continuously at ``theta0`` and stays increasing in ``c``.
    * ``interclass_filtering_threshold > 0`` sets non-target logits above the threshold to 0 (no
      gradient), as arcface_torch does; on rows whose target is on another shard every logit counts
      as non-target.
    """

    def __init__(
        self,
        s: float,
        m1: float,
        m2: float,
        m3: float,
        interclass_filtering_threshold: float = 0.0,
        gradient: str = "straight_through",
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
        if m1 <= 0:
            raise ValueError(f"m1 must be > 0, got {m1}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.gradient = gradient
        self.eps = float(eps)
        self.theta0 = min(math.pi, (math.pi - self.m2) / self.m1)
        self.cos_theta0 = math.cos(self.theta0)

    @property
    def has_angular_margin(self) -> bool:
        return self.m1 != 1.0 or self.m2 != 0.0

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        """Margin-adjusted (unscaled) target cosine for target cosines ``cos`` (exact gradient)."""
        if not self.has_angular_margin:
            return cos - self.m3
        c = cos.clamp(-1.0, 1.0)
        if self.m1 == 1.0:
            sin = (1.0 - c * c).clamp_min(self.eps).sqrt()
            margin = c * math.cos(self.m2) - sin * math.sin(self.m2)
        else:
            theta = torch.acos(c.clamp(-1.0 + self.eps, 1.0 - self.eps))
            margin = torch.cos(self.m1 * theta + self.m2)
        beyond = c - self.cos_theta0 - 1.0
        return torch.where(c >= self.cos_theta0, margin, beyond) - self.m3

    def filter_interclass(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Zero non-target logits above the filtering threshold (a constant mask, no gradient)."""
        with torch.no_grad():
            drop = logits > self.interclass_filtering_threshold
            is_target = torch.zeros_like(drop).scatter_(1, labels.clamp_min(0).unsqueeze(1), (labels >= 0).unsqueeze(1))
        return logits.masked_fill(drop & ~is_target, 0.0)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.reshape(-1)
        if logits.shape[1] == 0:  # a shard without columns this step
            return logits * self.s
        if self.interclass_filtering_threshold > 0:
            logits = self.filter_interclass(logits, labels)
        # every row reads a column (column 0 where the target is on another shard) and writes it back:
        # fixed shapes, so no host-device synchronisation
        # integer indexing, not gather: its backward keeps no reference to the (B, C) logits
        rows = torch.arange(labels.numel(), device=labels.device)
        cols = labels.clamp_min(0)
        cos = logits[rows, cols]
        target = self.target_logit(cos)
        if self.gradient == "straight_through":
            target = cos + (target - cos).detach()
        # scale first, then write the targets in place: one (B, C) buffer instead of two
        return (logits * self.s).index_put_((rows, cols), torch.where(labels >= 0, target, cos) * self.s)

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"interclass_filtering_threshold={self.interclass_filtering_threshold}, gradient={self.gradient!r}"
        )


def build_margin_loss(cfg) -> CombinedMarginLoss:
    """Build the margin loss from an arcface_torch config (``margin_list``, ``interclass_filtering_threshold``)."""
    margins = cfg.get("margin_list", (1.0, 0.5, 0.0))
    if len(margins) != 3:
        raise ValueError(f"config key 'margin_list' must hold 3 numbers (m1, m2, m3), got {margins!r}")
    return CombinedMarginLoss(
        s=float(cfg.get("margin_scale", 64.0)),
        m1=float(margins[0]),
        m2=float(margins[1]),
        m3=float(margins[2]),
        interclass_filtering_threshold=float(cfg.get("interclass_filtering_threshold", 0.0)),
        gradient=str(cfg.get("margin_gradient", "straight_through")),
    )
