"""Verification (1:1) and identification (1:N) metrics on similarity scores."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import auc, roc_curve

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIR_TARGETS = (1e-2, 1e-1)
RANKS = (1, 5, 10)


@dataclass
class VerificationResult:
    """ROC of a 1:1 protocol and the TAR read off it at each FAR target.

    ``tar_nearest``: TPR of the ROC point whose FPR is closest to the target (the largest TPR
    among equally close points), the convention of published IJB tables.
    ``tar_interpolated``: TPR linearly interpolated on the upper ROC envelope at the target.
    ``measurable``: whether the target is at least 1 / num_impostor (otherwise no threshold
    can realise it and both readings extrapolate from the ROC's FPR=0 end).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float
    num_genuine: int
    num_impostor: int
    far_targets: tuple[float, ...]
    tar_nearest: dict[float, float] = field(default_factory=dict)
    tar_interpolated: dict[float, float] = field(default_factory=dict)
    measurable: dict[float, bool] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "auc": self.auc,
            "num_genuine": self.num_genuine,
            "num_impostor": self.num_impostor,
            "tar_at_far_nearest": {f"{f:g}": v for f, v in self.tar_nearest.items()},
            "tar_at_far_interpolated": {f"{f:g}": v for f, v in self.tar_interpolated.items()},
            "far_measurable": {f"{f:g}": v for f, v in self.measurable.items()},
        }


def verification_roc(
    labels: np.ndarray, scores: np.ndarray, far_targets: tuple[float, ...] = FAR_TARGETS
) -> VerificationResult:
    """ROC from ``sklearn.metrics.roc_curve`` and TAR at each FAR (label 1 = genuine pair)."""
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    num_genuine = int(np.sum(labels == 1))
    num_impostor = int(np.sum(labels == 0))
    if num_genuine == 0 or num_impostor == 0:
        raise ValueError(f"need genuine and impostor pairs, got {num_genuine} genuine and {num_impostor} impostor")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    result = VerificationResult(
        fpr=fpr,
        tpr=tpr,
        thresholds=thresholds,
        auc=float(auc(fpr, tpr)),
        num_genuine=num_genuine,
        num_impostor=num_impostor,
        far_targets=tuple(far_targets),
    )
    # upper envelope: the best TPR at each distinct FPR (fpr is non-decreasing)
    env_fpr, first = np.unique(fpr, return_index=True)
    env_tpr = np.maximum.reduceat(tpr, first)
    for far in far_targets:
        distance = np.abs(fpr - far)
        closest = distance == distance.min()
        result.tar_nearest[far] = float(tpr[closest].max())
        result.tar_interpolated[far] = float(np.interp(far, env_fpr, env_tpr))
        result.measurable[far] = bool(far * num_impostor >= 1.0)
    return result


@dataclass
class IdentificationResult:
    """Open-set 1:N search of probe templates against one gallery."""

    num_mated: int
    num_non_mated: int
    rank_accuracy: dict[int, float]
    tpir: dict[float, float | None]
    tpir_thresholds: dict[float, float | None]

    def to_dict(self) -> dict:
        return {
            "num_mated": self.num_mated,
            "num_non_mated": self.num_non_mated,
            "rank": {str(k): v for k, v in self.rank_accuracy.items()},
            "tpir_at_fpir": {f"{f:g}": v for f, v in self.tpir.items()},
            "threshold_at_fpir": {f"{f:g}": v for f, v in self.tpir_thresholds.items()},
        }


def identification(
    probe_features: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_features: np.ndarray,
    gallery_subjects: np.ndarray,
    ranks: tuple[int, ...] = RANKS,
    fpir_targets: tuple[float, ...] = FPIR_TARGETS,
    chunk: int = 4096,
) -> IdentificationResult:
    """Rank-k identification rate and TPIR at FPIR for probes searched in one gallery.

    Scores are dot products; a subject's score is the best over its gallery templates.
    A probe is *mated* when its subject is in the gallery. Its rank is 1 + the number of other
    gallery subjects scoring strictly higher than its mate; rank-k accuracy is over mated probes.
    For FPIR target f over n non-mated probes, the threshold t is the (floor(f n) + 1)-th highest
    non-mated top score, so that at most f n non-mated probes score above t; TPIR is the share of
    mated probes found at rank 1 with a mate score above t. Without non-mated probes TPIR is None.
    """
    probe_subjects = np.asarray(probe_subjects)
    gallery_subjects = np.asarray(gallery_subjects)
    subjects, gallery_column = np.unique(gallery_subjects, return_inverse=True)
    gallery_column = gallery_column.reshape(-1)
    position = np.searchsorted(subjects, probe_subjects)
    position = np.clip(position, 0, len(subjects) - 1)
    mated = subjects[position] == probe_subjects

    ranks_of_mated: list[np.ndarray] = []
    mate_scores: list[np.ndarray] = []
    non_mated_top: list[np.ndarray] = []
    for start in range(0, len(probe_features), chunk):
        stop = start + chunk
        sims = np.asarray(probe_features[start:stop], dtype=np.float64) @ np.asarray(
            gallery_features, dtype=np.float64
        ).T
        if len(subjects) == len(gallery_subjects):  # one template per subject
            per_subject = np.empty_like(sims)
            per_subject[:, gallery_column] = sims
        else:
            per_subject = np.full((len(sims), len(subjects)), -np.inf)
            np.maximum.at(per_subject, (slice(None), gallery_column), sims)
        m = mated[start:stop]
        rows = np.flatnonzero(m)
        mate = per_subject[rows, position[start:stop][rows]]
        ranks_of_mated.append(1 + np.sum(per_subject[rows] > mate[:, None], axis=1))
        mate_scores.append(mate)
        non_mated_top.append(per_subject[~m].max(axis=1))
    rank = np.concatenate(ranks_of_mated) if ranks_of_mated else np.zeros(0, dtype=np.int64)
    mate_score = np.concatenate(mate_scores) if mate_scores else np.zeros(0)
    top = np.sort(np.concatenate(non_mated_top))[::-1] if non_mated_top else np.zeros(0)

    num_mated = int(mated.sum())
    num_non_mated = len(top)
    rank_accuracy = {k: (float(np.mean(rank <= k)) if num_mated else float("nan")) for k in ranks}
    tpir: dict[float, float | None] = {}
    thresholds: dict[float, float | None] = {}
    for target in fpir_targets:
        if num_non_mated == 0 or num_mated == 0:
            tpir[target], thresholds[target] = None, None
            continue
        k = int(np.floor(target * num_non_mated + 1e-9))
        threshold = float(top[k]) if k < num_non_mated else -np.inf
        tpir[target] = float(np.mean((rank == 1) & (mate_score > threshold)))
        thresholds[target] = threshold if np.isfinite(threshold) else None
    return IdentificationResult(num_mated, num_non_mated, rank_accuracy, tpir, thresholds)
