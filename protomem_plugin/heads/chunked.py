"""Chunked margin-softmax statistics: the head's logits never exist as one ``(B, C)`` matrix.

:func:`chunked_softmax_statistics` returns the same per-row ``(max, sum_exp, target_logit)`` as
:func:`protomem_plugin.distributed.softmax_statistics` applied to
``margin_loss(clamp(normed @ normalize?(W).T, -1, 1), target)``, but walks the columns in chunks with
an online log-sum-exp, so the head's activation memory is ``O(B x chunk)`` instead of ``O(B x C)``.

Cost: the gradient with respect to the embeddings is linear in the per-row upstream gradients, so the
forward accumulates it chunk by chunk (``sum_j exp(l_j - m) dl_j/dx``, rescaled like the sum of
exponentials) and the backward only scales it: no second pass over the columns for the embeddings.
That sum is formed without the loss scale, so under ``fp16`` its chunk product runs on the per-row
gradients divided by their row maximum (entries in ``[-1, 1]``, at most 32768 columns per product, so
a float16 result cannot overflow) and is accumulated in float32.
Columns whose weights need a gradient are recomputed in the backward: all of them for Partial FC
(its class centres), only the freshly written columns for Prototype Memory. No step reads a device value on the host: column ranges follow from shapes, and masks become
``where``/``gather``/``scatter`` of fixed shapes. The result feeds
:func:`protomem_plugin.distributed.cross_entropy_from_statistics`, the one distributed softmax of the
package.

Columns come from a weight matrix: column ``j`` is row ``index[j]`` of ``weight`` (or row ``j``
without ``index``), except the columns listed in ``override_columns``, which take the rows of
``override`` instead (Prototype Memory's freshly written slots, attached to their exemplars).

``margin_loss`` must treat columns independently given the targets (every arcface_torch margin
does: it edits the target column and filters non-target logits element-wise). It may modify its
input in place under ``no_grad``, as arcface_torch's ArcFace branch does.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F

MarginLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOW_PRECISION_PRODUCT_COLUMNS = 32768  # float16 sums of at most this many terms in [-1, 1] stay finite


class ColumnSource:
    """Where the columns of the logit matrix come from (see the module docstring)."""

    def __init__(
        self,
        weight: torch.Tensor,
        index: Optional[torch.Tensor] = None,
        override_columns: Optional[torch.Tensor] = None,
        override: Optional[torch.Tensor] = None,
        normalize: bool = False,
        override_in_weight: bool = False,
    ) -> None:
        if (override_columns is None) != (override is None):
            raise ValueError("override_columns and override must be given together")
        self.weight = weight
        self.index = index
        self.normalize = bool(normalize)
        # the weight rows of the overridden columns already hold the override values (Prototype
        # Memory writes its fresh prototypes before the loss): the forward reads the weight alone
        self.override_in_weight = bool(override_in_weight)
        self.num_columns = int(index.numel()) if index is not None else int(weight.shape[0])
        self.override = override if override_columns is not None and override_columns.numel() else None
        self._override_columns = override_columns
        self._override_slot: Optional[torch.Tensor] = None

    @property
    def override_slot(self) -> Optional[torch.Tensor]:
        """Column -> row of ``override`` (-1 elsewhere); built on first use (the plain path never asks)."""
        if self.override is not None and self._override_slot is None:
            columns = self._override_columns
            positions = torch.arange(columns.numel(), device=columns.device)
            self._override_slot = torch.full((self.num_columns,), -1, dtype=torch.int64,
                                             device=columns.device).index_put_((columns,), positions)
        return self._override_slot

    def rows(self, start: int, stop: int):
        """Rows of ``weight`` behind columns ``[start, stop)`` (a slice or an index tensor)."""
        return slice(start, stop) if self.index is None else self.index[start:stop]

    def split(self, chunk: int) -> list[tuple[int, int]]:
        """Column ranges of the chunks."""
        return [(start, min(start + chunk, self.num_columns)) for start in range(0, self.num_columns, chunk)]

    def vectors(self, weight_rows: torch.Tensor, override: Optional[torch.Tensor], slots: Optional[torch.Tensor],
                dtype: torch.dtype) -> torch.Tensor:
        """Column vectors from their weight rows, the overridden ones (``slots >= 0``) from ``override``,
        normalised when the source says so; differentiable in both inputs."""
        w = weight_rows.to(dtype)
        if override is not None and slots is not None:
            w = torch.where((slots >= 0).unsqueeze(1), override[slots.clamp_min(0)].to(dtype), w)
        return F.normalize(w, dim=1) if self.normalize else w

    def chunk_vectors(self, weight: torch.Tensor, override: Optional[torch.Tensor], start: int, stop: int,
                      dtype: torch.dtype) -> torch.Tensor:
        """Column vectors ``[start, stop)`` (values only when the overrides are in the weight)."""
        slots = None
        if not self.override_in_weight and self.override_slot is not None:
            slots = self.override_slot[start:stop]
        return self.vectors(weight[self.rows(start, stop)], override, slots, dtype)

    def column_vectors(self, weight: torch.Tensor, override: Optional[torch.Tensor], columns: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
        """Column vectors of arbitrary (valid) ``columns``."""
        rows = columns if self.index is None else self.index[columns]
        slots = self.override_slot[columns] if self.override_slot is not None else None
        return self.vectors(weight[rows], override, slots, dtype)


def _cosines(normed: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype,
             autocast: Callable[[], ContextManager]) -> torch.Tensor:
    with autocast():
        cos = normed @ w.t()
    return cos.to(out_dtype)


def _chunk_targets(target: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    inside = (target >= start) & (target < stop)
    return torch.where(inside, target - start, torch.full_like(target, -1))


def _row_gradient_product(grad: torch.Tensor, w: torch.Tensor, autocast: Callable[[], ContextManager]) -> torch.Tensor:
    """``grad @ w`` in float32; in low precision on row-normalised ``grad``, in column blocks that cannot overflow."""
    with autocast():
        low = torch.is_autocast_enabled(grad.device.type)
        if not low:
            return grad @ w.to(grad.dtype)
        scale = grad.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(grad.dtype).tiny)
        unit = grad / scale
        out = torch.zeros(grad.shape[0], w.shape[1], dtype=grad.dtype, device=grad.device)
        for start in range(0, w.shape[0], LOW_PRECISION_PRODUCT_COLUMNS):
            stop = start + LOW_PRECISION_PRODUCT_COLUMNS
            out += (unit[:, start:stop] @ w[start:stop]).to(grad.dtype)
    return out * scale


def _target_gradient(normed, weight, override, source, margin_loss, target, out_dtype):
    """``d target_logit_i / d x_i`` for every row (0 where the target is on another shard)."""
    if source.num_columns == 0:
        return torch.zeros_like(normed)
    hit = (target >= 0).unsqueeze(1)
    w = source.column_vectors(weight, override, target.clamp_min(0), out_dtype).detach()
    with torch.enable_grad():
        x = normed.detach().requires_grad_(True)
        cos = (x * w).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
        logit = margin_loss(cos, torch.zeros(target.numel(), dtype=target.dtype, device=target.device))
        (g,) = torch.autograd.grad(logit, x, torch.ones_like(logit), allow_unused=True)
    if g is None:
        return torch.zeros_like(normed)
    return torch.where(hit, g, torch.zeros_like(g))


class _ChunkedStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, normed, weight, override, source, margin_loss, target, chunk, autocast):  # type: ignore[override]
        rows, device = normed.shape[0], normed.device
        out_dtype = torch.float64 if normed.dtype == torch.float64 else torch.float32
        need_x = ctx.needs_input_grad[0]
        row_max = torch.full((rows,), float("-inf"), dtype=out_dtype, device=device)
        sum_exp = torch.zeros(rows, dtype=out_dtype, device=device)
        target_logit = torch.zeros(rows, dtype=out_dtype, device=device)
        # sum_j exp(l_j - row_max) dl_j/dx, accumulated with the same rescaling as sum_exp
        weighted_grad = torch.zeros(normed.shape, dtype=out_dtype, device=device) if need_x else None
        x = normed.detach()
        for start, stop in source.split(chunk):
            w = source.chunk_vectors(weight.detach(), override.detach() if override is not None else None,
                                     start, stop, out_dtype)
            chunk_target = _chunk_targets(target, start, stop)
            cos = _cosines(x, w, out_dtype, autocast).requires_grad_(need_x)
            with torch.set_grad_enabled(need_x):
                logits = margin_loss(cos.clamp(-1.0, 1.0), chunk_target)
            with torch.no_grad():
                new_max = torch.maximum(row_max, logits.amax(dim=1))
                rescale = (row_max - new_max).exp()
                exp = (logits - new_max.unsqueeze(1)).exp()
                sum_exp = sum_exp * rescale + exp.sum(dim=1)
                row_max = new_max
                chunk_value = logits.gather(1, chunk_target.clamp_min(0).unsqueeze(1)).squeeze(1)
                target_logit = torch.where(chunk_target >= 0, chunk_value, target_logit)
            if need_x and logits.requires_grad:
                (g_cos,) = torch.autograd.grad(logits, cos, exp)
                weighted_grad.mul_(rescale.unsqueeze(1)).add_(_row_gradient_product(g_cos, w, autocast))
            del cos, logits, exp
        target_grad = None
        if need_x:
            target_grad = _target_gradient(normed, weight, override, source, margin_loss, target, out_dtype)
        ctx.save_for_backward(
            normed, weight, override if override is not None else torch.empty(0), target, row_max,
            weighted_grad if need_x else torch.empty(0), target_grad if need_x else torch.empty(0),
        )
        ctx.has_override = override is not None
        ctx.source, ctx.margin_loss, ctx.chunk, ctx.autocast = source, margin_loss, chunk, autocast
        ctx.mark_non_differentiable(row_max)
        return row_max, sum_exp, target_logit

    @staticmethod
    def backward(ctx, _grad_max, grad_sum_exp, grad_target):  # type: ignore[override]
        normed, weight, override, target, row_max, weighted_grad, target_grad = ctx.saved_tensors
        need_normed, need_weight, need_override = ctx.needs_input_grad[:3]
        need_override = need_override and ctx.has_override
        grad_sum_exp, grad_target = upstream_or_zeros(row_max, grad_sum_exp, grad_target)
        grad_normed = grad_weight = grad_override = None
        if need_normed:
            grad_normed = grad_sum_exp.unsqueeze(1) * weighted_grad + grad_target.unsqueeze(1) * target_grad
            grad_normed = grad_normed.to(normed.dtype)
        if need_weight:
            grad_weight, grad_override = _weight_gradients(ctx, normed, weight, override, target, row_max,
                                                           grad_sum_exp, grad_target, need_override)
        elif need_override:
            grad_override = _override_gradient(ctx, normed, override, target, row_max, grad_sum_exp, grad_target)
        return grad_normed, grad_weight, grad_override, None, None, None, None, None


def upstream_or_zeros(like: torch.Tensor, *grads: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The backward's upstream gradients of ``(B,)`` outputs, zeros for the ones autograd left ``None``."""
    return tuple(torch.zeros_like(like) if g is None else g for g in grads)


def _upstream(logits, chunk_target, row_max, grad_sum_exp, grad_target):
    """``d loss / d logits`` of a chunk: ``g_s exp(l - m) + g_t onehot(target)``."""
    grad = (logits - row_max.unsqueeze(1)).exp() * grad_sum_exp.unsqueeze(1)
    hit = chunk_target >= 0
    return grad.scatter_add_(1, chunk_target.clamp_min(0).unsqueeze(1),
                             torch.where(hit, grad_target, torch.zeros_like(grad_target)).unsqueeze(1).to(grad.dtype))


def _weight_gradients(ctx, normed, weight, override, target, row_max, grad_sum_exp, grad_target, need_override):
    """Recompute every chunk and back-propagate into the weight (and overriding) rows."""
    source, out_dtype = ctx.source, row_max.dtype
    grad_weight = torch.zeros_like(weight)
    grad_override = torch.zeros_like(override) if need_override else None
    x = normed.detach()
    override_leaf = override.detach().requires_grad_(need_override) if ctx.has_override else None
    for start, stop in source.split(ctx.chunk):
        rows = source.rows(start, stop)
        with torch.enable_grad():
            weight_leaf = weight[rows].detach().requires_grad_(True)
            slots = source.override_slot[start:stop] if source.override_slot is not None else None
            w = source.vectors(weight_leaf, override_leaf, slots, out_dtype)
            chunk_target = _chunk_targets(target, start, stop)
            logits = ctx.margin_loss(_cosines(x, w, out_dtype, ctx.autocast).clamp(-1.0, 1.0), chunk_target)
            if not logits.requires_grad:
                continue
            with torch.no_grad():
                upstream = _upstream(logits, chunk_target, row_max, grad_sum_exp, grad_target)
            inputs = [weight_leaf] + ([override_leaf] if need_override else [])
            grads = torch.autograd.grad(logits, inputs, upstream, allow_unused=True)
        if grads[0] is not None:
            if isinstance(rows, slice):
                grad_weight[rows] += grads[0]
            else:
                grad_weight.index_add_(0, rows, grads[0].to(grad_weight.dtype))
        if len(grads) > 1 and grads[1] is not None:
            grad_override += grads[1].to(grad_override.dtype)
    return grad_weight, grad_override


def _override_gradient(ctx, normed, override, target, row_max, grad_sum_exp, grad_target):
    """Gradient of the overriding rows alone: only their columns are recomputed."""
    source, out_dtype = ctx.source, row_max.dtype
    # each row's target among the overriding rows, -1 where it is not one of them
    slot = source.override_slot[target.clamp_min(0)]
    sub_target = torch.where((target >= 0) & (slot >= 0), slot, torch.full_like(target, -1))
    with torch.enable_grad():
        leaf = override.detach().requires_grad_(True)
        w = F.normalize(leaf.to(out_dtype), dim=1) if source.normalize else leaf.to(out_dtype)
        logits = ctx.margin_loss(_cosines(normed.detach(), w, out_dtype, ctx.autocast).clamp(-1.0, 1.0), sub_target)
        with torch.no_grad():
            upstream = _upstream(logits, sub_target, row_max, grad_sum_exp, grad_target)
        (g,) = torch.autograd.grad(logits, leaf, upstream)
    return g.to(override.dtype)


def chunked_softmax_statistics(
    normed: torch.Tensor,
    source: ColumnSource,
    margin_loss: MarginLoss,
    target: torch.Tensor,
    chunk: int,
    autocast: Optional[Callable[[], ContextManager]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(max, sum_exp, target_logit)`` of ``margin_loss(cosines, target)``, ``chunk`` columns at a time.

    ``normed``: ``(B, D)`` unit embeddings; ``target``: ``(B,)`` column of each row's target or ``-1``;
    ``autocast``: a context factory for the cosine matmul (the head's ``fp16`` setting).
    Gradients flow into ``normed``, ``source.weight`` and ``source.override`` where they require it.
    """
    if int(chunk) <= 0:
        raise ValueError(f"logits_chunk must be positive for the chunked path, got {chunk}")
    if normed.dtype not in (torch.float32, torch.float64):
        normed = normed.float()  # half-precision embeddings: statistics and gradients in float32
    return _ChunkedStatistics.apply(
        normed, source.weight, source.override, source, margin_loss, target, int(chunk), autocast or nullcontext
    )
