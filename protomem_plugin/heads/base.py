"""What every head shares: the arcface_torch constructor, input checks, gathering, diagnostics."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch
from torch import nn

from .. import distributed as D
from ..losses import bind_norms, embedding_norms, needs_norms
from .chunked import ColumnSource, chunked_softmax_statistics
from .fused import Workspace, default_block, fused_form, fused_softmax_statistics

MarginLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteEmbeddingError(ValueError):
    """Raised when a batch carries NaN or Inf embeddings; nothing has been written by then."""


class Head(nn.Module):
    """Base class of the classification heads.

    Constructor ``(margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False, **options)``
    and ``forward(local_embeddings, local_labels, **extras) -> scalar loss`` as arcface_torch's
    ``PartialFC_V2``. ``options`` (a class attribute) declares the head's own config keys as
    ``{name: (type, default, description)}``; the registry validates them.
    ``needs_identity_groups`` tells loaders (and the arcface_torch hook) that the head learns only
    from batches made of groups of several images per identity.

    ``margin_loss`` is called as arcface_torch calls it, ``margin_loss(logits, labels)``; a margin
    with ``needs_norms = True`` also gets ``norms=``, the norms of the raw embeddings of the logit
    rows (the gathered global batch), bound once per forward by :func:`protomem_plugin.losses.bind_norms`
    (see :meth:`margin_norms`, :meth:`margin_cross_entropy`).
    """

    needs_identity_groups: bool = False
    options: dict[str, tuple[type, object, str]] = {
        "logits_chunk": (int, 0, "columns per chunk of the chunked margin softmax (O(B x chunk) memory); 0 = off"),
    }

    def __init__(
        self,
        margin_loss: MarginLoss,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        fp16: bool = False,
        process_group: D.ProcessGroup = None,
        logits_chunk: int = 0,
    ) -> None:
        super().__init__()
        if not callable(margin_loss):
            raise ValueError("margin_loss must be callable as margin_loss(logits, labels)")
        if int(embedding_size) <= 0:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        if int(num_classes) <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 <= float(sample_rate) <= 1.0:  # 0: positives only (arcface_torch's wf42m_pfc0008 job)
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        if isinstance(logits_chunk, bool) or int(logits_chunk) < 0:
            raise ValueError(f"logits_chunk must be a non-negative integer (0 = off), got {logits_chunk!r}")
        self.margin_loss = margin_loss
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.fp16 = bool(fp16)
        self.process_group = process_group
        self.logits_chunk = int(logits_chunk)
        self.rank, self.world_size = D.rank_and_world_size(process_group)
        self._last_stats: Optional[torch.Tensor] = None
        self.workspace = Workspace()  # scratch memory of the fused margin softmax, reused across steps

    # ------------------------------------------------------------------ inputs
    def check_local_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate shapes and dtypes of this rank's inputs; return ``(embeddings, labels as int64 (B,))``."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"local_embeddings must be a 2-D tensor (batch, {self.embedding_size}), got shape {shape}")
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"local_embeddings have embedding size {embeddings.shape[1]}, the head expects {self.embedding_size}"
            )
        if not embeddings.is_floating_point():
            raise ValueError(f"local_embeddings must be floating point, got {embeddings.dtype}")
        labels = torch.as_tensor(labels)
        if labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"local_labels must hold one label per embedding: {embeddings.shape[0]} embeddings, "
                f"labels of shape {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"local_labels must be integers, got {labels.dtype}")
        # labels may come from the host while the embeddings are on a GPU (gathering and indexing need one device)
        return embeddings, labels.to(embeddings.device, torch.int64, non_blocking=True)

    def check_global_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Checks on the gathered batch (identical on every rank, so every rank raises alike)."""
        self.raise_input_errors(embeddings, labels, torch.stack(self.global_input_flags(embeddings, labels)).tolist())

    def global_input_flags(self, embeddings: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        """Device flags ``[label out of range, non-finite embedding]`` of the gathered batch (no sync)."""
        bad_label = ((labels < 0) | (labels >= self.num_classes)).any()
        return [bad_label, torch.isfinite(embeddings.detach()).all().logical_not()]

    def raise_input_errors(self, embeddings: torch.Tensor, labels: torch.Tensor, flags: list) -> None:
        """Raise for the flags of :meth:`global_input_flags` once read on the host."""
        bad_label, non_finite = flags
        if bad_label:
            bad = (labels < 0) | (labels >= self.num_classes)
            raise ValueError(f"label {int(labels[bad][0])} is outside [0, num_classes={self.num_classes})")
        if non_finite:
            rows = torch.nonzero(~torch.isfinite(embeddings.detach()).all(dim=1)).squeeze(1)
            raise NonFiniteEmbeddingError(
                f"non-finite embeddings in global batch rows {rows[:8].tolist()}; the head state was not changed"
            )

    def gather(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All-gather embeddings (with gradient) and labels from every rank."""
        return (
            D.all_gather_with_grad(embeddings, self.process_group),
            D.all_gather_no_grad(labels, self.process_group),
        )

    def autocast(self, device: torch.device):
        """Low-precision context for the logit matmul when the head was built with ``fp16=True``."""
        if not self.fp16:
            return nullcontext()
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=device.type, dtype=dtype)

    # ------------------------------------------------------------------ loss
    def margin_norms(self, embeddings: torch.Tensor) -> Optional[torch.Tensor]:
        """Detached norms of the raw ``embeddings`` (the logit rows) if the margin wants them, else ``None``."""
        return embedding_norms(embeddings) if needs_norms(self.margin_loss) else None

    def margin_cross_entropy(
        self, normed: torch.Tensor, source: ColumnSource, targets: torch.Tensor,
        plain_cosines: Callable[[], torch.Tensor], norms: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Margin loss then the distributed softmax cross-entropy over this shard's columns.

        A margin with a target form (:func:`protomem_plugin.losses.target_form`) over columns that
        need no gradient themselves runs fused in column blocks (:mod:`.fused`; blocks of at most
        ``logits_chunk`` columns when set). Otherwise, with ``logits_chunk > 0`` the columns described
        by ``source`` are walked in chunks (:mod:`.chunked`), and without it ``plain_cosines()``
        materialises the ``(B, C)`` cosines.
        ``norms``: :meth:`margin_norms` of the rows, for margins that declare ``needs_norms``; the
        margin's per-batch state (AdaFace's statistics) is updated here, once per call.
        """
        margin = bind_norms(self.margin_loss, norms)
        form = fused_form(margin, normed, source)
        if form is not None:
            block = default_block(normed.shape[0], normed.device)
            if self.logits_chunk > 0:
                block = min(block, self.logits_chunk)
            stats = fused_softmax_statistics(normed, source, form, margin, targets, block, self.workspace,
                                             lambda: self.autocast(normed.device))
        elif self.logits_chunk > 0:
            stats = chunked_softmax_statistics(
                normed, source, margin, targets, self.logits_chunk, lambda: self.autocast(normed.device)
            )
        else:
            stats = D.softmax_statistics(margin(plain_cosines(), targets), targets)
        return D.cross_entropy_from_statistics(*stats, self.process_group, check_columns=False)

    def replicated_state(self, states: list[dict]) -> dict:
        """Entries of the margin loss's state (e.g. AdaFace's statistics, the same on every rank)
        taken from the first of ``states`` (head states of an old run, rank order), for re-sharding."""
        own = {k for k in self.state_dict() if k.startswith("margin_loss.")}
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in states[0].items() if k in own}

    # ------------------------------------------------------------------ diagnostics
    stat_names: tuple[str, ...] = ()
    stat_reductions: tuple[str, ...] = ()

    def record_stats(self, values: list[torch.Tensor | float], device: torch.device) -> None:
        """Keep this step's raw statistics (device tensors stay on the device, reduced lazily by
        :meth:`diagnostics`; host numbers are never copied to the device here)."""
        self._last_stats = list(values)
        self._stats_device = device

    def diagnostics(self) -> dict[str, float]:
        """Per-step diagnostics of the last forward as floats, reduced over ranks.

        Collective in distributed runs: every rank must call it at the same step.
        """
        if self._last_stats is None:
            return {}
        stats = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(self._stats_device).detach().reshape(())
                             for v in self._last_stats])
        out: dict[str, float] = {}
        sums = D.all_reduce_sum_no_grad(stats, self.process_group)
        maxes = D.all_reduce_max_no_grad(stats, self.process_group)
        for i, (name, how) in enumerate(zip(self.stat_names, self.stat_reductions)):
            if how == "sum":
                out[name] = float(sums[i])
            elif how == "max":
                out[name] = float(maxes[i])
            elif how == "same":
                out[name] = float(stats[i])
        out = self.finish_diagnostics(out)
        margin_diagnostics = getattr(self.margin_loss, "diagnostics", None)
        if needs_norms(self.margin_loss) and callable(margin_diagnostics):  # e.g. AdaFace's running statistics
            out.update(margin_diagnostics())
        return out

    def finish_diagnostics(self, raw: dict[str, float]) -> dict[str, float]:
        """Turn reduced sums into the reported figures (means, fractions)."""
        return raw
