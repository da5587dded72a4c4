"""Chunked margin-softmax statistics: the head's logits never exist as one ``(B, C)`` matrix.

:func:`chunked_softmax_statistics` returns the same per-row ``(max, sum_exp, target_logit)`` as
:func:`protomem_plugin.distributed.softmax_statistics` applied to
``margin_loss(clamp(normed @ normalize?(W).T, -1, 1), target)``, but walks the columns in chunks with
an online log-sum-exp, so the head's activation memory is ``O(B x chunk)`` instead of ``O(B x C)``.

Cost: the gradient with respect to the embeddings is linear in the per-row upstream gradients, so the
forward accumulates it chunk by chunk (``sum_j exp(l_j - m) dl_j/dx``, rescaled like the sum of
exponentials) and the backward only scales it: no second pass over the columns for the embeddings.
Columns whose weights need a gradient are recomputed in the backward: all of them for Partial FC
(its class centres), only the freshly written columns for Prototype Memory. The result feeds
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


class ColumnSource:
    """Where the columns of the logit matrix come from (see the module docstring)."""

    def __init__(
        self,
        weight: torch.Tensor,
        index: Optional[torch.Tensor] = None,
        override_columns: Optional[torch.Tensor] = None,
        override: Optional[torch.Tensor] = None,
        normalize: bool = False,
    ) -> None:
        if (override_columns is None) != (override is None):
            raise ValueError("override_columns and override must be given together")
        self.weight = weight
        self.index = index
        self.normalize = bool(normalize)
        if override_columns is not None and override_columns.numel():
            order = torch.argsort(override_columns)
            self.override_columns = override_columns[order]
            self.override_order = order
            self.override = override
        else:
            self.override_columns = self.override_order = self.override = None
        self.num_columns = int(index.numel()) if index is not None else int(weight.shape[0])

    def rows(self, start: int, stop: int):
        """Rows of ``weight`` behind columns ``[start, stop)`` (a slice or an index tensor)."""
        return slice(start, stop) if self.index is None else self.index[start:stop]

    def overrides(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (into ``override``) and chunk-relative columns of the overridden columns in the chunk."""
        lo, hi = self._override_bounds[start], self._override_bounds[stop]
        return self.override_order[lo:hi], self.override_columns[lo:hi] - start

    def split(self, chunk: int) -> list[tuple[int, int]]:
        """Column ranges of the chunks (locates the overridden columns of every chunk in one search)."""
        edges = list(range(0, self.num_columns, chunk)) + [self.num_columns]
        if self.override_columns is not None:
            found = torch.searchsorted(self.override_columns, torch.tensor(edges, device=self.override_columns.device))
            self._override_bounds = dict(zip(edges, found.tolist()))
        return list(zip(edges[:-1], edges[1:]))

    def column_vectors(self, weight: torch.Tensor, override: Optional[torch.Tensor], columns: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
        """Weight vectors (``(len(columns), D)``, before normalisation) of arbitrary ``columns``."""
        out = weight[columns if self.index is None else self.index[columns]].to(dtype)
        if override is not None and self.override_columns is not None and columns.numel():
            last = self.override_columns.numel() - 1
            pos = torch.searchsorted(self.override_columns, columns).clamp_max(last)
            hit = self.override_columns[pos] == columns
            out[hit] = override[self.override_order[pos[hit]]].to(dtype)
        return out


def _chunk_cosines(
    normed: torch.Tensor, weight_rows: torch.Tensor, override_rows: Optional[torch.Tensor],
    override_cols: Optional[torch.Tensor], normalize: bool, out_dtype: torch.dtype,
    autocast: Callable[[], ContextManager],
) -> torch.Tensor:
    w = weight_rows.to(out_dtype)
    if override_rows is not None and override_rows.numel():
        w = w.index_copy(0, override_cols, override_rows.to(out_dtype))
    if normalize:
        w = F.normalize(w, dim=1)
    with autocast():
        cos = normed @ w.t()
    return cos.to(out_dtype).clamp(-1.0, 1.0)


def _chunk_targets(target: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    inside = (target >= start) & (target < stop)
    return torch.where(inside, target - start, torch.full_like(target, -1))


def _target_gradient(normed, weight, override, source, margin_loss, target, out_dtype):
    """``d target_logit_i / d x_i`` for every row (0 where the target is on another shard)."""
    grad = torch.zeros_like(normed)
    hit = torch.nonzero(target >= 0).squeeze(1)
    if hit.numel() == 0:
        return grad
    w = source.column_vectors(weight, override, target[hit], out_dtype)
    if source.normalize:
        w = F.normalize(w, dim=1)
    with torch.enable_grad():
        x = normed[hit].detach().requires_grad_(True)
        cos = (x * w).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
        logit = margin_loss(cos, torch.zeros(hit.numel(), dtype=target.dtype, device=target.device))
        (g,) = torch.autograd.grad(logit, x, torch.ones_like(logit), allow_unused=True)
    if g is not None:
        grad[hit] = g
    return grad


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
        weighted_grad = torch.zeros_like(normed) if need_x else None
        x_leaf = normed.detach().requires_grad_(need_x)
        for start, stop in source.split(chunk):
            positions, cols = source.overrides(start, stop) if override is not None else (None, None)
            chunk_target = _chunk_targets(target, start, stop)
            with torch.set_grad_enabled(need_x):
                cos = _chunk_cosines(
                    x_leaf, weight[source.rows(start, stop)].detach(),
                    override[positions].detach() if positions is not None else None,
                    cols, source.normalize, out_dtype, autocast,
                )
                logits = margin_loss(cos, chunk_target)
            with torch.no_grad():
                new_max = torch.maximum(row_max, logits.amax(dim=1))
                rescale = (row_max - new_max).exp()
                exp = (logits - new_max.unsqueeze(1)).exp()
                sum_exp = sum_exp * rescale + exp.sum(dim=1)
                row_max = new_max
                hit = torch.nonzero(chunk_target >= 0).squeeze(1)
                target_logit[hit] = logits[hit, chunk_target[hit]]
            if need_x and logits.requires_grad:
                (g,) = torch.autograd.grad(logits, x_leaf, exp)
                weighted_grad.mul_(rescale.unsqueeze(1)).add_(g)
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
        if grad_sum_exp is None:
            grad_sum_exp = torch.zeros_like(row_max)
        if grad_target is None:
            grad_target = torch.zeros_like(row_max)
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


def _upstream(logits, chunk_target, row_max, grad_sum_exp, grad_target):
    """``d loss / d logits`` of a chunk: ``g_s exp(l - m) + g_t onehot(target)``."""
    grad = (logits - row_max.unsqueeze(1)).exp() * grad_sum_exp.unsqueeze(1)
    hit = torch.nonzero(chunk_target >= 0).squeeze(1)
    grad[hit, chunk_target[hit]] += grad_target[hit]
    return grad


def _weight_gradients(ctx, normed, weight, override, target, row_max, grad_sum_exp, grad_target, need_override):
    """Recompute every chunk and back-propagate into the weight (and overriding) rows."""
    source, out_dtype = ctx.source, row_max.dtype
    grad_weight = torch.zeros_like(weight)
    grad_override = torch.zeros_like(override) if need_override else None
    x = normed.detach()
    for start, stop in source.split(ctx.chunk):
        rows = source.rows(start, stop)
        positions, cols = source.overrides(start, stop) if ctx.has_override else (None, None)
        with torch.enable_grad():
            weight_leaf = weight[rows].detach().requires_grad_(True)
            override_leaf = None
            if positions is not None:
                override_leaf = override[positions].detach().requires_grad_(need_override)
            cos = _chunk_cosines(x, weight_leaf, override_leaf, cols, source.normalize, out_dtype, ctx.autocast)
            chunk_target = _chunk_targets(target, start, stop)
            logits = ctx.margin_loss(cos, chunk_target)
            if not logits.requires_grad:
                continue
            with torch.no_grad():
                upstream = _upstream(logits, chunk_target, row_max, grad_sum_exp, grad_target)
            inputs = [weight_leaf] + ([override_leaf] if need_override and override_leaf is not None else [])
            grads = torch.autograd.grad(logits, inputs, upstream, allow_unused=True)
        if grads[0] is not None:
            if isinstance(rows, slice):
                grad_weight[rows] += grads[0]
            else:
                grad_weight.index_add_(0, rows, grads[0].to(grad_weight.dtype))
        if len(grads) > 1 and grads[1] is not None:
            grad_override.index_add_(0, positions, grads[1].to(grad_override.dtype))
    return grad_weight, grad_override


def _override_gradient(ctx, normed, override, target, row_max, grad_sum_exp, grad_target):
    """Gradient of the overriding rows alone: only their columns are recomputed."""
    source, out_dtype = ctx.source, row_max.dtype
    columns = source.override_columns  # sorted; override row of column k is override_order[k]
    # position of each row's target among the overridden columns, -1 where it is not one of them
    pos = torch.searchsorted(columns, target.clamp_min(0)).clamp_max(columns.numel() - 1)
    sub_target = torch.where((target >= 0) & (columns[pos] == target), pos, torch.full_like(target, -1))
    with torch.enable_grad():
        leaf = override[source.override_order].detach().requires_grad_(True)
        w = F.normalize(leaf.to(out_dtype), dim=1) if source.normalize else leaf.to(out_dtype)
        with ctx.autocast():
            cos = normed.detach() @ w.t()
        logits = ctx.margin_loss(cos.to(out_dtype).clamp(-1.0, 1.0), sub_target)
        with torch.no_grad():
            upstream = _upstream(logits, sub_target, row_max, grad_sum_exp, grad_target)
        (g,) = torch.autograd.grad(logits, leaf, upstream)
    grad = torch.zeros_like(override)
    grad[source.override_order] = g.to(grad.dtype)
    return grad


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
