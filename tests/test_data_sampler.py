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


# ----------------------------------------------------------------------------- on-demand machinery
from protomem_plugin.data.identity_layout import BLOCK, IdentityLayout  # noqa: E402
from protomem_plugin.data.permutation import derive_key, permute, unpermute  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 255, 256, 257, 1000, 4097])
def test_keyed_permutation_is_a_bijection_with_an_inverse(n):
    for key in (derive_key(0), derive_key(1, 2), derive_key(7, n)):
        image = permute(np.arange(n), n, key)
        assert sorted(image.tolist()) == list(range(n))
        np.testing.assert_array_equal(unpermute(image, n, key), np.arange(n))
    if n >= 16:
        assert not np.array_equal(permute(np.arange(n), n, derive_key(1)), permute(np.arange(n), n, derive_key(2)))
    with pytest.raises(ValueError, match="outside"):
        permute(np.array([n]), n, derive_key(0))


def test_keyed_permutation_with_a_size_and_key_per_element():
    sizes = np.array([1, 2, 3, 7, 100, 5])
    rows = np.stack([permute(np.full(len(sizes), 0) + i % sizes, sizes, derive_key(3, sizes)) for i in range(100)])
    for col, n in enumerate(sizes.tolist()):  # each column is the same bijection of [0, n), cycled
        assert sorted(set(rows[:, col].tolist())) == list(range(n))
        assert rows[:n, col].tolist() == permute(np.arange(n), n, derive_key(3, n)).tolist()


def brute_force_locate(counts, k):
    """(identity, group in identity, images, first slot) of every group, in identity order."""
    out, slot = [], 0
    for identity, n in enumerate(counts.tolist()):
        out += [(identity, q, n, slot) for q in range(-(-n // k))]
        slot += n
    return np.array(out).T


@pytest.mark.parametrize("k", [1, 2, 3])
def test_identity_layout_locates_every_group_like_a_brute_force_walk(k):
    rng = np.random.default_rng(k)
    counts = rng.geometric(0.3, size=3 * BLOCK + 17)
    counts[rng.choice(len(counts), 40, replace=False)] = 0  # identities without images are skipped
    counts[5] = 300  # one large identity
    layout = IdentityLayout.from_counts(counts)
    expected = brute_force_locate(counts, k)
    assert layout.num_groups(k) == expected.shape[1] and layout.num_images == counts.sum()
    got = layout.locate_groups(np.arange(expected.shape[1]), k)
    for mine, theirs in zip(got, expected):
        np.testing.assert_array_equal(mine, theirs)
    for identity in rng.choice(len(counts), 50).tolist():
        first, num = layout.identity_groups(identity, k)
        assert num == -(-counts[identity] // k)
        assert (expected[0, first : first + num] == identity).all()
        assert layout.identity_of_label(identity) == (identity if counts[identity] else None)


def test_identity_layout_from_unsorted_labels_lists_positions():
    layout = IdentityLayout.from_labels(LABELS)
    assert layout.order is not None and layout.identity_labels.tolist() == sorted(COUNTS)
    identity, _, n, first = layout.locate_groups(np.arange(layout.num_groups(1)), 1)
    slots = first + (np.arange(len(first)) - np.searchsorted(identity, identity))  # k=1: one group per image
    positions = layout.positions(slots)
    assert sorted(positions.tolist()) == list(range(len(LABELS)))
    np.testing.assert_array_equal(LABELS[positions], layout.label_of(identity))
    assert layout.identity_of_label(4) is None and layout.identity_of_label(7) == sorted(COUNTS).index(7)


def global_epoch(labels_or_layout, per_rank, k, world, seed, epoch, drop_last):
    """Every rank's batches of one epoch, concatenated rank by rank per step."""
    shards = [GroupedBatchSampler(labels_or_layout, per_rank, k, rank=r, world_size=world, seed=seed,
                                  drop_last=drop_last) for r in range(world)]
    return np.stack([np.concatenate([s.batch(epoch, b) for s in shards]) for b in range(len(shards[0]))])


def test_property_random_identity_size_distributions():
    rng = np.random.default_rng(2024)
    for trial in range(24):
        kind = trial % 4
        num = int(rng.integers(5, 400))
        counts = {0: rng.geometric(0.5, num), 1: np.minimum(rng.zipf(1.8, num), 500),
                  2: np.ones(num, int), 3: rng.integers(1, 40, num)}[kind]
        labels = np.repeat(rng.permutation(num * 3)[:num], counts)  # distinct, non-contiguous label values
        labels = labels[rng.permutation(len(labels))] if trial % 2 else np.sort(labels)
        k = int(rng.integers(1, 4))
        groups_total = int(sum(-(-c // k) for c in counts))
        world = int(rng.integers(1, 4))
        groups_per_rank = int(rng.integers(1, max(2, groups_total // (2 * world))))
        if groups_per_rank * world > groups_total:
            continue
        seed, epoch = int(rng.integers(0, 99)), int(rng.integers(0, 5))
        full = global_epoch(labels, groups_per_rank * k, k, world, seed, epoch, drop_last=False)
        # world-size independence: one rank with the whole global batch gives the same batches
        single = global_epoch(labels, groups_per_rank * k * world, k, 1, seed, epoch, drop_last=False)
        np.testing.assert_array_equal(full, single)
        groups = full.reshape(-1, k)
        assert (labels[groups] == labels[groups[:, :1]]).all(), "one identity per group"
        epoch_part, tail = groups[:groups_total], groups[groups_total:]
        np.testing.assert_array_equal(tail, groups[: len(tail)])  # completed from the epoch's start
        uses = np.bincount(epoch_part.ravel(), minlength=len(labels))
        assert (uses >= 1).all(), "every image at least once per epoch"
        for value, n in zip(np.unique(labels).tolist(), np.bincount(np.searchsorted(np.unique(labels), labels)).tolist()):
            mine = uses[labels == value]
            assert mine.sum() == -(-n // k) * k and mine.max() - mine.min() <= 1 + (k - 1) // n
        dropped = global_epoch(labels, groups_per_rank * k, k, world, seed, epoch, drop_last=True)
        np.testing.assert_array_equal(dropped, full[: len(dropped)])


def test_sampler_at_1e8_identities_from_ranges_in_bounded_memory_and_time():
    import subprocess
    import sys

    script = r"""
import resource, sys, time
import numpy as np
from protomem_plugin.data.identity_layout import IdentityLayout
from protomem_plugin.data.sampler import GroupedBatchSampler
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
layout = IdentityLayout.from_counts(np.full(10**8, 10, dtype=np.uint8))  # 1e9 images as identity ranges
sampler = GroupedBatchSampler(layout, 128, 2, rank=5, world_size=8, seed=3)
batch = sampler.batch(7, 123_456)
elapsed = time.perf_counter() - start
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
ids = batch // 10  # identity c holds images 10c .. 10c+9
assert len(batch) == 128 and batch.max() < 10**9
assert (ids.reshape(-1, 2)[:, 0] == ids.reshape(-1, 2)[:, 1]).all()
print(peak, elapsed, len(sampler))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak, elapsed, length = out.stdout.split()
    assert float(peak) < 1 << 30 and float(elapsed) < 30
    assert int(length) == 5 * 10**8 // (64 * 8)
