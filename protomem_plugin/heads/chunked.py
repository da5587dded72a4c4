"""Chunked margin-softmax statistics: the head's logits never exist as one ``(B, C)`` matrix.

:func:`chunked_softmax_statistics` returns the same per-row ``(max, sum_exp, target_logit)`` as
:func:`protomem_plugin.distributed.softmax_statistics` applied to
``margin_loss(clamp(normed @ normalize?(W).T, -1, 1), target)``, but walks the columns in chunks with
an online log-sum-exp. Backward recomputes every chunk (cosines, margin, exponentials) and
back-propagates it at once, so the head's activation memory is ``O(B x chunk)`` instead of
``O(B x C)``. The result feeds :func:`protomem_plugin.distributed.cross_entropy_from_statistics`, the
one distributed softmax of the package.

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
        lo, hi = torch.searchsorted(
            self.override_columns, torch.tensor([start, stop], device=self.override_columns.device)
        ).tolist()
        return self.override_order[lo:hi], self.override_columns[lo:hi] - start


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


class _ChunkedStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, normed, weight, override, source, margin_loss, target, chunk, autocast):  # type: ignore[override]
        rows, device = normed.shape[0], normed.device
        out_dtype = torch.float64 if normed.dtype == torch.float64 else torch.float32
        row_max = torch.full((rows,), float("-inf"), dtype=out_dtype, device=device)
        sum_exp = torch.zeros(rows, dtype=out_dtype, device=device)
        target_logit = torch.zeros(rows, dtype=out_dtype, device=device)
        for start in range(0, source.num_columns, chunk):
            stop = min(start + chunk, source.num_columns)
            positions, cols = source.overrides(start, stop) if override is not None else (None, None)
            cos = _chunk_cosines(
                normed, weight[source.rows(start, stop)], override[positions] if positions is not None else None,
                cols, source.normalize, out_dtype, autocast,
            )
            chunk_target = _chunk_targets(target, start, stop)
            logits = margin_loss(cos, chunk_target)
            new_max = torch.maximum(row_max, logits.amax(dim=1))
            sum_exp = sum_exp * (row_max - new_max).exp() + (logits - new_max.unsqueeze(1)).exp().sum(dim=1)
            row_max = new_max
            hit = torch.nonzero(chunk_target >= 0).squeeze(1)
            target_logit[hit] = logits[hit, chunk_target[hit]]
        ctx.save_for_backward(normed, weight, override if override is not None else torch.empty(0), target, row_max)
        ctx.has_override = override is not None
        ctx.source, ctx.margin_loss, ctx.chunk, ctx.autocast = source, margin_loss, chunk, autocast
        ctx.mark_non_differentiable(row_max)
        return row_max, sum_exp, target_logit

    @staticmethod
    def backward(ctx, _grad_max, grad_sum_exp, grad_target):  # type: ignore[override]
        normed, weight, override, target, row_max = ctx.saved_tensors
        source, chunk = ctx.source, ctx.chunk
        need_normed, need_weight, need_override = ctx.needs_input_grad[:3]
        need_override = need_override and ctx.has_override
        out_dtype = row_max.dtype
        grad_normed = torch.zeros_like(normed) if need_normed else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_override = torch.zeros_like(override) if need_override else None
        if grad_sum_exp is None:
            grad_sum_exp = torch.zeros_like(row_max)
        if grad_target is None:
            grad_target = torch.zeros_like(row_max)
        normed_leaf = normed.detach().requires_grad_(need_normed)
        for start in range(0, source.num_columns, chunk):
            stop = min(start + chunk, source.num_columns)
            rows = source.rows(start, stop)
            positions, cols = source.overrides(start, stop) if ctx.has_override else (None, None)
            with torch.enable_grad():
                weight_leaf = weight[rows].detach().requires_grad_(need_weight)
                override_leaf = None
                if positions is not None:
                    override_leaf = override[positions].detach().requires_grad_(need_override)
                cos = _chunk_cosines(normed_leaf, weight_leaf, override_leaf, cols, source.normalize, out_dtype, ctx.autocast)
                chunk_target = _chunk_targets(target, start, stop)
                logits = ctx.margin_loss(cos, chunk_target)
                with torch.no_grad():
                    grad_logits = (logits - row_max.unsqueeze(1)).exp() * grad_sum_exp.unsqueeze(1)
                    hit = torch.nonzero(chunk_target >= 0).squeeze(1)
                    grad_logits[hit, chunk_target[hit]] += grad_target[hit]
                inputs = [t for t, need in ((normed_leaf, need_normed), (weight_leaf, need_weight),
                                            (override_leaf, need_override)) if need and t is not None]
                if not inputs or not logits.requires_grad:
                    continue
                grads = iter(torch.autograd.grad(logits, inputs, grad_logits, allow_unused=True))
            if need_normed:
                g = next(grads)
                if g is not None:
                    grad_normed += g
            if need_weight:
                g = next(grads)
                if g is not None:
                    if isinstance(rows, slice):
                        grad_weight[rows] += g
                    else:
                        grad_weight.index_add_(0, rows, g.to(grad_weight.dtype))
            if need_override and override_leaf is not None:
                g = next(grads)
                if g is not None:
                    grad_override.index_add_(0, positions, g.to(grad_override.dtype))
        return grad_normed, grad_weight, grad_override, None, None, None, None, None


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
    return _ChunkedStatistics.apply(
        normed, source.weight, source.override, source, margin_loss, target, int(chunk), autocast or nullcontext
    )
