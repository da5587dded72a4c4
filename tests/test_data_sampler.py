"""Identity-grouped batch sampler: groups, coverage, determinism, sharding, resume."""

from collections import Counter

import numpy as np
import pytest

from protomem_plugin.data.sampler import GroupedBatchSampler

# 7 identities with 1..6 images, labels deliberately not sorted and not contiguous
COUNTS = {10: 4, 3: 1, 7: 6, 0: 2, 5: 3, 8: 5, 1: 2}
LABELS = np.random.default_rng(0).permutation(np.repeat(list(COUNTS), list(COUNTS.values())))


def groups_of(batch, k):
    return [batch[i : i + k] for i in range(0, len(batch), k)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_groups_coverage_and_fill_rule(k):
    # groups per identity: ceil(n/k); drop_last=False with batch = all groups -> one batch, nothing dropped
    num_groups = sum(-(-n // k) for n in COUNTS.values())
    sampler = GroupedBatchSampler(LABELS, batch_size=k * num_groups, samples_per_class=k, seed=3, drop_last=False)
    (batch,) = list(sampler)
    assert len(batch) == k * num_groups
    for group in groups_of(batch, k):
        assert len(set(LABELS[group].tolist())) == 1  # one identity per group
    seen = Counter(batch)
    assert set(seen) == set(range(len(LABELS)))  # every image at least once
    for label, n in COUNTS.items():
        members = np.flatnonzero(LABELS == label)
        uses = sorted((seen[i] for i in members), reverse=True)
        # repetition fills the last group: total uses ceil(n/k)*k, spread as evenly as the cycle gives
        assert sum(uses) == -(-n // k) * k
        assert uses[0] - uses[-1] <= 1 + (k - 1) // n


def test_plain_shuffle_with_k1_covers_each_image_once():
    sampler = GroupedBatchSampler(LABELS, batch_size=len(LABELS), samples_per_class=1, seed=0)
    (batch,) = list(sampler)
    assert sorted(batch) == list(range(len(LABELS)))
    assert batch != list(range(len(LABELS)))


def test_deterministic_for_seed_and_epoch_and_constant_batch_size():
    make = lambda seed: GroupedBatchSampler(LABELS, batch_size=4, samples_per_class=2, seed=seed)
    a, b, c = make(1), make(1), make(2)
    epochs = []
    for epoch in range(3):
        a.set_epoch(epoch), b.set_epoch(epoch), c.set_epoch(epoch)
        batches = list(a)
        assert batches == list(b)
        assert batches != list(c)
        assert len(batches) == len(a) == 13 // 2  # 13 groups of 2, 2 groups per batch
        assert all(len(x) == 4 for x in batches)
        epochs.append(batches)
    assert epochs[0] != epochs[1] != epochs[2]


def test_two_ranks_are_disjoint_whole_groups_and_cover_the_epoch():
    k, per_rank = 2, 4
    labels = np.repeat(np.arange(12), 2)  # 12 identities x 2 images: 12 groups, 3 global batches of 4 groups
    shards = [GroupedBatchSampler(labels, per_rank, k, rank=r, world_size=2, seed=9) for r in range(2)]
    for epoch in (0, 1):
        for s in shards:
            s.set_epoch(epoch)
        b0, b1 = list(shards[0]), list(shards[1])
        assert len(b0) == len(b1) == 3
        for x, y in zip(b0, b1):
            assert not set(x) & set(y)
            for batch in (x, y):
                for group in groups_of(batch, k):
                    assert len(set(labels[group].tolist())) == 1
        together = sorted(i for batch in b0 + b1 for i in batch)
        assert together == list(range(len(labels)))


def test_drop_last_false_pads_with_groups_from_the_epoch_start():
    labels = np.repeat(np.arange(5), 2)  # 5 groups, 2 per batch
    dropped = GroupedBatchSampler(labels, 4, 2, seed=0, drop_last=True)
    padded = GroupedBatchSampler(labels, 4, 2, seed=0, drop_last=False)
    assert len(dropped) == 2 and len(padded) == 3
    batches = list(padded)
    assert batches[:2] == list(dropped)
    assert batches[2][2:] == batches[0][:2]  # the tail is completed with the first group
    assert set(i for b in batches for i in b) == set(range(10))


def test_resume_inside_an_epoch_yields_exactly_the_remaining_batches():
    sampler = GroupedBatchSampler(LABELS, batch_size=2, samples_per_class=2, seed=5)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4)
    it = iter(sampler)
    consumed = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    assert state == {"epoch": 4, "position": 5, "seed": 5}
    restored = GroupedBatchSampler(LABELS, batch_size=2, samples_per_class=2, seed=5)
    restored.load_state_dict(state)
    assert consumed + list(restored) == full
    restored.set_epoch(5)  # the next epoch starts from its beginning
    assert len(list(restored)) == len(full)
    with pytest.raises(ValueError, match="seed"):
        restored.load_state_dict({"epoch": 0, "position": 0, "seed": 6})


def test_invalid_arguments():
    with pytest.raises(ValueError, match="multiple of samples_per_class"):
        GroupedBatchSampler(LABELS, batch_size=5, samples_per_class=2)
    with pytest.raises(ValueError, match="rank"):
        GroupedBatchSampler(LABELS, batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        GroupedBatchSampler(LABELS, batch_size=64, samples_per_class=2)
