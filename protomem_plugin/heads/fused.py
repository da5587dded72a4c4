"""Fused margin softmax statistics for margins of target form, in column blocks.

A margin with a :class:`protomem_plugin.losses.TargetForm` multiplies every cosine by ``s`` and
replaces only each row's target. For such a margin the per-row statistics
``(max, sum_exp, target_logit)`` of :func:`protomem_plugin.distributed.softmax_statistics` and the
gradient with respect to the embeddings are computed here without autograd over ``(B, C)``
tensors: the columns are walked in blocks of reused scratch buffers (:class:`Workspace`, kept by
the head across steps), each block being

1. one matrix product ``x @ w.T`` into the buffer (the logits GEMM),
2. a few in-place passes while the block is in cache (clamp to ``[-1, 1]``, scale and shift,
   ``exp``, row sums; the target entries are masked out and handled per row),
3. one matrix product ``exp(l - m) @ w`` accumulated into a ``(B, D)`` sum (the embedding-gradient
   GEMM, formed in the forward and scaled by the upstream gradients in the backward),

with an online log-sum-exp across blocks, so a step allocates nothing of size ``(B, C)``. The
target logits go through the margin's own target function on ``(B,)`` vectors, so their values
and derivatives are those of the margin. Entries whose cosine was clamped get no gradient, as with
``clamp`` (a 0/1 factor computed per block: no host-device synchronisation anywhere).

Only the weight rows of the overriding columns (Prototype Memory's freshly written prototypes)
receive a gradient, recomputed in the backward over those columns alone. The columns must come
from a weight that needs no gradient and is not normalised on the fly (Prototype Memory and QAPM;
Partial FC keeps the paths of :mod:`.chunked` and the materialised logits), with float32 or float64
embeddings. Under an autocast context (``fp16`` heads) both matrix products run in the autocast dtype
(as the composed path's products do) and everything else in float32; the second product takes the
block's ``exp`` values, which are in ``[0, 1]``, and a float16 block has at most
:data:`~.chunked.LOW_PRECISION_PRODUCT_COLUMNS` columns, so its sums cannot overflow.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Optional

import torch

from ..losses import TargetForm, target_form
from .chunked import LOW_PRECISION_PRODUCT_COLUMNS, ColumnSource, MarginLoss, _override_gradient, upstream_or_zeros

DEFAULT_BLOCK_ELEMENTS = 1 << 20  # logits per block on the CPU (4 MiB in float32): the block stays in cache
DEVICE_BLOCK_ELEMENTS = 1 << 25  # on accelerators, where kernel launches rather than caches set the size


class Workspace:
    """Scratch buffers of a head, reused from step to step; never part of the head's state.

    Every value is written before it is read within one call, so nothing carries over between
    steps; a buffer is reallocated when a larger size, another dtype or device is asked for.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat tensor of ``numel`` elements (uninitialised contents)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)  # free the old one before allocating the new one
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel]

    def clear(self) -> None:
        """Release every buffer."""
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def __getstate__(self) -> dict:  # copies and pickles of a head start without scratch memory
        return {"_buffers": {}}

    def __deepcopy__(self, memo) -> "Workspace":
        return Workspace()


def fused_form(margin_loss: MarginLoss, normed: torch.Tensor, source: ColumnSource) -> Optional[TargetForm]:
    """The margin's target form when the fused path applies to these inputs, else ``None``."""
    if normed.dtype not in (torch.float32, torch.float64) or source.normalize:
        return None
    if source.num_columns == 0 or source.weight.requires_grad or not source.weight.is_floating_point():
        return None
    form = target_form(margin_loss)
    return form if form is not None and float(form.scale) > 0 else None


def default_block(rows: int, device: Optional[torch.device] = None) -> int:
    """Columns per block for ``rows`` logit rows: about :data:`DEFAULT_BLOCK_ELEMENTS` logits on the
    CPU, :data:`DEVICE_BLOCK_ELEMENTS` on other devices."""
    elements = DEFAULT_BLOCK_ELEMENTS if device is None or torch.device(device).type == "cpu" else DEVICE_BLOCK_ELEMENTS
    return max(256, elements // max(int(rows), 1))


def _block_vectors(source: ColumnSource, weight: torch.Tensor, override: Optional[torch.Tensor], start: int,
                   stop: int, dtype: torch.dtype, workspace: Workspace) -> torch.Tensor:
    """Column vectors ``[start, stop)``: a view of the weight rows when they are the columns as they
    are, else gathered / widened into a workspace buffer with the overriding rows written over them
    (no host sync: overrides outside the block land in spare rows past its end)."""
    overrides = source.override is not None and not source.override_in_weight
    if source.index is None and weight.dtype == dtype and not overrides:
        return weight[start:stop]
    width, dim = stop - start, weight.shape[1]
    spare = int(source.override.shape[0]) if overrides else 0
    out = workspace.get("columns", (width + spare) * dim, dtype, weight.device).view(width + spare, dim)
    rows = source.rows(start, stop)
    if isinstance(rows, slice):
        out[:width].copy_(weight[rows])
    elif weight.dtype == dtype:
        torch.index_select(weight, 0, rows, out=out[:width])
    else:
        out[:width].copy_(weight.index_select(0, rows))
    if overrides:
        columns = source._override_columns
        inside = (columns >= start) & (columns < stop)
        local = torch.where(inside, columns - start, width + torch.arange(spare, device=columns.device))
        out.index_copy_(0, local, override.to(dtype))
    return out[:width]


def _autocast_dtype(autocast: Callable[[], ContextManager], device: torch.device,
                    dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype that ``autocast()`` gives matrix products on ``device``, or ``None`` when it is ``dtype``."""
    with autocast():
        if not torch.is_autocast_enabled(device.type):
            return None
        low = torch.get_autocast_dtype(device.type)
    return None if low == dtype else low


class _FusedStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, normed, weight, override, source, form, margin_loss, target, block, workspace, autocast):  # type: ignore[override]
        rows, dim = normed.shape
        dtype, device = normed.dtype, normed.device
        scale = float(form.scale)
        need_x = ctx.needs_input_grad[0]
        x = normed.detach().contiguous()
        low = _autocast_dtype(autocast, device, dtype)  # the dtype of the two matrix products, if not dtype
        if low == torch.float16:
            block = min(block, LOW_PRECISION_PRODUCT_COLUMNS)
        width_max = min(block, source.num_columns)
        if low is not None:
            x_low = x.to(low)
            raw_low_buf = workspace.get("logits_low", rows * width_max, low, device)
            if need_x:
                exp_low_buf = workspace.get("exp_low", rows * width_max, low, device)
                product_low = workspace.get("product_low", rows * dim, low, device).view(rows, dim)
        weight = weight.detach()
        override_values = override.detach() if override is not None else None
        row_max = torch.full((rows,), float("-inf"), dtype=dtype, device=device)  # of the non-target logits
        sum_exp = torch.zeros(rows, dtype=dtype, device=device)
        raw_target = torch.zeros(rows, dtype=dtype, device=device)
        weighted = torch.zeros(rows, dim, dtype=dtype, device=device) if need_x else None
        raw_buf = workspace.get("logits", rows * width_max, dtype, device)
        clamped_buf = workspace.get("clamped", rows * width_max, dtype, device)
        minus_inf = torch.full((rows, 1), float("-inf"), dtype=dtype, device=device)
        for start, stop in source.split(block):
            width = stop - start
            w = _block_vectors(source, weight, override_values, start, stop, low or dtype, workspace)
            raw = raw_buf[: rows * width].view(rows, width)
            logits = clamped_buf[: rows * width].view(rows, width)
            if low is None:
                torch.mm(x, w.t(), out=raw)
            else:
                raw.copy_(torch.mm(x_low, w.t(), out=raw_low_buf[: rows * width].view(rows, width)))
            inside = ((target >= start) & (target < stop)).unsqueeze(1)
            column = (target - start).clamp(0, width - 1).unsqueeze(1)
            raw_target = torch.where(inside.squeeze(1), raw.gather(1, column).squeeze(1), raw_target)
            torch.clamp(raw, -1.0, 1.0, out=logits)
            if need_x:  # 1 where the cosine was within [-1, 1] (the clamp passes the gradient), else 0
                raw.sub_(logits).eq_(0.0)
            # the target entries take no part here (exp(-inf) = 0): handled per row after the loop
            logits.scatter_(1, column, torch.where(inside, minus_inf, logits.gather(1, column)))
            new_max = torch.maximum(row_max, logits.amax(dim=1) * scale)
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            rescale = (row_max - shift).exp()
            torch.add(shift.neg().unsqueeze(1), logits, alpha=scale, out=logits).exp_()  # exp(s * cos - shift)
            sum_exp = torch.addcmul(logits.sum(dim=1), sum_exp, rescale)
            if need_x and low is None:
                weighted.mul_(rescale.unsqueeze(1)).addmm_(logits.mul_(raw), w)
            elif need_x:
                exp_low = exp_low_buf[: rows * width].view(rows, width).copy_(logits.mul_(raw))
                weighted.mul_(rescale.unsqueeze(1)).add_(torch.mm(exp_low, w, out=product_low))
            row_max = new_max
        has_target = target >= 0
        with torch.enable_grad():  # the margin's target function on (B,) vectors: values and slopes
            leaf = raw_target.detach().requires_grad_(need_x)
            value = form.targets(leaf.clamp(-1.0, 1.0), target)
            slope = None
            if need_x and value.requires_grad:
                (slope,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
        value = value.detach()
        final_max = torch.where(has_target, torch.maximum(row_max, value), row_max)
        rescale = (row_max - final_max).exp()
        zero = torch.zeros_like(value)
        target_exp = torch.where(has_target, (value - final_max).exp(), zero)
        sum_exp = sum_exp * rescale + target_exp
        target_logit = torch.where(has_target, value, zero)
        target_grad = torch.empty(0)
        if need_x:
            weighted.mul_((rescale * scale).unsqueeze(1))
            if slope is None:
                target_grad = torch.zeros_like(x)
            else:
                w_target = source.column_vectors(weight, override_values, target.clamp_min(0), dtype)
                target_grad = torch.where(has_target.unsqueeze(1), slope.unsqueeze(1) * w_target, torch.zeros_like(x))
        # the target's upstream gradient g_s exp(t - m) + g_t is formed per row in the backward (as
        # softmax - onehot: the cancellation happens in one number, not in (B, D) products)
        ctx.save_for_backward(normed, override if override is not None else torch.empty(0), target, final_max,
                              weighted if need_x else torch.empty(0), target_grad, target_exp)
        ctx.has_override = override is not None
        ctx.source, ctx.margin_loss, ctx.autocast = source, margin_loss, autocast
        ctx.mark_non_differentiable(final_max)
        return final_max, sum_exp, target_logit

    @staticmethod
    def backward(ctx, _grad_max, grad_sum_exp, grad_target):  # type: ignore[override]
        normed, override, target, row_max, weighted, target_grad, target_exp = ctx.saved_tensors
        need_normed, _, need_override = ctx.needs_input_grad[:3]
        grad_sum_exp, grad_target = upstream_or_zeros(row_max, grad_sum_exp, grad_target)
        grad_normed = grad_override = None
        if need_normed:
            target_upstream = torch.addcmul(grad_target, grad_sum_exp, target_exp)
            grad_normed = torch.addcmul(target_upstream.unsqueeze(1) * target_grad, grad_sum_exp.unsqueeze(1), weighted)
        if need_override and ctx.has_override:
            grad_override = _override_gradient(ctx, normed, override, target, row_max, grad_sum_exp, grad_target)
        return grad_normed, None, grad_override, None, None, None, None, None, None, None


def fused_softmax_statistics(
    normed: torch.Tensor,
    source: ColumnSource,
    form: TargetForm,
    margin_loss: MarginLoss,
    target: torch.Tensor,
    block: int,
    workspace: Optional[Workspace] = None,
    autocast: Optional[Callable[[], ContextManager]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(max, sum_exp, target_logit)`` of ``margin_loss(clamp(normed @ W.T, -1, 1), target)``.

    ``form``: the margin's :class:`~protomem_plugin.losses.TargetForm` (see :func:`fused_form`);
    ``margin_loss``: the same margin as a callable (used for the gradient of the overriding rows);
    ``block``: columns per block; ``workspace``: scratch buffers to reuse (a fresh one if ``None``);
    ``autocast``: a context factory (the head's ``fp16`` setting): the matrix products run in its
    dtype when it enables autocast on ``normed``'s device. Gradients flow into ``normed`` and
    ``source.override``.
    """
    if int(block) <= 0:
        raise ValueError(f"block must be positive, got {block}")
    return _FusedStatistics.apply(normed, source.weight, source.override, source, form, margin_loss, target,
                                  int(block), workspace if workspace is not None else Workspace(),
                                  autocast or nullcontext)
