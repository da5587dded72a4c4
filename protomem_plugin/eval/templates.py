"""Image features -> template features -> pair scores (the IJB set-to-set protocol)."""

from __future__ import annotations

import numpy as np


def fuse_image_features(
    features: np.ndarray,
    detector_scores: np.ndarray | None = None,
    use_flip: bool = True,
    normalize: bool = False,
) -> np.ndarray:
    """Combine per-image features into one vector per image (float64).

    ``features`` is (N, 2, D): the embedding of the aligned image and of its mirror. With
    ``use_flip`` the two are added, otherwise only the first is kept. ``normalize`` scales each
    image to unit length first (insightface's default keeps the norm, which acts as a quality
    weight). ``detector_scores`` (N,) multiply each image's feature when given.
    """
    features = np.asarray(features)
    if features.ndim != 3 or features.shape[1] != 2:
        raise ValueError(f"expected image features of shape (N, 2, D), got {features.shape}")
    fused = features[:, 0].astype(np.float64)
    if use_flip:
        fused = fused + features[:, 1]
    if normalize:
        fused = _l2_normalize(fused)
    if detector_scores is not None:
        scores = np.asarray(detector_scores, dtype=np.float64)
        if scores.shape != (len(fused),):
            raise ValueError(f"expected {len(fused)} detector scores, got shape {scores.shape}")
        fused = fused * scores[:, None]
    return fused


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _group_sums(values: np.ndarray, group: np.ndarray, num_groups: int) -> np.ndarray:
    """Sum rows of ``values`` per group id in [0, num_groups) (every group non-empty)."""
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], np.arange(num_groups))
    return np.add.reduceat(values[order], starts, axis=0)


def template_features(
    image_features: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate images into L2-normalised template features.

    Images of one media (the frames of one video, or one still) are averaged; the media of
    one template are summed; the sum is normalised. Returns (sorted unique template ids,
    (T, D) float64 features).
    """
    image_features = np.asarray(image_features, dtype=np.float64)
    templates = np.asarray(templates)
    medias = np.asarray(medias)
    if not (len(image_features) == len(templates) == len(medias)):
        raise ValueError(
            f"{len(image_features)} features, {len(templates)} template ids and {len(medias)} media ids differ"
        )
    pairs, media_group, media_counts = np.unique(
        np.stack([templates, medias], axis=1), axis=0, return_inverse=True, return_counts=True
    )
    media_group = media_group.reshape(-1)
    media_means = _group_sums(image_features, media_group, len(pairs)) / media_counts[:, None]
    unique_templates, template_group = np.unique(pairs[:, 0], return_inverse=True)
    sums = _group_sums(media_means, template_group.reshape(-1), len(unique_templates))
    return unique_templates, _l2_normalize(sums)


def lookup(unique_templates: np.ndarray, wanted: np.ndarray, what: str = "template") -> np.ndarray:
    """Row indices of ``wanted`` ids in the sorted ``unique_templates``; KeyError if absent."""
    wanted = np.asarray(wanted)
    index = np.searchsorted(unique_templates, wanted)
    index = np.clip(index, 0, len(unique_templates) - 1)
    missing = unique_templates[index] != wanted
    if np.any(missing):
        raise KeyError(f"{what} {wanted[np.flatnonzero(missing)[0]]} has no images")
    return index


def pair_scores(
    unique_templates: np.ndarray,
    features: np.ndarray,
    t1: np.ndarray,
    t2: np.ndarray,
    chunk: int = 1 << 18,
) -> np.ndarray:
    """Dot products of the template features of every pair (t1[i], t2[i])."""
    i1 = lookup(unique_templates, t1)
    i2 = lookup(unique_templates, t2)
    scores = np.empty(len(i1), dtype=np.float64)
    for start in range(0, len(i1), chunk):
        a = features[i1[start : start + chunk]]
        b = features[i2[start : start + chunk]]
        scores[start : start + chunk] = np.einsum("ij,ij->i", a, b)
    return scores
