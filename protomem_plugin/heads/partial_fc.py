"""Partial FC: class centres sharded across ranks, positives plus sampled negatives.

The baseline head and the registry default. State and shapes follow arcface_torch's
``PartialFC_V2`` (parameter ``weight`` of shape ``(num_local, embedding_size)``, contiguous class
split), so its ``state_dict_softmax_fc`` checkpoints load here. The embeddings are gathered, so a
margin that declares ``needs_norms`` (AdaFace) gets the norms of the global batch on every rank.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as D
from .base import Head, MarginLoss
from .chunked import ColumnSource


class PartialFC(Head):
    """Sampled margin softmax over class centres; ``sample_rate`` of each shard's centres per step."""

    options = {
        **Head.options,
        "sampler_seed": (int, 0, "seed of the negative-class sampler (offset by the rank)"),
    }
    stat_names = ("classes_sampled", "positive_classes", "num_classes", "centre_age_sum", "centre_age_max",
                  "positive_age_sum")
    stat_reductions = ("sum", "sum", "same", "sum", "max", "sum")
    init_block = 65536  # classes per block of the world-size independent initialisation

    def __init__(
        self,
        margin_loss: MarginLoss,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        fp16: bool = False,
        sampler_seed: int = 0,
        logits_chunk: int = 0,
        process_group: D.ProcessGroup = None,
    ) -> None:
        super().__init__(margin_loss, embedding_size, num_classes, sample_rate, fp16,
                         process_group=process_group, logits_chunk=logits_chunk)
        self.class_start, self.num_local = D.contiguous_shard(num_classes, self.rank, self.world_size)
        self.num_sample = int(self.sample_rate * self.num_local)
        self.weight = nn.Parameter(self.initial_centres())
        # obsolescence: the step at which each centre last took part in a step (got a gradient)
        self.register_buffer("last_update_step", torch.zeros(self.num_local, dtype=torch.int64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.sampler_seed = int(sampler_seed) + self.rank
        self._sampler_draws = 0  # negative samplings drawn so far (host counter, checkpointed)

    def initial_centres(self) -> torch.Tensor:
        """N(0, 0.01) centres of this shard, the same values whatever the number of ranks.

        One base seed is drawn from the global generator (seeded alike on every rank); class
        block ``b`` of :attr:`init_block` classes is drawn from a generator seeded ``base + b``.
        """
        if torch.empty(0).is_meta:  # built under torch.device("meta"): shapes only
            return torch.empty(self.num_local, self.embedding_size)
        base = int(torch.randint(0, 2**62, (1,)))
        end = self.class_start + self.num_local
        rows = []
        for block in range(self.class_start // self.init_block, -(-end // self.init_block)):
            first = block * self.init_block
            size = min(self.init_block, self.num_classes - first)
            values = torch.randn(size, self.embedding_size, generator=torch.Generator().manual_seed(base + block)) * 0.01
            rows.append(values[max(self.class_start - first, 0) : min(end - first, size)])
        return torch.cat(rows) if rows else torch.empty(0, self.embedding_size)

    # ------------------------------------------------------------------ sampling RNG (resumable)
    def _draw_generator(self) -> torch.Generator:
        """The generator of this step's negative sampling: seeded from ``(sampler_seed, draws so far)``.

        The checkpointed state is those two integers, not a generator state, so it loads on any
        device type (a CUDA generator's state does not fit a CPU generator) and number of GPUs.
        """
        generator = torch.Generator(device=self.weight.device)
        generator.manual_seed((self.sampler_seed * 1_000_003 + self._sampler_draws) % 2**63)
        self._sampler_draws += 1
        return generator

    def get_extra_state(self) -> Any:
        return {"sampler_seed": self.sampler_seed, "sampler_draws": self._sampler_draws}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and "sampler_draws" in state:
            self._sampler_draws = int(state["sampler_draws"])
        # an older checkpoint holds a raw generator state ("sampler_rng"), which is device-specific:
        # the draws then continue from the head's step count (set in _load_from_state_dict)
        else:
            self._sampler_draws = -1

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for name in ("_extra_state", "last_update_step", "step"):
            if prefix + name in missing_keys:  # arcface_torch's PartialFC_V2 checkpoints hold only `weight`
                missing_keys.remove(prefix + name)
        if self._sampler_draws < 0:
            self._sampler_draws = int(self.step)

    # ------------------------------------------------------------------ resharding
    def shard_rows(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """This rank's rows of per-class tensors split over old ranks (``parts`` in rank order).

        Only the overlapping rows of each part are read (cheap on memory-mapped checkpoints); the
        parts are never concatenated whole.
        """
        total = sum(int(p.shape[0]) for p in parts)
        if total != self.num_classes:
            raise ValueError(f"checkpoint shards hold {total} class rows, the head expects {self.num_classes}")
        start, stop, offset, rows = self.class_start, self.class_start + self.num_local, 0, []
        for part in parts:
            lo, hi = max(start, offset), min(stop, offset + int(part.shape[0]))
            if lo < hi:
                rows.append(part[lo - offset : hi - offset])
            offset += int(part.shape[0])
        return torch.cat(rows) if rows else parts[0][:0].clone()

    def merge_shard_states(self, states: list[dict]) -> dict:
        """This rank's state from the head states of a run on ``len(states)`` ranks (rank order)."""
        state = {"weight": self.shard_rows([s["weight"] for s in states])}
        if all("last_update_step" in s for s in states):
            state["last_update_step"] = self.shard_rows([s["last_update_step"] for s in states])
            state["step"] = states[0]["step"].clone()
        state.update(self.replicated_state(states))
        return state

    # ------------------------------------------------------------------ forward
    def sample(self, local_targets: torch.Tensor, num_positive: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the centres used this step (all positives first choice) and remapped targets.

        ``num_positive``: the number of distinct targets when the caller already knows it (else read here).
        """
        has_target = local_targets >= 0
        if num_positive is None:
            num_positive = int((self.mark_positives(torch.zeros(self.num_local, device=local_targets.device),
                                                    local_targets, 1.0) > 0).sum())
        if self.num_sample >= self.num_local:
            return torch.arange(self.num_local, device=local_targets.device), local_targets
        score = torch.rand(self.num_local, generator=self._draw_generator(), device=self.weight.device)
        score = self.mark_positives(score, local_targets, 2.0)
        index = torch.topk(score, k=max(self.num_sample, num_positive)).indices.sort().values
        remapped = torch.searchsorted(index, local_targets.clamp_min(0))
        return index, torch.where(has_target, remapped, torch.full_like(remapped, -1))

    @staticmethod
    def mark_positives(values: torch.Tensor, targets: torch.Tensor, mark: float) -> torch.Tensor:
        """``values`` with the entries of the targets (``>= 0``) raised to ``mark`` (no host sync)."""
        raised = torch.where(targets >= 0, torch.full_like(targets, mark, dtype=values.dtype),
                             torch.full_like(targets, float("-inf"), dtype=values.dtype))
        return values.scatter_reduce(0, targets.clamp_min(0), raised, reduce="amax")

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor, **extras: Any) -> torch.Tensor:
        local_embeddings, local_labels = self.check_local_inputs(local_embeddings, local_labels)
        embeddings, labels = self.gather(local_embeddings, local_labels)
        in_shard = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        local_targets = torch.where(in_shard, labels - self.class_start, torch.full_like(labels, -1))
        with torch.no_grad():
            positive = self.mark_positives(torch.zeros(self.num_local, device=labels.device), local_targets, 1.0) > 0
        # the input checks and the number of positive classes: one read of the device per step
        flags = torch.stack([*self.global_input_flags(embeddings, labels), positive.sum()]).tolist()
        self.raise_input_errors(embeddings, labels, flags[:2])
        num_positive = int(flags[2])
        with torch.no_grad():
            index, targets = self.sample(local_targets, num_positive)
        every = index.numel() == self.num_local

        def plain_cosines() -> torch.Tensor:
            weight = self.weight if every else self.weight[index]
            with self.autocast(embeddings.device):
                logits = F.linear(F.normalize(embeddings), F.normalize(weight))
            return logits.to(embeddings.dtype if embeddings.dtype == torch.float64 else torch.float32).clamp(-1, 1)

        source = ColumnSource(self.weight, index=None if every else index, normalize=True)
        normed = F.normalize(embeddings) if self.logits_chunk else embeddings
        loss = self.margin_cross_entropy(normed, source, targets, plain_cosines, norms=self.margin_norms(embeddings))
        with torch.no_grad():
            ages = self.step - self.last_update_step[index]
            positive_age_sum = torch.where(positive[index], ages, torch.zeros_like(ages)).sum()
            self.last_update_step[index] = self.step
            self.step += 1
        self.record_stats([index.numel(), num_positive, self.num_classes, ages.sum(),
                           ages.max() if ages.numel() else 0, positive_age_sum], embeddings.device)
        return loss

    def finish_diagnostics(self, raw: dict[str, float]) -> dict[str, float]:
        return {
            "classes_sampled": raw["classes_sampled"],
            "positive_classes": raw["positive_classes"],
            "centre_age_mean": raw["centre_age_sum"] / max(raw["classes_sampled"], 1.0),
            "centre_age_max": raw["centre_age_max"],
            "positive_age_mean": raw["positive_age_sum"] / max(raw["positive_classes"], 1.0),
        }
