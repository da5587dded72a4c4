"""Margin losses with arcface_torch's calling convention ``margin_loss(logits, labels) -> logits``.

``logits`` are cosines of shape ``(B, C_local)``; ``labels`` hold, for every row, the column of its
target on this shard or ``-1`` when the target lives on another shard. The returned tensor is the
scaled logit matrix that a softmax cross-entropy consumes.

Margins that use the embedding norms (AdaFace) declare ``needs_norms = True``. A head then calls
them as ``margin_loss(logits, labels, norms=norms)``, ``norms`` being the ``(B,)`` norms of the
embeddings of the logit rows before normalisation (the global batch, in gathered order, the same
on every rank). A head may call its margin several times for one batch (the chunked path calls it
per chunk and again in the backward), so a margin with per-batch state also defines
``begin_batch(norms) -> callable(logits, labels)``: the head calls it once per forward, before any
margin call of that step, and uses the returned callable for every call of the step.
:func:`bind_norms` is that rule. Callables without ``needs_norms`` are called exactly as
arcface_torch calls them.

A margin that only scales the logits and replaces each row's target logit may say so with
``target_form() -> TargetForm`` (:class:`CombinedMarginLoss` without interclass filtering, AdaFace's
per-batch margin): the heads then compute the margin softmax fused, without calling the margin on a
``(B, C)`` matrix (:mod:`protomem_plugin.heads.fused`), with the values of its own call.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch
from torch import nn

from .registry import build_margin, register_margin

GRADIENT_MODES = ("straight_through", "exact")


class TargetForm(NamedTuple):
    """A margin that multiplies every logit by ``scale`` except each row's target, whose logit is
    ``targets(cos, labels)``: ``(B,)`` target cosines and labels in, ``(B,)`` scaled logits out
    (differentiable in ``cos``; rows with label ``-1`` give ``scale * cos``).

    Knowing this form, a head computes the margin softmax without materialising the margin's
    ``(B, C)`` output (:mod:`protomem_plugin.heads.fused`); the values are those of the margin's own call.
    """

    scale: float
    targets: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def target_form(margin_loss: Callable) -> Optional[TargetForm]:
    """``margin_loss.target_form()`` where the margin defines it (``None``: the margin must be called)."""
    form = getattr(margin_loss, "target_form", None)
    return form() if callable(form) else None


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether forward (pre-)hooks are registered on ``module``."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


@register_margin("combined")
class CombinedMarginLoss(nn.Module):
    """The default margin (config ``margin = "combined"`` or unset):
    ``s * (cos(m1 * theta + m2) - m3)`` on the target column, ``s * cos(theta)`` elsewhere.

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
        # scale first, then write the targets in place: one (B, C) buffer instead of two
        return (logits * self.s).index_put_((rows, cols), self.scaled_targets(cos, labels))

    def scaled_targets(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logit of each row's target from its cosine ``cos`` ``(B,)``; ``s * cos`` where the label is -1."""
        target = self.target_logit(cos)
        if self.gradient == "straight_through":
            target = cos + (target - cos).detach()
        return torch.where(labels >= 0, target, cos) * self.s

    def target_form(self) -> Optional[TargetForm]:
        """:class:`TargetForm` of this margin; ``None`` with interclass filtering (it edits non-target
        logits), hooks, or a subclass that overrides :meth:`forward`."""
        if (self.interclass_filtering_threshold > 0 or type(self).forward is not CombinedMarginLoss.forward
                or has_forward_hooks(self)):
            return None
        return TargetForm(self.s, self.scaled_targets)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "CombinedMarginLoss":
        """From arcface_torch's ``margin_list`` and ``interclass_filtering_threshold`` plus
        ``margin_scale`` and ``margin_gradient``; ``ValueError`` naming the key for bad values."""
        margins = cfg.get("margin_list", (1.0, 0.5, 0.0))
        try:
            m1, m2, m3 = (float(v) for v in margins)
        except (TypeError, ValueError):
            raise ValueError(f"config key 'margin_list' must hold 3 numbers (m1, m2, m3), got {margins!r}") from None
        _require(m1 > 0, "margin_list", "(m1, m2, m3) with m1 > 0", margins)
        gradient = cfg.get("margin_gradient", "straight_through")
        _require(gradient in GRADIENT_MODES, "margin_gradient", f"one of {GRADIENT_MODES}", gradient)
        return cls(
            s=config_float(cfg, "margin_scale", 64.0),
            m1=m1,
            m2=m2,
            m3=m3,
            interclass_filtering_threshold=config_float(cfg, "interclass_filtering_threshold", 0.0),
            gradient=gradient,
        )

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"interclass_filtering_threshold={self.interclass_filtering_threshold}, gradient={self.gradient!r}"
        )




def needs_norms(margin_loss: Callable) -> bool:
    """Whether ``margin_loss`` declares that it takes the embedding norms (``needs_norms = True``)."""
    return bool(getattr(margin_loss, "needs_norms", False))


def embedding_norms(embeddings: torch.Tensor) -> torch.Tensor:
    """Per-row L2 norms of raw embeddings, detached, in float32 (float64 for float64 embeddings)."""
    x = embeddings.detach()
    return torch.linalg.vector_norm(x if x.dtype == torch.float64 else x.float(), dim=1)


def bind_norms(margin_loss: Callable, norms: Optional[torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The margin of one batch as a ``(logits, labels)`` callable (see the module docstring).

    Without ``needs_norms``: ``margin_loss`` itself. With it: ``margin_loss.begin_batch(norms)`` where
    defined (called here, once), else ``margin_loss`` with ``norms=norms`` bound.
    """
    if not needs_norms(margin_loss):
        return margin_loss
    if norms is None:
        raise ValueError(f"{type(margin_loss).__name__} needs the embedding norms (needs_norms = True), "
                         "but the head passed none")
    begin = getattr(margin_loss, "begin_batch", None)
    if callable(begin):
        return begin(norms)
    return functools.partial(margin_loss, norms=norms)


@register_margin("adaface")
class AdaFaceMarginLoss(nn.Module):
    """AdaFace (Kim, Jain, Liu, CVPR 2022): a margin adapted to image quality through the feature norm.

    With ``n_i = clip(|z_i|, 0.001, 100)`` (detached), batch mean ``mu`` and standard deviation
    ``sigma`` of the norms kept as running values (buffers ``batch_mean``, ``batch_std``, initialised
    to 20 and 100 as in the paper, updated as ``v <- t_alpha * v_batch + (1 - t_alpha) * v``):

    * ``zhat_i = clip(h * (n_i - mu) / (sigma + eps), -1, 1)``;
    * ``g_angle = -m * zhat_i``, ``g_add = m * zhat_i + m``;
    * target logit ``s * (cos(clip(theta_y + g_angle, eps, pi - eps)) - g_add)``, other logits
      ``s * cos(theta_j)``; label ``-1`` marks rows whose target lives on another shard.

    As in the paper the statistics are updated with the current batch *before* ``zhat`` is computed
    (training mode only; in eval mode the running values are used as they are). ``sigma`` is the
    population standard deviation (divisor B), defined for a batch of one. No gradient flows
    through the norms, the statistics or ``zhat``; the gradient of the target is the exact
    derivative of the formula, with ``theta_y = acos(clip(cos, -1 + eps, 1 - eps))`` so that it
    stays finite (a target cosine within ``eps`` of +-1 gets no gradient).

    The statistics must be those of the global batch, identical on every rank: every head of this
    package passes the norms of the gathered batch, so no all-reduce is needed. In a head, the
    statistics are updated once per forward (:meth:`begin_batch`); calling the module directly,
    ``margin(logits, labels, norms=norms)``, updates them and applies the margin in one go.
    """

    needs_norms = True
    options = {
        "adaface_m": (float, 0.4, "AdaFace margin m (>= 0)"),
        "adaface_h": (float, 0.333, "AdaFace concentration h of the normalised norm (> 0)"),
        "adaface_t_alpha": (float, 0.01, "AdaFace EMA momentum of the batch norm statistics, in (0, 1]"),
    }
    NORM_MIN, NORM_MAX = 0.001, 100.0
    INITIAL_MEAN, INITIAL_STD = 20.0, 100.0

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01,
                 eps: float = 1e-3) -> None:
        super().__init__()
        _require(math.isfinite(s) and s > 0, "margin_scale", "a positive number", s)
        _require(math.isfinite(m) and m >= 0, "adaface_m", ">= 0", m)
        _require(math.isfinite(h) and h > 0, "adaface_h", "> 0", h)
        _require(0.0 < t_alpha <= 1.0, "adaface_t_alpha", "in (0, 1]", t_alpha)
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
        self.s, self.m, self.h, self.t_alpha, self.eps = float(s), float(m), float(h), float(t_alpha), float(eps)
        self.register_buffer("batch_mean", torch.tensor(self.INITIAL_MEAN))
        self.register_buffer("batch_std", torch.tensor(self.INITIAL_STD))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], adaface_m: float = 0.4, adaface_h: float = 0.333,
                    adaface_t_alpha: float = 0.01) -> "AdaFaceMarginLoss":
        """From the config keys ``adaface_m``, ``adaface_h``, ``adaface_t_alpha`` and ``margin_scale``."""
        return cls(s=config_float(cfg, "margin_scale", 64.0), m=adaface_m, h=adaface_h, t_alpha=adaface_t_alpha)

    @torch.no_grad()
    def update_statistics(self, norms: torch.Tensor) -> None:
        """Blend the mean and standard deviation of ``norms`` (clipped, one global batch) into the buffers."""
        if norms.numel() == 0:
            return
        norms = norms.detach().to(self.batch_mean.dtype)
        mean = norms.mean()
        std = norms.std(unbiased=False)
        self.batch_mean.copy_(self.t_alpha * mean + (1.0 - self.t_alpha) * self.batch_mean)
        self.batch_std.copy_(self.t_alpha * std + (1.0 - self.t_alpha) * self.batch_std)

    @torch.no_grad()
    def normalized_norms(self, norms: torch.Tensor) -> torch.Tensor:
        """``zhat`` of clipped ``norms`` against the current running statistics."""
        mean, std = self.batch_mean.to(norms.dtype), self.batch_std.to(norms.dtype)
        return (self.h * (norms - mean) / (std + self.eps)).clamp(-1.0, 1.0)

    def begin_batch(self, norms: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Update the statistics with this batch (training mode), then return its margin as a
        ``(logits, labels)`` callable with the per-row ``g_angle``, ``g_add`` fixed."""
        norms = norms.detach().clamp(self.NORM_MIN, self.NORM_MAX)
        if self.training:
            self.update_statistics(norms)
        zhat = self.normalized_norms(norms)
        return AdaFaceBatch(self, -self.m * zhat, self.m * zhat + self.m)

    def target_logit(self, cos: torch.Tensor, g_angle: torch.Tensor, g_add: torch.Tensor) -> torch.Tensor:
        """Unscaled target logit ``cos(clip(theta + g_angle, eps, pi - eps)) - g_add``."""
        theta = torch.acos(cos.clamp(-1.0 + self.eps, 1.0 - self.eps))
        return torch.cos((theta + g_angle).clamp(self.eps, math.pi - self.eps)) - g_add

    def apply_margin(self, logits: torch.Tensor, labels: torch.Tensor, g_angle: torch.Tensor,
                     g_add: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the margin of each row (``g_angle``, ``g_add`` of shape ``(B,)``) on its target."""
        labels = labels.reshape(-1)
        if logits.shape[0] != g_angle.shape[0]:
            raise ValueError(f"AdaFace got {logits.shape[0]} logit rows but norms for {g_angle.shape[0]} rows")
        if logits.shape[1] == 0:
            return logits * self.s
        rows = torch.arange(labels.numel(), device=labels.device)
        cols = labels.clamp_min(0)
        cos = logits[rows, cols]
        return (logits * self.s).index_put_((rows, cols), self.scaled_targets(cos, labels, g_angle, g_add))

    def scaled_targets(self, cos: torch.Tensor, labels: torch.Tensor, g_angle: torch.Tensor,
                       g_add: torch.Tensor) -> torch.Tensor:
        """Scaled logit of each row's target from its cosine ``cos`` ``(B,)``; ``s * cos`` where the label is -1."""
        target = self.target_logit(cos, g_angle.to(cos.dtype), g_add.to(cos.dtype))
        return torch.where(labels >= 0, target, cos) * self.s

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Update the statistics with ``norms`` (training mode) and apply the margin: :meth:`begin_batch` in one call."""
        if norms is None:
            raise ValueError("AdaFaceMarginLoss needs the embedding norms: margin(logits, labels, norms=norms) "
                             "(the heads of protomem_plugin pass them; arcface_torch's PartialFC_V2 does not)")
        return self.begin_batch(norms)(logits, labels)

    def diagnostics(self) -> dict[str, float]:
        """The running norm statistics (identical on every rank)."""
        return {"adaface_norm_mean": float(self.batch_mean), "adaface_norm_std": float(self.batch_std)}

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}, eps={self.eps}"


class AdaFaceBatch:
    """AdaFace's margin for one batch (:meth:`AdaFaceMarginLoss.begin_batch`): a ``(logits, labels)``
    callable with each row's ``g_angle`` and ``g_add`` fixed."""

    def __init__(self, margin: AdaFaceMarginLoss, g_angle: torch.Tensor, g_add: torch.Tensor) -> None:
        self.margin, self.g_angle, self.g_add = margin, g_angle, g_add

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.margin.apply_margin(logits, labels, g_angle=self.g_angle, g_add=self.g_add)

    def scaled_targets(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled target logits of the rows (see :meth:`AdaFaceMarginLoss.scaled_targets`)."""
        if cos.shape[0] != self.g_angle.shape[0]:
            raise ValueError(f"AdaFace got {cos.shape[0]} logit rows but norms for {self.g_angle.shape[0]} rows")
        return self.margin.scaled_targets(cos, labels.reshape(-1), self.g_angle, self.g_add)

    def target_form(self) -> Optional[TargetForm]:
        """:class:`TargetForm` of this batch's margin (``None`` if a subclass changes how it is applied)."""
        cls = type(self.margin)
        if cls.apply_margin is not AdaFaceMarginLoss.apply_margin or cls.scaled_targets is not AdaFaceMarginLoss.scaled_targets:
            return None
        return TargetForm(self.margin.s, self.scaled_targets)


def _require(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"config key {key!r} must be {what}, got {value!r}")


def config_float(cfg: Mapping[str, Any], key: str, default: float) -> float:
    """``cfg[key]`` (``default`` when unset) as a float; ``ValueError`` naming the key otherwise."""
    value = cfg.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"config key {key!r} must be a number, got {value!r}")
    return float(value)


def build_margin_loss(cfg: Mapping[str, Any]) -> nn.Module:
    """The margin loss config key ``margin`` names (default ``"combined"``: arcface_torch's
    ``margin_list`` with ``margin_scale``), built by :func:`protomem_plugin.registry.build_margin`."""
    return build_margin(cfg)
