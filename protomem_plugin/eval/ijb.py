"""IJB-B / IJB-C evaluation: 1:1 verification (TAR at FAR) and 1:N identification per gallery.

Pipeline, as in insightface's IJB protocol: align each loose crop with its 5 landmarks
(``norm_crop``), embed it and its mirror and add the two, multiply by the detector score,
average the images of one media, sum the media of one template, L2-normalise; the score of two
templates is their dot product.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .embedders import Embedder
from .extract import extract_features
from .ijb_meta import (
    IJBFormatError,
    IJBLayout,
    ImageList,
    check_images_exist,
    read_image_list,
    read_template_pairs,
    read_template_subjects,
)
from .metrics import (
    FAR_TARGETS,
    FPIR_TARGETS,
    RANKS,
    IdentificationResult,
    VerificationResult,
    identification,
    verification_roc,
)
from .report import markdown_table, plot_roc
from .templates import fuse_image_features, lookup, pair_scores, template_features

PROTOCOLS = ("1:1", "1:N")


@dataclass
class IJBOptions:
    """How image features become template features (insightface's defaults)."""

    use_flip: bool = True
    use_detector_score: bool = True
    normalize_images: bool = False


def verification_from_features(
    fused: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    t1: np.ndarray,
    t2: np.ndarray,
    labels: np.ndarray,
    far_targets: tuple[float, ...] = FAR_TARGETS,
) -> tuple[VerificationResult, np.ndarray]:
    """1:1 protocol on fused (N, D) image features -> (ROC result, pair scores)."""
    unique, feats = template_features(fused, templates, medias)
    scores = pair_scores(unique, feats, t1, t2)
    return verification_roc(labels, scores, far_targets), scores


def identification_from_features(
    fused: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    probe: tuple[np.ndarray, np.ndarray],
    galleries: dict[str, tuple[np.ndarray, np.ndarray]],
    ranks: tuple[int, ...] = RANKS,
    fpir_targets: tuple[float, ...] = FPIR_TARGETS,
) -> dict[str, IdentificationResult]:
    """1:N protocol: probe (templates, subjects) searched in each named gallery."""
    unique, feats = template_features(fused, templates, medias)
    probe_feats = feats[lookup(unique, probe[0], "probe template")]
    results = {}
    for name, (g_templates, g_subjects) in galleries.items():
        g_feats = feats[lookup(unique, g_templates, f"gallery {name} template")]
        results[name] = identification(probe_feats, probe[1], g_feats, g_subjects, ranks, fpir_targets)
    return results


def load_or_extract_features(
    layout: IJBLayout,
    images: ImageList,
    embedder: Embedder | None,
    features_path: Path,
    batch_size: int = 64,
    workers: int = 4,
) -> np.ndarray:
    """Load (N, 2, D) image features from ``features_path`` if it exists, else extract and save."""
    if features_path.is_file():
        features = np.load(features_path)
        if features.ndim != 3 or features.shape[:2] != (len(images), 2):
            raise ValueError(
                f"{features_path}: expected features of shape ({len(images)}, 2, D) for "
                f"{layout.name_5pts_score}, got {features.shape}"
            )
        return features
    if embedder is None:
        raise FileNotFoundError(f"{features_path}: no saved features and no model to extract them")
    check_images_exist(layout, images.names)
    paths = [layout.image_dir / name for name in images.names]
    features = extract_features(
        embedder, paths, images.landmarks, batch_size=batch_size, workers=workers, desc=f"{layout.target} images"
    )
    features_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(features_path, features)
    return features


def evaluate_ijb(
    root: str | Path,
    target: str,
    output_dir: str | Path,
    embedder: Embedder | None = None,
    name: str = "model",
    features_path: str | Path | None = None,
    protocols: tuple[str, ...] = PROTOCOLS,
    options: IJBOptions | None = None,
    batch_size: int = 64,
    workers: int = 4,
    far_targets: tuple[float, ...] = FAR_TARGETS,
    fpir_targets: tuple[float, ...] = FPIR_TARGETS,
) -> dict:
    """Run the IJB protocols on ``root`` and write results.json, results.md, roc.png.

    ``features_path`` (default ``output_dir/<target>_features.npy``): reused when it exists,
    written after extraction otherwise. The 1:1 pair scores go to ``<target>_scores.npy``.
    Returns the results dictionary that is also written as JSON.
    """
    layout = IJBLayout.of(root, target)
    options = options or IJBOptions()
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or not protocols:
        raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {protocols}")
    output_dir = Path(output_dir)
    features_path = Path(features_path) if features_path else output_dir / f"{layout.prefix}_features.npy"

    # read and check every meta file before the (long) feature extraction and before any write
    images = read_image_list(layout)
    known = np.unique(images.templates)
    pairs = read_template_pairs(layout.template_pair_label, known) if "1:1" in protocols else None
    if "1:N" in protocols:
        probe = read_template_subjects(layout.probe_mixed, known)
        galleries = {g: read_template_subjects(p, known) for g, p in layout.galleries.items()}
    output_dir.mkdir(parents=True, exist_ok=True)

    features = load_or_extract_features(layout, images, embedder, features_path, batch_size, workers)
    fused = fuse_image_features(
        features,
        images.scores if options.use_detector_score else None,
        use_flip=options.use_flip,
        normalize=options.normalize_images,
    )

    results: dict = {
        "model": name,
        "target": layout.target,
        "root": str(layout.root),
        "num_images": len(images),
        "num_templates": int(len(known)),
        "feature_dim": int(features.shape[2]),
        "features": str(features_path),
        "options": vars(options),
    }
    verification = None
    if pairs is not None:
        verification, scores = verification_from_features(
            fused, images.templates, images.medias, *pairs, far_targets=far_targets
        )
        np.save(output_dir / f"{layout.prefix}_scores.npy", scores)
        results["1:1"] = verification.to_dict()
        plot_roc({name: verification}, output_dir / "roc.png", title=f"{layout.target} 1:1 ROC")
    ident = None
    if "1:N" in protocols:
        ident = identification_from_features(
            fused, images.templates, images.medias, probe, galleries, fpir_targets=fpir_targets
        )
        results["1:N"] = {g: r.to_dict() for g, r in ident.items()}

    table = markdown_table(name, layout.target, verification, ident)
    results["markdown"] = table
    (output_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


__all__ = [
    "IJBFormatError",
    "IJBLayout",
    "IJBOptions",
    "evaluate_ijb",
    "identification_from_features",
    "load_or_extract_features",
    "verification_from_features",
]
