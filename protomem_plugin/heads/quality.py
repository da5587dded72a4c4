"""Quality-Aware Prototype Memory (Smirnov et al., arXiv 2311.07734).

Prototypes are quality-weighted means ``p = normalize(sum_j q_j e_j)`` (the division by
``sum_j q_j`` of the paper cancels in the normalisation). Quality sources:

* ``norm``: ``q_j = (|x_j| / max_{k in group} |x_k|) ** norm_power``.
* ``recognizability_soft``: ``q_j = sigmoid((ui_threshold - cos(e_j, u)) / recognizability_temperature)``
  where ``u`` is the "unrecognizable identity" prototype: images close to it get low weight.
* ``recognizability_hard``: ``q_j = 1[cos(e_j, u) < ui_threshold]`` (the zero-temperature limit).
* ``external``: ``q_j = quality_j ** external_power`` from ``forward(..., quality=...)``.

The unrecognizable-identity prototype ``u`` is formed from the ``ui_fraction`` lowest-norm
embeddings of each global batch (a small feature norm marks a hard-to-recognise image): the
normalised mean of their unit embeddings is blended in as
``u <- normalize(ui_momentum * u + (1 - ui_momentum) * batch_u)``, before the weights of the step
are computed; the first batch sets ``u`` directly. Every rank sees the same gathered batch, so ``u``
is identical on all ranks. Weights never carry gradient and are divided by the largest weight of their class (so equal
weights are exactly 1 and QAPM reproduces PM bit for bit); a class whose weights all vanish falls
back to equal weights.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .. import distributed as D
from .base import MarginLoss
from .prototype_memory import PrototypeMemory

QUALITY_SOURCES = ("norm", "recognizability_soft", "recognizability_hard", "external")


class QualityAwarePrototypeMemory(PrototypeMemory):
    """Prototype Memory with quality-weighted prototype generation."""

    options = {
        **PrototypeMemory.options,
        "quality_source": (str, "norm", f"one of {QUALITY_SOURCES}"),
        "norm_power": (float, 1.0, "power applied to the relative feature norm (source 'norm')"),
        "recognizability_temperature": (float, 0.1, "temperature of the soft recognizability weight"),
        "ui_threshold": (float, 0.3, "cosine to the unrecognizable-identity prototype where weights drop"),
        "ui_fraction": (float, 0.1, "share of lowest-norm batch embeddings that update that prototype"),
        "ui_momentum": (float, 0.99, "momentum of the unrecognizable-identity prototype"),
        "external_power": (float, 1.0, "power applied to externally given quality (source 'external')"),
    }
    stat_names = PrototypeMemory.stat_names + (
        "quality_mean", "quality_std", "quality_min", "fallback_classes", "ui_cosine_mean",
    )
    stat_reductions = PrototypeMemory.stat_reductions + ("same", "same", "same", "same", "same")

    def __init__(
        self,
        margin_loss: MarginLoss,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        fp16: bool = False,
        memory_size: Optional[int] = None,
        prototype_grad: bool = True,
        memory_dtype: str = "float32",
        logits_chunk: int = 0,
        quality_source: str = "norm",
        norm_power: float = 1.0,
        recognizability_temperature: float = 0.1,
        ui_threshold: float = 0.3,
        ui_fraction: float = 0.1,
        ui_momentum: float = 0.99,
        external_power: float = 1.0,
        process_group: D.ProcessGroup = None,
    ) -> None:
        super().__init__(margin_loss, embedding_size, num_classes, sample_rate, fp16, memory_size, prototype_grad,
                         memory_dtype=memory_dtype, logits_chunk=logits_chunk, process_group=process_group)
        if quality_source not in QUALITY_SOURCES:
            raise ValueError(f"quality_source must be one of {QUALITY_SOURCES}, got {quality_source!r}")
        if recognizability_temperature <= 0:
            raise ValueError(f"recognizability_temperature must be > 0, got {recognizability_temperature}")
        if not 0.0 < ui_fraction <= 1.0:
            raise ValueError(f"ui_fraction must be in (0, 1], got {ui_fraction}")
        if not 0.0 <= ui_momentum < 1.0:
            raise ValueError(f"ui_momentum must be in [0, 1), got {ui_momentum}")
        self.quality_source = quality_source
        self.norm_power = float(norm_power)
        self.recognizability_temperature = float(recognizability_temperature)
        self.ui_threshold = float(ui_threshold)
        self.ui_fraction = float(ui_fraction)
        self.ui_momentum = float(ui_momentum)
        self.external_power = float(external_power)
        self.register_buffer("ui_prototype", torch.zeros(self.embedding_size))
        self.register_buffer("ui_updates", torch.zeros((), dtype=torch.int64))
        self._quality_stats: list[torch.Tensor] = []
        self._pending_ui: Optional[torch.Tensor] = None

    def merge_shard_states(self, states: list[dict]) -> dict:
        state = super().merge_shard_states(states)
        state["ui_prototype"] = states[0]["ui_prototype"].clone()  # identical on every rank
        state["ui_updates"] = states[0]["ui_updates"].clone()
        return state

    # ------------------------------------------------------------------ extras
    def gather_extras(self, local_embeddings: torch.Tensor, extras: dict[str, Any]) -> dict[str, Any]:
        if self.quality_source != "external":
            return {}
        quality = extras.get("quality")
        if quality is None:
            raise ValueError("quality_source='external' needs forward(..., quality=<tensor of shape (batch,)>)")
        quality = torch.as_tensor(quality, device=local_embeddings.device)
        if quality.dim() == 2 and quality.shape[1] == 1:
            quality = quality[:, 0]
        if quality.shape != (local_embeddings.shape[0],):
            raise ValueError(f"quality must have shape ({local_embeddings.shape[0]},), got {tuple(quality.shape)}")
        quality = quality.detach().to(torch.float64 if local_embeddings.dtype == torch.float64 else torch.float32)
        return {"quality": D.all_gather_no_grad(quality, self.process_group)}

    def extras_flags(self, extras: dict[str, Any]) -> list[torch.Tensor]:
        if "quality" not in extras:
            return []
        quality = extras["quality"]
        return [(~torch.isfinite(quality) | (quality < 0)).any()]

    def raise_extras_errors(self, flags: list) -> None:
        if flags and flags[0]:
            raise ValueError("quality must be finite and non-negative")

    def commit_step_state(self) -> None:
        """Write the unrecognizable-identity prototype of this step (after the step's checks passed)."""
        if self._pending_ui is not None:
            self.ui_prototype.copy_(self._pending_ui)
            self.ui_updates += 1
            self._pending_ui = None

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def next_ui_prototype(self, embeddings: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """The UI prototype after this batch: the normalised mean of its lowest-norm embeddings blended in
        (the first batch sets it). Computed without a host sync; written by :meth:`commit_step_state`."""
        count = max(1, int(round(self.ui_fraction * embeddings.shape[0])))
        lowest = torch.topk(embeddings.norm(dim=1), count, largest=False).indices
        batch_u = F.normalize(normed[lowest].mean(dim=0), dim=0).to(self.ui_prototype.dtype)
        blended = self.ui_momentum * self.ui_prototype + (1.0 - self.ui_momentum) * batch_u
        return torch.where(self.ui_updates == 0, batch_u, F.normalize(blended, dim=0))

    @torch.no_grad()
    def raw_quality(self, embeddings: torch.Tensor, normed: torch.Tensor, group_index: torch.Tensor,
                    num_groups: int, extras: dict[str, Any]) -> torch.Tensor:
        """Quality of each sample before the fallback, from the configured source."""
        if self.quality_source == "norm":
            norms = embeddings.detach().norm(dim=1)
            group_max = torch.zeros(num_groups, dtype=norms.dtype, device=norms.device)
            group_max = group_max.scatter_reduce(0, group_index, norms, reduce="amax", include_self=False)
            return (norms / group_max[group_index].clamp_min(torch.finfo(norms.dtype).tiny)) ** self.norm_power
        if self.quality_source == "external":
            return extras["quality"] ** self.external_power
        self._pending_ui = self.next_ui_prototype(embeddings.detach(), normed.detach())
        ui_cos = normed.detach() @ self._pending_ui.to(normed.dtype)
        if self.quality_source == "recognizability_soft":
            return torch.sigmoid((self.ui_threshold - ui_cos) / self.recognizability_temperature)
        return (ui_cos < self.ui_threshold).to(normed.dtype)

    @torch.no_grad()
    def sample_weights(self, embeddings: torch.Tensor, normed: torch.Tensor, group_index: torch.Tensor,
                       num_groups: int, extras: dict[str, Any]) -> torch.Tensor:
        quality = self.raw_quality(embeddings, normed, group_index, num_groups, extras).to(normed.dtype)
        # scaled by the class's largest weight (the prototype is scale-free): equal weights become exactly 1
        group_max = torch.zeros(num_groups, dtype=quality.dtype, device=quality.device)
        group_max = group_max.scatter_reduce(0, group_index, quality, reduce="amax", include_self=False)
        vanished = group_max <= torch.finfo(quality.dtype).eps
        safe_max = torch.where(vanished, torch.ones_like(group_max), group_max)
        weights = torch.where(vanished[group_index], torch.ones_like(quality), quality / safe_max[group_index])
        ui = self._pending_ui if self._pending_ui is not None else self.ui_prototype
        ui_cos = normed.detach() @ ui.to(normed.dtype)  # 0 while the UI prototype is still unset (zeros)
        present = torch.zeros_like(vanished).index_fill_(0, group_index, True)  # groups past the batch's are padding
        self._quality_stats = [weights.mean(), weights.std(unbiased=False), weights.min(), (vanished & present).sum(),
                               ui_cos.mean()]
        return weights

    def record_stats(self, values: list, device: torch.device) -> None:
        super().record_stats(list(values) + self._quality_stats, device)

    def finish_diagnostics(self, raw: dict[str, float]) -> dict[str, float]:
        out = super().finish_diagnostics(raw)
        for name in ("quality_mean", "quality_std", "quality_min", "fallback_classes", "ui_cosine_mean"):
            out[name] = raw[name]
        return out
