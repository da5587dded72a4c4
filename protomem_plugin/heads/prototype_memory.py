"""Prototype Memory (Smirnov et al., IEEE Access 2022): class prototypes generated from the batch.

Per step (DESIGN.md §2): gather the global batch; for every class c of the batch
``p_c = normalize(sum_i w_i e_i)`` over its images (``w_i = 1`` here, quality weights in QAPM);
each shard writes the prototypes of the classes it owns (``c mod world_size``) into its slots,
refreshing a stored class in place or evicting the oldest-written slot (empty slots first); the
logits are cosines against every occupied slot, the slots written this step carrying gradient into
their exemplars; then the margin loss and the sharded softmax cross-entropy. A margin that
declares ``needs_norms`` (AdaFace) gets the norms of the gathered global batch, the same on every
rank, so its batch statistics need no all-reduce.

State is a function of the memory size alone: prototypes, the class of each slot and its write
step. Finding a class among the slots is a sort plus a binary search over the shard's slots; no
step touches anything of size ``num_classes``.

``memory_dtype`` sets the storage of the prototypes: ``"float32"`` follows the module's floating
dtype (``.double()`` makes it float64); ``"float16"`` / ``"bfloat16"`` halve the memory and stay so
through ``.to(dtype)`` / ``.double()``. Cosines are always computed in float32 (float64 for float64
embeddings). A prototype that would not be finite in the storage dtype is never written.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .. import distributed as D
from .base import Head, MarginLoss
from .chunked import ColumnSource

_INT64_MAX = torch.iinfo(torch.int64).max
MEMORY_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NonFinitePrototypeError(ValueError):
    """Raised before a prototype that is not finite in the memory's storage dtype would be written."""


class _StoredCosines(torch.autograd.Function):
    """``normed @ stored[index].T`` (no gradient into ``stored``) in row blocks: a low-precision
    ``stored`` is widened, and ``index`` (all rows when ``None``) gathered, one block at a time."""

    BLOCK = 65536

    @staticmethod
    def _blocks(stored: torch.Tensor, index: Optional[torch.Tensor], dtype: torch.dtype):
        count = stored.shape[0] if index is None else index.numel()
        for start in range(0, count, _StoredCosines.BLOCK):
            stop = min(start + _StoredCosines.BLOCK, count)
            rows = stored[start:stop] if index is None else stored[index[start:stop]]
            yield start, stop, rows.to(dtype)

    @staticmethod
    def forward(ctx, normed: torch.Tensor, stored: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        count = stored.shape[0] if index is None else index.numel()
        out = torch.empty(normed.shape[0], count, dtype=normed.dtype, device=normed.device)
        for start, stop, block in _StoredCosines._blocks(stored, index, normed.dtype):
            torch.mm(normed, block.t(), out=out[:, start:stop])
        ctx.save_for_backward(stored, index if index is not None else torch.empty(0, dtype=torch.int64))
        ctx.has_index = index is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        stored, index = ctx.saved_tensors
        out = torch.zeros(grad.shape[0], stored.shape[1], dtype=grad.dtype, device=grad.device)
        for start, stop, block in _StoredCosines._blocks(stored, index if ctx.has_index else None, grad.dtype):
            out.addmm_(grad[:, start:stop], block)
        return out, None, None


def batch_classes(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.unique(labels, return_inverse=True)`` padded to ``len(labels)``, without a host sync.

    Returns the ascending classes (entries past the number of classes repeat the largest one),
    the class position of each label and a mask of the sorted labels that start a class
    (its sum is the number of classes).
    """
    sorted_labels, order = torch.sort(labels)
    first = torch.ones_like(sorted_labels, dtype=torch.bool)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    group_of_sorted = torch.cumsum(first.long(), 0) - 1
    group_index = torch.empty_like(group_of_sorted).scatter_(0, order, group_of_sorted)
    classes = sorted_labels.clone()
    classes.scatter_(0, group_of_sorted, sorted_labels)  # every label of a group writes the same value
    last = group_of_sorted[-1:]
    past = torch.arange(labels.numel(), device=labels.device) > last
    return torch.where(past, sorted_labels[-1:], classes), group_index, first


class PrototypeMemory(Head):
    """Prototype Memory head: a fixed-size, sharded memory of recent class prototypes."""

    needs_identity_groups = True  # a class seen once in a batch has a positive cosine of exactly 1
    options = {
        **Head.options,
        "memory_size": (int, None, "total prototype slots over all ranks; default sample_rate * num_classes"),
        "prototype_grad": (bool, True, "back-propagate through the batch prototypes into their exemplars"),
        "memory_dtype": (str, "float32", f"storage dtype of the prototypes, one of {tuple(MEMORY_DTYPES)}"),
    }
    stat_names = (
        "occupied_slots", "memory_slots", "batch_classes", "new_classes", "refreshed_classes",
        "evicted_classes", "age_sum", "age_max",
    )
    stat_reductions = ("sum", "sum", "sum", "sum", "sum", "sum", "sum", "max")

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
        process_group: D.ProcessGroup = None,
    ) -> None:
        super().__init__(margin_loss, embedding_size, num_classes, sample_rate, fp16,
                         process_group=process_group, logits_chunk=logits_chunk)
        if memory_dtype not in MEMORY_DTYPES:
            raise ValueError(f"memory_dtype must be one of {tuple(MEMORY_DTYPES)}, got {memory_dtype!r}")
        if memory_size is None:
            memory_size = max(1, int(round(self.sample_rate * self.num_classes)))
        if int(memory_size) < self.world_size:
            raise ValueError(f"memory_size={memory_size} must be at least the world size {self.world_size}")
        self.memory_size = int(memory_size)
        self.prototype_grad = bool(prototype_grad)
        self.memory_dtype = memory_dtype
        _, self.num_local_slots = D.contiguous_shard(self.memory_size, self.rank, self.world_size)
        slots = self.num_local_slots
        self.register_buffer("memory", torch.zeros(slots, self.embedding_size, dtype=MEMORY_DTYPES[memory_dtype]))
        self.register_buffer("slot_class", torch.full((slots,), -1, dtype=torch.int64))
        self.register_buffer("slot_step", torch.full((slots,), -1, dtype=torch.int64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    # ------------------------------------------------------------------ storage precision
    @property
    def low_precision_storage(self) -> bool:
        return self.memory_dtype != "float32"

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        storage = MEMORY_DTYPES[self.memory_dtype]
        if self.low_precision_storage and self.memory.dtype != storage:  # dtype casts keep the storage
            self.memory = self.memory.to(storage)
        return self

    def check_storable(self, classes: torch.Tensor, prototypes: torch.Tensor) -> None:
        """Raise :class:`NonFinitePrototypeError` if a prototype is not finite in the storage dtype."""
        bad = ~torch.isfinite(prototypes.detach().to(self.memory.dtype)).all(dim=1)
        if bool(bad.any()):
            raise NonFinitePrototypeError(
                f"prototypes of classes {classes[bad][:8].tolist()} are not finite in the memory's "
                f"{self.memory.dtype} storage; the memory was not changed"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "memory"
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and not all(  # in blocks: no temporary of the memory's size
                bool(torch.isfinite(block.to(self.memory.dtype)).all()) for block in value.split(_StoredCosines.BLOCK)):
            raise ValueError(f"state_dict key {key!r} holds values that are not finite in {self.memory.dtype}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ quality hook
    def sample_weights(
        self, embeddings: torch.Tensor, normed: torch.Tensor, group_index: torch.Tensor, num_groups: int,
        extras: dict[str, Any],
    ) -> Optional[torch.Tensor]:
        """Per-sample prototype weights (no gradient); ``None`` means equal weights."""
        return None

    # ------------------------------------------------------------------ memory update
    def lookup_slots(self, classes: torch.Tensor) -> torch.Tensor:
        """Slot of each class, ``-1`` where the class is not stored on this shard."""
        sorted_classes, order = torch.sort(self.slot_class)
        pos = torch.searchsorted(sorted_classes, classes).clamp_max(self.num_local_slots - 1)
        found = sorted_classes[pos] == classes
        return torch.where(found, order[pos], torch.full_like(classes, -1))

    @torch.no_grad()
    def write_prototypes(self, classes: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Store ``prototypes`` of ascending unique ``classes`` (this shard's); return their slots.

        A stored class is overwritten in place; new classes, in ascending class id, take the slots of
        smallest ``(write step, slot index)`` (empty slots first), the slots refreshed this step excluded.
        """
        count = classes.numel()
        if count > self.num_local_slots:
            raise ValueError(
                f"memory_size={self.memory_size} is too small for one global batch: shard {self.rank} "
                f"received {count} classes this step but holds {self.num_local_slots} slots"
            )
        self.check_storable(classes, prototypes)
        slots = self.lookup_slots(classes)
        return self._store(classes, prototypes, slots, int((slots < 0).sum()))

    @torch.no_grad()
    def _store(self, classes: torch.Tensor, prototypes: torch.Tensor, slots: torch.Tensor,
               num_new: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`write_prototypes` once the slots (``-1`` for new classes) and their count are known.

        No host-device synchronisation: masks become index lists by stable sorts of known length.
        """
        new = slots < 0
        evicted = torch.zeros((), dtype=torch.int64, device=classes.device)
        if num_new:
            order = torch.arange(self.num_local_slots, device=classes.device)
            key = (self.slot_step + 1) * self.num_local_slots + order
            # the slots refreshed this step cannot be taken (amax: new classes' -1 entries change nothing)
            taken = torch.where(new, torch.full_like(slots, -1), torch.full_like(slots, _INT64_MAX))
            key.scatter_reduce_(0, slots.clamp_min(0), taken, reduce="amax")
            chosen = torch.topk(key, num_new, largest=False, sorted=True).indices
            evicted = (self.slot_class[chosen] >= 0).sum()
            new_positions = torch.sort(new.logical_not().to(torch.int8), stable=True).indices[:num_new]
            slots = slots.index_put((new_positions,), chosen)
        self.memory[slots] = prototypes.to(self.memory.dtype)
        self.slot_class[slots] = classes
        self.slot_step[slots] = self.step
        count = classes.numel()
        return slots, {"new": num_new, "refreshed": count - num_new, "evicted": evicted}

    # ------------------------------------------------------------------ resharding
    def merge_shard_states(self, states: list[dict]) -> dict:
        """This rank's state from the memory shards of a run on ``len(states)`` ranks.

        The stored classes this rank owns are kept, the most recently written first when they
        exceed its slots; they fill the first slots in (write step, class) order.
        """
        picks = []  # (shard, slot) of every stored class this rank owns: only the small tables are read whole
        for shard, s in enumerate(states):
            slots = torch.nonzero((s["slot_class"] >= 0) & (D.owner_shard(s["slot_class"], self.world_size) == self.rank))
            slots = slots.squeeze(1)
            picks.append((torch.full_like(slots, shard), slots, s["slot_class"][slots], s["slot_step"][slots]))
        shard_of, slot_of, classes, steps = (torch.cat(parts) for parts in zip(*picks))
        newest = torch.argsort(-steps * self.num_classes + classes)[: self.num_local_slots]
        index = newest[torch.argsort(steps[newest] * self.num_classes + classes[newest])]
        count = index.numel()
        state = {k: v.clone() for k, v in self.state_dict().items() if k != "memory"}
        memory = torch.zeros_like(self.memory, device="cpu")
        for shard, s in enumerate(states):  # each kept row is copied once, in bounded blocks
            targets = torch.nonzero(shard_of[index] == shard).squeeze(1)
            for block in targets.split(_StoredCosines.BLOCK):
                memory[block] = s["memory"][slot_of[index[block]]].to(memory.dtype)
        state["memory"] = memory
        state["slot_class"].fill_(-1)
        state["slot_class"][:count] = classes[index]
        state["slot_step"].fill_(-1)
        state["slot_step"][:count] = steps[index]
        state["step"] = states[0]["step"].clone()
        state.update(self.replicated_state(states))
        return state

    # ------------------------------------------------------------------ forward
    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor, **extras: Any) -> torch.Tensor:
        """One step; the host reads the device once (:meth:`plan_step`), all else is queued."""
        local_embeddings, local_labels = self.check_local_inputs(local_embeddings, local_labels)
        extras = self.gather_extras(local_embeddings, extras)
        embeddings, labels = self.gather(local_embeddings, local_labels)
        if embeddings.dtype != torch.float64:
            embeddings = embeddings.float()
        normed = F.normalize(embeddings, dim=1)

        classes, group_index, first = batch_classes(labels)  # padded to the batch size, no sync
        weights = self.sample_weights(embeddings, normed, group_index, classes.numel(), extras)
        weighted = normed if weights is None else normed * weights.to(normed.dtype).unsqueeze(1)
        sums = torch.zeros(classes.numel(), normed.shape[1], dtype=normed.dtype, device=normed.device)
        all_prototypes = F.normalize(sums.index_add(0, group_index, weighted), dim=1)
        real = torch.arange(classes.numel(), device=labels.device) < first.sum()
        owned = real & (D.owner_shard(classes, self.world_size) == self.rank)
        found = self.lookup_slots(classes)
        plan = self.plan_step(embeddings, labels, classes, all_prototypes, real, owned, found, extras)
        self.commit_step_state()

        self._last_batch = (classes[: plan["classes"]], all_prototypes[: plan["classes"]].detach())
        owned_rows = torch.sort(owned.logical_not().to(torch.int8), stable=True).indices[: plan["owned"]]
        prototypes = all_prototypes.index_select(0, owned_rows)
        if not self.prototype_grad:
            prototypes = prototypes.detach()
        slots, counts = self._store(classes[owned_rows], prototypes.detach(), found[owned_rows], plan["new"])
        occupied = min(plan["occupied"] + plan["new"], self.num_local_slots)
        if plan["prefix"]:  # slots fill in index order: the occupied ones are a prefix, columns = slots
            stored, occupied_index, written_columns = self.memory[:occupied], None, slots
            ages = self.step - self.slot_step[:occupied]
        else:  # a state loaded with gaps between occupied slots: the columns read the slots through an index
            occupied_index, written_columns, ages = self.occupied_columns(slots)
            stored = self.memory

        group_column = torch.full_like(classes, -1).index_put((owned_rows,), written_columns)
        targets = group_column[group_index]
        # the memory holds this step's prototypes bit for bit when it stores their dtype
        source = ColumnSource(stored, index=occupied_index, override_columns=written_columns, override=prototypes,
                              override_in_weight=stored.dtype == prototypes.dtype)
        loss = self.margin_cross_entropy(
            normed, source, targets,
            lambda: self.cosine_logits(normed, prototypes, stored, written_columns, occupied_index),
            norms=self.margin_norms(embeddings))
        self.step += 1
        self.record_stats(
            [occupied, self.num_local_slots, plan["owned"], counts["new"], counts["refreshed"], counts["evicted"],
             ages.sum(), ages.max() if ages.numel() else 0],
            embeddings.device,
        )
        return loss

    def plan_step(self, embeddings: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
                  prototypes: torch.Tensor, real: torch.Tensor, owned: torch.Tensor, found: torch.Tensor,
                  extras: dict[str, Any]) -> dict[str, int]:
        """The step's data-dependent sizes and every input check, read from the device in one copy.

        Returns the counts of batch classes, classes this shard owns, new classes among them and
        occupied slots, and whether the occupied slots form a prefix. Raises (every rank alike: the
        checks see the gathered batch) before anything is written.
        """
        occupied = self.slot_class >= 0
        prototype_bad = real & ~torch.isfinite(prototypes.detach().to(self.memory.dtype)).all(dim=1)
        values = torch.stack([
            real.sum(), owned.sum(), (owned & (found < 0)).sum(), occupied.sum(),
            (occupied[1:] & ~occupied[:-1]).any().logical_not(), prototype_bad.any(),
            *self.global_input_flags(embeddings, labels), *self.extras_flags(extras),
        ]).tolist()
        num_classes, num_owned, num_new, num_occupied, prefix, bad_prototype = values[:6]
        self.raise_input_errors(embeddings, labels, values[6:8])
        self.raise_extras_errors(values[8:])
        if bad_prototype:
            self.check_storable(classes, prototypes)
        if num_owned > self.num_local_slots:
            raise ValueError(
                f"memory_size={self.memory_size} is too small for one global batch: shard {self.rank} "
                f"received {num_owned} classes this step but holds {self.num_local_slots} slots"
            )
        return {"classes": num_classes, "owned": num_owned, "new": num_new, "occupied": num_occupied,
                "prefix": bool(prefix)}

    def extras_flags(self, extras: dict[str, Any]) -> list[torch.Tensor]:
        """Device flags of invalid per-sample extras (none for PM); read with the step's plan."""
        return []

    def raise_extras_errors(self, flags: list) -> None:
        """Raise for the extras flagged by :meth:`extras_flags`."""

    def commit_step_state(self) -> None:
        """Write state computed before the step's checks (none for PM; QAPM's UI prototype)."""

    @torch.no_grad()
    def nearest_classes(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` stored classes most similar to each class of the last batch (doppelgangers).

        Returns the batch's classes ``(n,)`` and their neighbours ``(n, k)``, nearest first (cosine of
        the batch prototype to the stored prototypes of every shard; the class itself excluded,
        ``-1`` where fewer exist). Collective: every rank calls it at the same step.
        """
        classes, prototypes = self._last_batch
        occupied = torch.nonzero(self.slot_class >= 0).squeeze(1)
        stored_classes = self.slot_class[occupied]
        sims = prototypes @ self.memory[occupied].to(prototypes.dtype).t()
        sims[stored_classes.unsqueeze(0) == classes.unsqueeze(1)] = float("-inf")
        width = min(k, sims.shape[1])
        values = torch.full((classes.numel(), k), float("-inf"), dtype=sims.dtype, device=sims.device)
        found = torch.full((classes.numel(), k), -1, dtype=torch.int64, device=sims.device)
        if width:
            top = sims.topk(width, dim=1)
            values[:, :width] = top.values
            found[:, :width] = stored_classes[top.indices]
        if self.world_size > 1:  # best k over every shard's candidates
            values = D.all_gather_no_grad(values, self.process_group).view(self.world_size, -1, k)
            found = D.all_gather_no_grad(found, self.process_group).view(self.world_size, -1, k)
            values = values.permute(1, 0, 2).reshape(classes.numel(), -1)
            found = found.permute(1, 0, 2).reshape(classes.numel(), -1)
            top = values.topk(k, dim=1)
            values, found = top.values, found.gather(1, top.indices)
        return classes, torch.where(torch.isfinite(values), found, torch.full_like(found, -1))

    def gather_extras(self, local_embeddings: torch.Tensor, extras: dict[str, Any]) -> dict[str, Any]:
        """Gather per-sample extras the head uses (none for PM)."""
        return {}

    def occupied_columns(self, slots: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Logit columns of the shard when the occupied slots are not a prefix: those slots in slot order.

        Returns the slot of each column (``None`` when every slot is occupied), the column of each
        of ``slots`` and the ages (steps since write) of the occupied slots.
        """
        occupied = self.slot_class >= 0
        if bool(occupied.all()):
            return None, slots, self.step - self.slot_step
        index = torch.nonzero(occupied).squeeze(1)
        column_of_slot = torch.cumsum(occupied.long(), 0) - 1
        return index, column_of_slot[slots], self.step - self.slot_step[index]

    def cosine_logits(
        self, normed: torch.Tensor, prototypes: torch.Tensor, stored: torch.Tensor, written_columns: torch.Tensor,
        index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``(B, C)`` cosines against the ``stored`` rows (rows ``index`` when given); the written
        columns use the attached ``prototypes``.

        The stored rows are never copied whole: a matmul reads them in their own dtype when it is the
        compute dtype, else :class:`_StoredCosines` widens (or gathers) them block by block.
        """
        compute = normed.dtype
        if self.fp16:  # the autocast dtype of the head
            compute = torch.float16 if normed.device.type == "cuda" else torch.bfloat16
        x = normed.to(compute)
        with torch.autocast(normed.device.type, enabled=False):
            if stored.dtype == compute and index is None:
                logits = x @ stored.t()
            else:
                logits = _StoredCosines.apply(x, stored, index)
            fresh = x @ prototypes.to(compute).t()
        out_dtype = torch.float64 if normed.dtype == torch.float64 else torch.float32
        logits = logits.to(out_dtype)
        # in place: the matmul's backward does not read its output, so no (B, C) copy is needed
        return logits.index_copy_(1, written_columns, fresh.to(out_dtype)).clamp(-1.0, 1.0)

    def finish_diagnostics(self, raw: dict[str, float]) -> dict[str, float]:
        occupied = max(raw["occupied_slots"], 1.0)
        return {
            "memory_fill": raw["occupied_slots"] / max(raw["memory_slots"], 1.0),
            "batch_classes": raw["batch_classes"],
            "new_classes": raw["new_classes"],
            "refreshed_classes": raw["refreshed_classes"],
            "evicted_classes": raw["evicted_classes"],
            "slot_age_mean": raw["age_sum"] / occupied,
            "slot_age_max": raw["age_max"],
        }
