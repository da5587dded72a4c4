"""Doppelganger mining: the head's reported neighbours and the sampler that brings them together."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protomem_plugin.data.loader import build_train_loader
from protomem_plugin.data.mining import MiningBatchSampler, NeighbourTable
from protomem_plugin.heads import PrototypeMemory, QualityAwarePrototypeMemory
from protomem_plugin.losses import CombinedMarginLoss

MARGIN = CombinedMarginLoss(16.0, 1.0, 0.0, 0.3)


def labels_of(num_classes, per_class):
    return np.repeat(np.arange(num_classes), per_class)


# ----------------------------------------------------------------------------- the head's report
@pytest.mark.parametrize("head_class", [PrototypeMemory, QualityAwarePrototypeMemory])
def test_reported_neighbours_are_the_true_nearest_classes(head_class):
    g = torch.Generator().manual_seed(0)
    dim, classes = 16, 30
    head = head_class(MARGIN, dim, 100, memory_size=64).double()
    centres = F.normalize(torch.randn(classes, dim, generator=g, dtype=torch.float64), dim=1)
    for start in range(0, classes, 6):  # fill the memory with every class, two images each
        y = torch.arange(start, start + 6).repeat_interleave(2)
        head(centres[y] + 0.01 * torch.randn(len(y), dim, generator=g, dtype=torch.float64), y)
    y = torch.tensor([3, 3, 17, 17, 25, 25])
    head(centres[y] + 0.01 * torch.randn(len(y), dim, generator=g, dtype=torch.float64), y)
    batch_classes, neighbours = head.nearest_classes(3)
    assert batch_classes.tolist() == [3, 17, 25]
    stored = {int(c): head.memory[s].double() for s, c in enumerate(head.slot_class.tolist()) if c >= 0}
    for c, row in zip(batch_classes.tolist(), neighbours.tolist()):
        sims = {o: float(stored[c] @ p) for o, p in stored.items() if o != c}
        expected = sorted(sims, key=lambda o: -sims[o])[:3]
        assert row == expected, (c, row, expected)


# ----------------------------------------------------------------------------- the sampler
def test_batches_bring_reported_neighbours_together_and_cover_the_epoch():
    labels = labels_of(64, 4)  # 128 groups of 2
    table = NeighbourTable()
    table.update(np.arange(64), np.stack([(np.arange(64) + 32) % 64, (np.arange(64) + 1) % 64], axis=1))
    sampler = MiningBatchSampler(labels, batch_size=16, samples_per_class=2, seed=3, table=table, mining_fraction=0.5)
    batches = [np.array(b) for b in sampler]
    assert len(batches) == len(sampler) == 16
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(labels))), "every image exactly once"
    met = 0
    for b in batches:
        classes = set(labels[b].tolist())
        met += sum(((c + 32) % 64) in classes for c in classes)
        assert all(len(set(labels[b[i : i + 2]])) == 1 for i in range(0, 16, 2)), "whole groups"
    plain = [np.array(b) for b in MiningBatchSampler(labels, 16, 2, seed=3, table=NeighbourTable())]
    met_plain = sum(sum(((c + 32) % 64) in set(labels[b]) for c in set(labels[b])) for b in plain)
    assert met >= 4 * max(met_plain, 1), (met, met_plain)


def test_mining_is_deterministic_and_two_ranks_split_the_same_global_batches():
    labels = labels_of(40, 4)
    table = NeighbourTable()
    table.update(np.arange(40), ((np.arange(40) * 7) % 40)[:, None])
    one = [np.array(b) for b in MiningBatchSampler(labels, 16, 2, seed=1, table=table)]
    again = [np.array(b) for b in MiningBatchSampler(labels, 16, 2, seed=1, table=table)]
    assert all(np.array_equal(a, b) for a, b in zip(one, again))
    ranks = [[np.array(b) for b in MiningBatchSampler(labels, 8, 2, rank=r, world_size=2, seed=1, table=table)] for r in range(2)]
    for step, batch in enumerate(one):
        assert np.array_equal(np.concatenate([ranks[0][step], ranks[1][step]]), batch)


def test_table_updates_shape_later_batches_only_and_state_round_trips():
    labels = labels_of(32, 4)
    plain = [set(labels[b].tolist()) for b in MiningBatchSampler(labels, 8, 2, seed=5, table=NeighbourTable(),
                                                                  mining_fraction=1.0)]
    table = NeighbourTable()
    sampler = MiningBatchSampler(labels, 8, 2, seed=5, table=table, mining_fraction=1.0)
    lazy = sampler.batches_from(0)
    first = lazy[0]
    assert set(labels[first].tolist()) == plain[0]
    c = int(labels[first[0]])
    again = next(i for i in range(1, len(plain)) if c in plain[i])  # where c's second group comes
    seen_before = set().union(*plain[: again + 1])
    partner = min(set(range(32)) - seen_before)  # a class whose groups all come after that
    table.update(np.array([c]), np.array([[partner]]))
    later = [set(labels[lazy[i]].tolist()) for i in range(1, len(lazy))]
    assert later[: again - 1] == plain[1:again], "batches before c returns are unchanged"
    assert c in later[again - 1] and partner in later[again - 1], "c's next group brings its reported neighbour"
    assert plain[again] != later[again - 1]
    restored = NeighbourTable()
    restored.load_state_dict(table.state_dict())
    assert restored.neighbours == table.neighbours


@pytest.mark.parametrize("use_dali", [False, True], ids=["fallback", "dali"])
def test_loaders_compose_mined_batches(tiny_rec, use_dali):
    loader = build_train_loader(str(tiny_rec), 16, samples_per_class=2, seed=2, use_dali=use_dali, num_workers=0,
                                image_size=32, doppelganger_mining=True, mining_fraction=0.5)
    loader.set_epoch(0)
    classes = np.arange(60)
    loader.sampler.table.update(classes, ((classes + 30) % 60)[:, None])
    pairs, seen = 0, []
    for images, labels in loader:
        present = set(labels.tolist())
        pairs += sum(((c + 30) % 60) in present for c in present)
        seen.append(loader.current_positions)
        assert images.shape == (16, 3, 32, 32)
    assert pairs >= len(seen)  # every batch holds mined pairs
    flat = np.concatenate(seen)
    assert len(set(flat.tolist())) == len(flat), "no image twice in the epoch"
