"""DALI (CPU pipeline, real nvidia-dali) and PyTorch fallback loaders on one small .rec."""

import cv2
import numpy as np
import pytest
import torch

from protomem_plugin.data.dali import _AUG_STREAM, DaliAugmentation, DaliTrainLoader
from protomem_plugin.data.loader import build_train_loader
from protomem_plugin.data.packing import write_insightface_rec
from protomem_plugin.data.recordio import InsightFaceRec, RecordIOError
from protomem_plugin.data.sampler import GroupedBatchSampler

SIZE = 32
IDENTITIES, PER_ID = 12, 4  # 24 groups of 2 -> 6 batches of 8, nothing dropped


def _face_like(rng):
    image = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    cv2.circle(image, (int(rng.integers(8, 24)), int(rng.integers(8, 24))), 5, rng.integers(0, 256, 3).tolist(), -1)
    return image


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rec")
    rng = np.random.default_rng(0)
    samples = [
        (c, cv2.imencode(".jpg", _face_like(rng), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
        for c in range(IDENTITIES)
        for _ in range(PER_ID)
    ]
    write_insightface_rec(str(folder), samples, num_classes=IDENTITIES, image_size=(SIZE, SIZE), progress=False)
    return str(folder)


@pytest.fixture(scope="module")
def reference(rec_dir):
    """All images decoded independently with OpenCV and normalised: (N, 3, S, S) float32."""
    rec = InsightFaceRec(rec_dir)
    images = np.stack([rec.read_image(int(k)) for k in rec.image_keys]).astype(np.float32)
    return torch.from_numpy(images / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(rec.labels)


def identify(batch, reference_images):
    """Position of the reference image closest to each image of the batch (and the distances)."""
    flat_ref = reference_images.flatten(1)
    dist = torch.cdist(batch.flatten(1), flat_ref)
    best = dist.argmin(1)
    return best, dist.gather(1, best[:, None])[:, 0]


def loader(rec_dir, **kw):
    kw.setdefault("image_size", SIZE)
    kw.setdefault("num_workers", 0)
    return build_train_loader(rec_dir, kw.pop("batch_size", 8), **kw)


def test_dali_cpu_grouped_epochs_cover_every_image_with_right_labels(rec_dir, reference):
    ref_images, ref_labels = reference
    dali = loader(rec_dir, use_dali=True, random_flip=False, seed=1)
    assert isinstance(dali, DaliTrainLoader) and dali.pipeline.device_id is None
    assert len(dali) == 6 and dali.num_classes == IDENTITIES and dali.num_images == IDENTITIES * PER_ID
    orders = []
    for epoch in range(2):
        dali.set_epoch(epoch)
        seen = []
        for images, labels in dali:
            assert images.dtype == torch.float32 and images.shape == (8, 3, SIZE, SIZE)
            assert labels.dtype == torch.int64 and labels.shape == (8,)
            assert images.min() >= -1.0 and images.max() <= 1.0
            positions, dist = identify(images, ref_images)
            assert dist.max() < 0.05 * SIZE  # an exact match (decoder tolerance) for every image
            torch.testing.assert_close(labels, ref_labels[positions])
            pairs = labels.view(-1, 2)
            assert (pairs[:, 0] == pairs[:, 1]).all()  # K=2 images of one identity per group
            seen.extend(positions.tolist())
        assert sorted(seen) == list(range(IDENTITIES * PER_ID))  # every image exactly once
        orders.append(seen)
    assert orders[0] != orders[1]


def test_dali_images_equal_fallback_within_decoder_tolerance_with_flips(rec_dir):
    dali = loader(rec_dir, use_dali=True, seed=4, random_flip=True)
    torch_loader = loader(rec_dir, use_dali=False, seed=4, random_flip=True, num_workers=2)
    for epoch in (0, 3):
        dali.set_epoch(epoch)
        torch_loader.set_epoch(epoch)
        batches = list(zip(dali, torch_loader))
        assert len(batches) == 6
        for (x, y), (u, v) in batches:
            torch.testing.assert_close(y, v)
            diff = (x - u).abs() * 127.5  # in grey levels
            assert diff.max() <= 2.0 and diff.mean() <= 0.5
    flips = dali.flips(3).materialize()
    assert 0 < flips.mean() < 1


def test_flip_mirrors_the_decoded_image(rec_dir, reference):
    ref_images, _ = reference
    dali = loader(rec_dir, use_dali=True, seed=7, random_flip=True)
    flips = torch.from_numpy(dali.flips(0).materialize())
    plan = dali.sampler.epoch_batches(0)
    images, _ = next(iter(dali))
    expected = ref_images[plan[0]]
    expected = torch.where(flips[0][:, None, None, None], expected.flip(-1), expected)
    assert ((images - expected).abs() * 127.5).max() <= 2.0


def test_two_ranks_shards_are_disjoint_and_cover_the_epoch(rec_dir, reference):
    ref_images, _ = reference
    seen = []
    for rank in range(2):
        shard = loader(rec_dir, use_dali=True, batch_size=4, rank=rank, world_size=2, random_flip=False)
        shard.set_epoch(2)
        assert len(shard) == 6
        positions = [identify(images, ref_images)[0].tolist() for images, _ in shard]
        seen.append(sorted(p for batch in positions for p in batch))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(IDENTITIES * PER_ID))


@pytest.mark.parametrize("use_dali", [True, False])
def test_loader_resume_inside_epoch_gives_the_remaining_batches(rec_dir, use_dali):
    full_loader = loader(rec_dir, use_dali=use_dali, seed=11)
    full_loader.set_epoch(1)
    full = list(full_loader)
    first = loader(rec_dir, use_dali=use_dali, seed=11)
    first.set_epoch(1)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 4, "seed": 11}
    resumed = loader(rec_dir, use_dali=use_dali, seed=11)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 4
    for (x, y), (u, v) in zip(rest, full[4:]):
        torch.testing.assert_close(x, u)
        torch.testing.assert_close(y, v)
    # the abandoned epoch of `first` does not leak into its next epoch
    first.set_epoch(1)
    again = list(first)
    assert len(again) == len(full)
    torch.testing.assert_close(again[0][0], full[0][0])


def test_dali_aug_probabilities(rec_dir):
    base = loader(rec_dir, use_dali=True, seed=2)
    off = DaliTrainLoader(
        InsightFaceRec(rec_dir),
        GroupedBatchSampler(InsightFaceRec(rec_dir).labels, 8, seed=2),
        image_size=SIZE,
        dali_aug=DaliAugmentation(low_res_prob=0, blur_prob=0, color_jitter_prob=0, gray_prob=0),
    )
    always_gray = DaliTrainLoader(
        InsightFaceRec(rec_dir),
        GroupedBatchSampler(InsightFaceRec(rec_dir).labels, 8, seed=2),
        image_size=SIZE,
        dali_aug=DaliAugmentation(low_res_prob=1, blur_prob=1, color_jitter_prob=1, gray_prob=1),
    )
    only_gray = loader(rec_dir, use_dali=True, seed=2, dali_aug=DaliAugmentation(
        low_res_prob=0, blur_prob=0, color_jitter_prob=0, gray_prob=1))
    (x, y), (u, v), (g, w) = next(iter(base)), next(iter(off)), next(iter(always_gray))
    assert torch.equal(u, x)  # every augmentation switched off: the no-aug pipeline's images
    torch.testing.assert_close(w, y)
    spread = g.amax(1) - g.amin(1)  # grayscale: the three channels agree
    assert spread.max() < 0.05
    assert (g - x).abs().mean() > 0.05
    for images, _ in only_gray:  # every image of the epoch comes out gray
        assert (images.amax(1) - images.amin(1)).max() < 0.05
    default_aug = loader(rec_dir, use_dali=True, seed=2, dali_aug=True)
    images, _ = next(iter(default_aug))
    assert images.shape == (8, 3, SIZE, SIZE) and torch.isfinite(images).all()


def test_stored_size_differs_from_image_size_resizes(rec_dir):
    for use_dali in (True, False):
        images, _ = next(iter(loader(rec_dir, use_dali=use_dali, image_size=48)))
        assert images.shape == (8, 3, 48, 48)


def test_non_image_payload_in_dali_loader_names_key(tmp_path):
    good = cv2.imencode(".jpg", np.zeros((SIZE, SIZE, 3), np.uint8))[1].tobytes()
    samples = [(0, good), (0, b"not an image at all"), (1, good), (1, good)]
    write_insightface_rec(str(tmp_path), samples, num_classes=2, image_size=(SIZE, SIZE), progress=False)
    dali = loader(str(tmp_path), use_dali=True, batch_size=4, random_flip=False)
    with pytest.raises(Exception, match=r"key 2.*not an encoded image"):
        list(dali)
    fallback = loader(str(tmp_path), use_dali=False, batch_size=4)
    with pytest.raises(RecordIOError, match=r"key 2.*not a decodable image"):
        list(fallback)


def test_dali_aug_needs_dali(rec_dir):
    with pytest.raises(ValueError, match="use_dali"):
        loader(rec_dir, dali_aug=True)


HALF_AUG = DaliAugmentation(low_res_prob=0.5, blur_prob=0.5, color_jitter_prob=0.5, gray_prob=0.5)


def test_dali_aug_resume_inside_epoch_is_bit_identical(rec_dir):
    full_loader = loader(rec_dir, use_dali=True, seed=13, dali_aug=HALF_AUG)
    full_loader.set_epoch(2)
    full = [images for images, _ in full_loader]
    resumed = loader(rec_dir, use_dali=True, seed=13, dali_aug=HALF_AUG)
    resumed.load_state_dict({"epoch": 2, "position": 3, "seed": 13})
    rest = [images for images, _ in resumed]
    assert len(rest) == len(full) - 3
    for x, u in zip(rest, full[3:]):
        assert torch.equal(x, u)


def test_dali_aug_draws_do_not_depend_on_world_size(rec_dir):
    one = loader(rec_dir, use_dali=True, seed=5, dali_aug=HALF_AUG)
    ranks = [loader(rec_dir, use_dali=True, seed=5, dali_aug=HALF_AUG, batch_size=4, rank=r, world_size=2)
             for r in range(2)]
    for part in [one, *ranks]:
        part.set_epoch(1)
    draws_one = one.augmentation_draws(1)
    draws_ranks = [shard.augmentation_draws(1) for shard in ranks]
    for name, values in draws_one.items():
        np.testing.assert_array_equal(values.materialize(),
                                      np.concatenate([d[name].materialize() for d in draws_ranks], axis=1))
    for (x, y), (a, b), (c, d) in zip(one, *ranks):  # the same images, augmented identically
        torch.testing.assert_close(y, torch.cat([b, d]))
        assert torch.equal(x, torch.cat([a, c]))


def test_per_image_draws_are_computed_per_batch_in_any_order(rec_dir):
    dali = loader(rec_dir, use_dali=True, seed=3, dali_aug=True)
    in_order = dali.image_uniforms(4, _AUG_STREAM, DaliAugmentation.NUM_UNIFORMS, np.float32).materialize()
    alone = dali.image_uniforms(4, _AUG_STREAM, DaliAugmentation.NUM_UNIFORMS, np.float32)
    assert in_order.shape == (len(dali), 8, DaliAugmentation.NUM_UNIFORMS)
    np.testing.assert_array_equal(alone[3], in_order[3])  # no earlier row needed
    np.testing.assert_array_equal(alone[2:].materialize(), in_order[2:])
    assert not np.array_equal(in_order[0], in_order[1])
    other_epoch = dali.image_uniforms(5, _AUG_STREAM, DaliAugmentation.NUM_UNIFORMS, np.float32)[0]
    assert not np.array_equal(other_epoch, in_order[0])


def test_dali_aug_host_draw_frequencies_and_ranges(rec_dir):
    aug = DaliAugmentation()
    dali = loader(rec_dir, use_dali=True, seed=6, dali_aug=aug)
    draws = [dali.augmentation_draws(epoch) for epoch in range(40)]  # 40 x 48 images
    merged = {name: np.concatenate([d[name].materialize().ravel() for d in draws]) for name in draws[0]}
    for name, prob in [("low_res", aug.low_res_prob), ("blur", aug.blur_prob),
                       ("color_jitter", aug.color_jitter_prob), ("gray", aug.gray_prob)]:
        assert merged[name].dtype == bool and abs(merged[name].mean() - prob) < 0.03, name
    for name, (low, high) in [("low_res_side", [SIZE * s for s in aug.low_res_scale]),
                              ("blur_sigma", [s * SIZE / 112 for s in aug.blur_sigma]),
                              ("hue", aug.hue), ("saturation", aug.saturation),
                              ("brightness", aug.brightness), ("contrast", aug.contrast)]:
        values = merged[name]
        assert values.dtype == np.float32 and low <= values.min() and values.max() <= high, name
        assert values.max() - values.min() > 0.9 * (high - low), name


@pytest.mark.parametrize("kind", ["low_res", "blur", "color_jitter", "gray"])
def test_dali_aug_changes_exactly_the_images_drawn_for_it(rec_dir, kind):
    base = loader(rec_dir, use_dali=True, seed=8)
    probs = dict(low_res_prob=0, blur_prob=0, color_jitter_prob=0, gray_prob=0)
    probs[f"{kind}_prob"] = 0.5
    if kind == "blur":  # the default sigmas scaled to 32 px (0.14-0.43) often leave an image as it is
        probs["blur_sigma"] = (2.0, 4.0)
    aug = loader(rec_dir, use_dali=True, seed=8, dali_aug=DaliAugmentation(**probs))
    drawn = torch.from_numpy(aug.augmentation_draws(0)[kind].materialize())
    assert 0 < drawn.float().mean() < 1
    for (x, _), (u, _), chosen in zip(base, aug, drawn):
        same = (x == u).flatten(1).all(1)
        assert torch.equal(same, ~chosen)  # untouched images are bit-identical, augmented ones differ
        if kind == "gray":
            spread = u.amax(1) - u.amin(1)
            assert (spread.flatten(1).amax(1) < 0.05).tolist() == chosen.tolist()


def test_a_process_exits_with_its_loader_workers_still_running(rec_dir):
    """The workers ignore SIGTERM (a process-group SIGTERM is the trainer's to handle), so Python's
    exit cannot terminate them; arcface_torch's train_v2 returns with the iterator alive. The
    loader stops them at exit: the process ends instead of waiting for them forever."""
    import subprocess
    import sys

    script = f"""
from protomem_plugin.data import build_train_loader
loader = build_train_loader({str(rec_dir)!r}, 8, image_size={SIZE}, num_workers=2, seed=0)
batches = iter(loader)
next(batches)
keep = [loader, batches]
keep.append(keep)  # a cycle: nothing is freed before the interpreter's exit handlers run
print("trained", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr
