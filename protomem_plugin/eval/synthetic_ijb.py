"""A small synthetic benchmark in insightface's IJB layout, rendered from synthetic identities.

Each image is an aligned synthetic face (``protomem_plugin.data.synthetic.SyntheticFaces``)
placed into a larger "loose crop" by a random similarity transform (rotation, scale, shift) on
a textured background. The 5 landmarks written to the meta file are the ArcFace template
points carried through that transform, so ``norm_crop`` has a real alignment to undo. The
detector score is ``0.5 + 0.5 * quality`` of the rendered image.

Templates hold several media of one or more images; 1:1 pairs are all genuine template pairs
plus impostor pairs; for 1:N the identities alternate between the two galleries (one gallery
template each) and every other template is a probe (mated in one gallery, non-mated in the other).
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from insightface.utils.face_align import arcface_dst
from tqdm import tqdm

from .ijb_meta import IJBLayout

ALIGNED_SIZE = 112


@dataclass
class SyntheticImage:
    name: str
    identity: int
    sample: int
    template: int
    media: int
    landmarks: np.ndarray  # (5, 2) in the loose crop
    score: float


@dataclass
class SyntheticIJB:
    """What :func:`make_synthetic_ijb` wrote."""

    layout: IJBLayout
    images: list[SyntheticImage] = field(default_factory=list)
    template_identity: dict[int, int] = field(default_factory=dict)
    num_genuine: int = 0
    num_impostor: int = 0


def loose_crop_transform(
    rng: np.random.Generator,
    max_rotation_deg: float = 25.0,
    scale_range: tuple[float, float] = (1.0, 1.6),
    max_margin: int = 48,
) -> tuple[np.ndarray, tuple[int, int]]:
    """A random similarity transform (2x3) from the aligned 112x112 face into a larger canvas.

    Returns the matrix and the canvas size (width, height); the whole face square lands inside
    the canvas with at least 2 pixels to spare.
    """
    angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
    scale = rng.uniform(*scale_range)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    corners = np.array([[0, 0], [ALIGNED_SIZE, 0], [0, ALIGNED_SIZE], [ALIGNED_SIZE, ALIGNED_SIZE]], dtype=np.float64)
    moved = corners @ rot.T
    low, high = moved.min(axis=0), moved.max(axis=0)
    extent = high - low
    margins = rng.integers(2, max_margin + 1, size=4)  # left, right, top, bottom
    width = int(np.ceil(extent[0])) + int(margins[0] + margins[1])
    height = int(np.ceil(extent[1])) + int(margins[2] + margins[3])
    shift = np.array([margins[0], margins[2]], dtype=np.float64) - low
    return np.hstack([rot, shift[:, None]]), (width, height)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    coarse = rng.uniform(0, 255, size=(6, 6, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 12, size=(height, width, 3)).astype(np.float32)
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def make_loose_crop(
    aligned_bgr: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Place an aligned face into a random loose crop -> (image BGR, landmarks (5, 2))."""
    matrix, size = loose_crop_transform(rng)
    canvas = _background(rng, size)
    cv2.warpAffine(aligned_bgr, matrix, size, dst=canvas, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_TRANSPARENT)
    landmarks = arcface_dst.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]
    return canvas, landmarks.astype(np.float32)


def make_synthetic_ijb(
    root: str | Path,
    target: str = "IJBC",
    num_identities: int = 8,
    templates_per_identity: int = 3,
    max_media_per_template: int = 2,
    max_images_per_media: int = 2,
    impostor_pairs: int | None = None,
    seed: int = 0,
    jpeg_quality: int = 95,
    degraded_fraction: float = 0.2,
    first_identity: int = 0,
) -> SyntheticIJB:
    """Write a synthetic IJB benchmark under ``root`` (``meta/`` and ``loose_crop/``).

    ``impostor_pairs``: how many impostor template pairs to sample (all when None).
    ``first_identity``: the tree shows identities ``first_identity .. first_identity + num_identities - 1``
    of the generator ``(seed)``, so trees and training sets drawn from one seed can be made disjoint
    by index range (a training set of ``make_synthetic_dataset`` holds ``0 .. num_identities - 1``).
    """
    from protomem_plugin.data.synthetic import SyntheticFaces

    if num_identities < 2 or templates_per_identity < 2:
        raise ValueError("need at least 2 identities with at least 2 templates each")
    if max_media_per_template < 1 or max_images_per_media < 1:
        raise ValueError("max_media_per_template and max_images_per_media must be >= 1")
    if first_identity < 0:
        raise ValueError(f"first_identity must be >= 0, got {first_identity}")
    identities = range(int(first_identity), int(first_identity) + num_identities)
    layout = IJBLayout.of(root, target)
    layout.meta_dir.mkdir(parents=True, exist_ok=True)
    layout.image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0x13B])
    faces = SyntheticFaces(identities.stop, seed=seed, image_size=ALIGNED_SIZE, degraded_fraction=degraded_fraction)
    result = SyntheticIJB(layout)

    plan: list[tuple[int, int, int]] = []  # (identity, template, media) per image
    templates_of: dict[int, list[int]] = {}
    template_id = media_id = 0
    for identity in identities:
        for _ in range(templates_per_identity):
            template_id += 1
            templates_of.setdefault(identity, []).append(template_id)
            result.template_identity[template_id] = identity
            for _ in range(int(rng.integers(1, max_media_per_template + 1))):
                media_id += 1
                plan += [(identity, template_id, media_id)] * int(rng.integers(1, max_images_per_media + 1))

    sample_of: dict[int, int] = {}
    for index, (identity, template, media) in enumerate(tqdm(plan, desc="synthetic IJB", unit="img")):
        sample = sample_of.get(identity, 0)
        sample_of[identity] = sample + 1
        aligned_rgb, quality = faces.render(identity, sample)
        loose, landmarks = make_loose_crop(np.ascontiguousarray(aligned_rgb[..., ::-1]), rng)
        name = f"{index + 1}.jpg"
        cv2.imwrite(str(layout.image_dir / name), loose, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
        score = round(0.5 + 0.5 * float(quality), 4)
        result.images.append(SyntheticImage(name, identity, sample, template, media, landmarks, score))

    with open(layout.face_tid_mid, "w", encoding="utf-8") as f:
        for im in result.images:
            f.write(f"{im.name} {im.template} {im.media}\n")
    with open(layout.name_5pts_score, "w", encoding="utf-8") as f:
        for im in result.images:
            coords = " ".join(f"{v:.3f}" for v in im.landmarks.reshape(-1))
            f.write(f"{im.name} {coords} {im.score:.4f}\n")

    genuine = [pair for ts in templates_of.values() for pair in itertools.combinations(ts, 2)]
    impostor = [
        (a, b)
        for a, b in itertools.combinations(sorted(result.template_identity), 2)
        if result.template_identity[a] != result.template_identity[b]
    ]
    if impostor_pairs is not None and impostor_pairs < len(impostor):
        keep = rng.choice(len(impostor), size=impostor_pairs, replace=False)
        impostor = [impostor[i] for i in sorted(keep)]
    with open(layout.template_pair_label, "w", encoding="utf-8") as f:
        for (a, b), label in [(p, 1) for p in genuine] + [(p, 0) for p in impostor]:
            f.write(f"{a} {b} {label}\n")
    result.num_genuine, result.num_impostor = len(genuine), len(impostor)

    gallery_names = layout.gallery_names
    gallery_templates = {ts[0] for ts in templates_of.values()}
    for g_index, g_name in enumerate(gallery_names):
        members = [t for i, ts in templates_of.items() if i % 2 == g_index for t in ts[:1]]
        _write_1n_csv(layout.galleries[g_name], members, result)
    probes = [t for t in sorted(result.template_identity) if t not in gallery_templates]
    _write_1n_csv(layout.probe_mixed, probes, result)

    info = {
        "target": layout.target,
        "seed": seed,
        "num_identities": num_identities,
        "first_identity": identities.start,
        "templates_per_identity": templates_per_identity,
        "num_images": len(result.images),
        "num_genuine_pairs": result.num_genuine,
        "num_impostor_pairs": result.num_impostor,
        "images": [[im.name, im.identity, im.sample] for im in result.images],
    }
    (layout.root / "synthetic_ijb.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
    return result


def _write_1n_csv(path: Path, templates: list[int], result: SyntheticIJB) -> None:
    wanted = set(templates)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["TEMPLATE_ID", "SUBJECT_ID", "FILENAME"])
        for im in result.images:
            if im.template in wanted:
                writer.writerow([im.template, im.identity + 1, f"loose_crop/{im.name}"])
