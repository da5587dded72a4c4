"""IJB metrics on features constructed so that the answers are known in closed form."""

import numpy as np
import pytest

from protomem_plugin.eval.ijb import identification_from_features, verification_from_features
from protomem_plugin.eval.metrics import verification_roc
from protomem_plugin.eval.templates import fuse_image_features, template_features


def _split_into_flip_pair(directions: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2, D) image features whose flip-sum times the detector score points along ``directions``."""
    scores = rng.uniform(0.5, 1.0, size=len(directions))
    total = directions * rng.uniform(0.5, 2.0, size=(len(directions), 1)) / scores[:, None]
    first = rng.normal(size=directions.shape)
    return np.stack([first, total - first], axis=1), scores


def test_template_aggregation_matches_hand_computation():
    a, b, c, d = (np.array(v, dtype=np.float64) for v in ([1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 0]))
    flip = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1]], dtype=np.float64)
    features = np.stack([np.stack([a, flip[0]]), np.stack([b, flip[1]]), np.stack([c, flip[2]]),
                         np.stack([d, flip[3]])])
    scores = np.array([1.0, 0.5, 2.0, 1.0])
    fused = fuse_image_features(features, scores)
    np.testing.assert_allclose(fused[1], (b + flip[1]) * 0.5)
    templates = np.array([7, 7, 7, 3])
    medias = np.array([10, 10, 11, 12])
    ids, feats = template_features(fused, templates, medias)
    media_10 = ((a + flip[0]) * 1.0 + (b + flip[1]) * 0.5) / 2
    media_11 = (c + flip[2]) * 2.0
    expected_7 = (media_10 + media_11) / np.linalg.norm(media_10 + media_11)
    expected_3 = (d + flip[3]) / np.linalg.norm(d + flip[3])
    assert ids.tolist() == [3, 7]
    np.testing.assert_allclose(feats[1], expected_7, atol=1e-12)
    np.testing.assert_allclose(feats[0], expected_3, atol=1e-12)
    # without flip and detector score only the first embedding counts
    plain = fuse_image_features(features, None, use_flip=False)
    np.testing.assert_allclose(plain, features[:, 0])


def test_tar_at_far_exact_on_constructed_roc():
    """1e6 impostor pairs with scores i/N and genuine pairs placed between the FAR thresholds.

    At FAR f exactly f*N impostors score above the genuine pairs placed just above the
    (f*N + 1)-th highest impostor, so the TAR at f is the share of genuine pairs placed there
    or higher: the cumulative fractions below.
    """
    rng = np.random.default_rng(0)
    n_imp, n_gen = 1_000_000, 100
    expected = {1e-6: 0.10, 1e-5: 0.25, 1e-4: 0.50, 1e-3: 0.70, 1e-2: 0.90, 1e-1: 0.98}
    impostor_scores = np.arange(n_imp) / n_imp
    genuine_scores, placed = [], 0
    for far, tar in expected.items():
        level = (n_imp - far * n_imp - 1) / n_imp  # (f N + 1)-th highest impostor score
        count = round(tar * n_gen) - placed
        genuine_scores += [level + 0.5 / n_imp] * count
        placed += count
    genuine_scores += [0.25] * (n_gen - placed)
    pair_cos = np.concatenate([genuine_scores, impostor_scores])
    labels = np.concatenate([np.ones(n_gen, int), np.zeros(n_imp, int)])

    # template 0 points along e0; template k (k >= 1) makes angle arccos(score) with it
    directions = np.stack([pair_cos, np.sqrt(1.0 - pair_cos**2)], axis=1)
    directions = np.concatenate([[[1.0, 0.0]], directions])
    features, det_scores = _split_into_flip_pair(directions, rng)
    templates = np.arange(len(directions))
    medias = templates + 5
    fused = fuse_image_features(features, det_scores)
    t1 = np.zeros(len(pair_cos), dtype=np.int64)
    t2 = np.arange(1, len(pair_cos) + 1)
    result, scores = verification_from_features(fused, templates, medias, t1, t2, labels)
    np.testing.assert_allclose(scores, pair_cos, atol=1e-12)
    for far, tar in expected.items():
        assert result.tar_nearest[far] == pytest.approx(tar, abs=1e-12), far
        assert result.tar_interpolated[far] == pytest.approx(tar, abs=1e-12), far
        assert result.measurable[far]
    assert result.num_genuine == n_gen and result.num_impostor == n_imp


def test_nearest_and_interpolated_tar_differ_as_derived():
    # impostors .1 .2 .3 .4, genuine .15 .25 .35 .45: upper ROC envelope through
    # (0, .25) (.25, .5) (.5, .75) (.75, 1) (1, 1)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.15, 0.25, 0.35, 0.45])
    res = verification_roc(labels, scores, far_targets=(0.1, 0.3, 0.6))
    assert res.tar_nearest == pytest.approx({0.1: 0.25, 0.3: 0.5, 0.6: 0.75})
    assert res.tar_interpolated == pytest.approx({0.1: 0.35, 0.3: 0.55, 0.6: 0.85})
    assert res.measurable == {0.1: False, 0.3: True, 0.6: True}


def test_verification_needs_both_classes():
    with pytest.raises(ValueError, match="genuine and impostor"):
        verification_roc(np.ones(4, int), np.arange(4.0))


def _probe_vector(dim: int, sims: np.ndarray) -> np.ndarray:
    """Unit vector with the given dot products with e_0..e_{G-1}; the rest goes to e_{dim-1}."""
    v = np.zeros(dim)
    v[: len(sims)] = sims
    v[-1] = np.sqrt(1.0 - np.sum(sims**2))
    return v


def test_identification_known_ranks_and_tpir():
    n_gallery, dim = 20, 24
    gallery_subjects = np.arange(100, 100 + n_gallery)
    gallery_dirs = np.eye(dim)[:n_gallery]
    mated_ranks = [1, 1, 1, 1, 2, 4, 5, 7, 10, 15]
    rank1_mate_scores = [0.9, 0.7, 0.5, 0.3]
    probes, probe_subjects = [], []
    for i, rank in enumerate(mated_ranks):
        mate = i  # probe i belongs to gallery subject i
        sims = np.full(n_gallery, 0.01)
        if rank == 1:
            sims[mate] = rank1_mate_scores[i]
        else:
            sims[mate] = 0.15
            higher = [k for k in range(n_gallery) if k != mate][: rank - 1]
            sims[higher] = 0.2
        probes.append(_probe_vector(dim, sims))
        probe_subjects.append(gallery_subjects[mate])
    non_mated_tops = [0.8, 0.6, 0.4, 0.2] + [0.1] * 16
    for j, top in enumerate(non_mated_tops):
        sims = np.full(n_gallery, 0.01)
        sims[j % n_gallery] = top
        probes.append(_probe_vector(dim, sims))
        probe_subjects.append(900 + j)
    probes = np.array(probes)

    # one image per template; G2 holds every gallery subject twice (identical templates)
    directions = np.concatenate([gallery_dirs, gallery_dirs, probes])
    templates = np.arange(len(directions)) + 1
    rng = np.random.default_rng(1)
    features, det_scores = _split_into_flip_pair(directions, rng)
    fused = fuse_image_features(features, det_scores)
    g1 = (templates[:n_gallery], gallery_subjects)
    g2 = (templates[: 2 * n_gallery], np.concatenate([gallery_subjects, gallery_subjects]))
    probe = (templates[2 * n_gallery :], np.array(probe_subjects))
    results = identification_from_features(fused, templates, templates * 10, probe, {"G1": g1, "G2": g2})

    for name in ("G1", "G2"):
        res = results[name]
        assert res.num_mated == 10 and res.num_non_mated == 20
        assert res.rank_accuracy == pytest.approx({1: 0.4, 5: 0.7, 10: 0.9})
        # FPIR 1e-2: threshold = highest non-mated top (0.8): only the 0.9 mate passes
        # FPIR 1e-1: 2 of 20 non-mated may pass, threshold = 3rd highest (0.4): 0.9, 0.7, 0.5 pass
        assert res.tpir == pytest.approx({1e-2: 0.1, 1e-1: 0.3})
        assert res.tpir_thresholds == pytest.approx({1e-2: 0.8, 1e-1: 0.4})


def test_identification_closed_set_has_no_tpir():
    fused = np.eye(3)
    t = np.array([1, 2, 3])
    res = identification_from_features(fused, t, t, (t[:2], np.array([5, 6])), {"G1": (t[:2], np.array([5, 6]))})
    assert res["G1"].rank_accuracy[1] == 1.0
    assert res["G1"].tpir == {1e-2: None, 1e-1: None}
