"""Distributed machinery shared by every head: gathering with gradient, sharded softmax
cross-entropy and shard arithmetic.

Every function works without an initialised process group (world size 1) and with gloo or NCCL.
Gradient convention (the one of Partial FC v2): every rank computes the same global-mean loss; the
backward of :func:`all_gather_with_grad` sums the ranks' gradients of the gathered tensor and
multiplies the local slice by ``world_size``, so that DDP's averaging of backbone gradients over
ranks yields exactly the gradient of the global-mean loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional["dist.ProcessGroup"]


def is_distributed(group: ProcessGroup = None) -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world_size(group: ProcessGroup = None) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


# ----------------------------------------------------------------------------- shard arithmetic
def contiguous_shard(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, count)`` of rank's contiguous share of ``total`` items (arcface_torch's Partial FC split)."""
    base, extra = divmod(int(total), int(world_size))
    count = base + int(rank < extra)
    start = base * rank + min(rank, extra)
    return start, count


def owner_shard(labels: torch.Tensor, world_size: int) -> torch.Tensor:
    """Owner shard of each class: ``label mod world_size`` (the memory heads' split)."""
    return torch.remainder(labels, world_size)


# ----------------------------------------------------------------------------- gathering
def all_gather_no_grad(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0 (rank order), without gradient."""
    if not is_distributed(group):
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank, ctx.world_size = rank_and_world_size(group)
        ctx.local_size = tensor.shape[0]
        return all_gather_no_grad(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.local_size
        local = grad[start : start + ctx.local_size] * ctx.world_size
        return local, None


def all_gather_with_grad(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Differentiable all-gather along dim 0 (see the module docstring for the gradient scale)."""
    if not is_distributed(group):
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


class _AllReduceSumSameLoss(torch.autograd.Function):
    """Sum over ranks; identity backward, valid because every rank back-propagates the same loss."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def all_reduce_sum_same_loss(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Differentiable sum over ranks for quantities that feed a loss every rank computes identically."""
    if not is_distributed(group):
        return tensor
    return _AllReduceSumSameLoss.apply(tensor, group)


def all_reduce_max_no_grad(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Element-wise maximum over ranks, without gradient."""
    if not is_distributed(group):
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def all_reduce_sum_no_grad(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Element-wise sum over ranks, without gradient."""
    if not is_distributed(group):
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


# ----------------------------------------------------------------------------- softmax cross-entropy
# One distributed softmax serves every head and both logit paths. A shard summarises its columns by
# three per-row statistics: its maximum logit ``m`` (no gradient), ``s = sum_j exp(l_j - m)`` and the
# target logit ``t`` (0 on rows whose target lives on another shard). The plain path computes them
# from a materialised logit matrix (:func:`softmax_statistics`); the chunked path of
# ``heads/chunked.py`` computes the same three values chunk by chunk. :func:`cross_entropy_from_statistics`
# combines the shards: global max by all-reduce, sums rescaled to it and all-reduced with an identity
# backward (every rank computes the same loss).
def softmax_statistics(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(max, sum of exp(logit - max), target logit)`` of this shard's ``(B, C_local)`` logits.

    ``target``: ``(B,)`` target column on this shard or ``-1``. With ``C_local == 0`` the maximum is
    ``-inf`` and the sums are 0. The maximum carries no gradient, the other two do.
    """
    rows = logits.shape[0]
    if logits.shape[1] == 0:
        row_max = torch.full((rows,), float("-inf"), dtype=logits.dtype, device=logits.device)
        zeros = logits.sum(dim=1)  # zeros that keep the graph
        return row_max, zeros, zeros
    with torch.no_grad():
        row_max = logits.amax(dim=1)
    sum_exp = (logits - row_max.unsqueeze(1)).exp_().sum(dim=1)  # in place: one (B, C) buffer less
    has_target = target >= 0
    target_logit = logits.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)
    target_logit = torch.where(has_target, target_logit, torch.zeros_like(target_logit))
    return row_max, sum_exp, target_logit


def cross_entropy_from_statistics(
    row_max: torch.Tensor, sum_exp: torch.Tensor, target_logit: torch.Tensor, group: ProcessGroup = None,
    check_columns: bool = True,
) -> torch.Tensor:
    """Mean softmax cross-entropy from every shard's per-row statistics (see :func:`softmax_statistics`).

    Each row's target must be on exactly one shard. Every rank returns the same loss.
    ``check_columns`` raises when a row has no column on any shard (a host-device sync); the heads,
    whose targets always have a column, turn it off.
    """
    row_max = row_max.detach()
    global_max = all_reduce_max_no_grad(row_max, group)
    if check_columns and not bool(torch.isfinite(global_max).all()):
        raise ValueError("softmax cross-entropy over no columns: some rows have no logit on any shard")
    scale = (row_max - global_max).exp()  # 0 on a shard without columns (max -inf)
    reduced = all_reduce_sum_same_loss(torch.stack([sum_exp * scale, target_logit]), group)
    return (reduced[0].log() + global_max - reduced[1]).mean()


def sharded_softmax_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup = None
) -> torch.Tensor:
    """Mean softmax cross-entropy over rows whose columns are split across ranks.

    ``logits``: ``(B, C_local)`` this shard's columns (any ``C_local >= 0``); ``target``: ``(B,)`` the
    target column on this shard or ``-1``. Each row's target must be on exactly one shard. The global
    maximum and the sum of exponentials are all-reduced; every rank returns the same loss.
    """
    return cross_entropy_from_statistics(*softmax_statistics(logits, target), group)
