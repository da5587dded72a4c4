"""Pair verification on ``.bin`` sets (lfw, cfp_fp, agedb_30, ...), arcface_torch's protocol.

Each image and its mirror are embedded and the two embeddings added, then L2-normalised; the
distance of a pair is the squared euclidean distance. Ten folds (``KFold``, no shuffle): on
nine the threshold from ``0, 0.01, ..., 3.99`` with the best accuracy is chosen (the first on
ties), the accuracy at it is measured on the tenth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import KFold
from torch import nn
from tqdm import tqdm

THRESHOLDS = np.arange(0, 4, 0.01)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def verification_accuracy(
    embeddings: np.ndarray, issame: np.ndarray, nfolds: int = 10
) -> tuple[float, float, float]:
    """10-fold verification accuracy of consecutive pairs ``(2i, 2i+1)``.

    ``embeddings`` (2N, D) are L2-normalised here. Returns (mean accuracy, std over folds,
    mean of the per-fold best thresholds on the squared distance).
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if embeddings.ndim != 2 or len(embeddings) != 2 * len(issame):
        raise ValueError(f"expected (2N, D) embeddings for N={len(issame)} pairs, got shape {embeddings.shape}")
    if len(issame) < nfolds:
        raise ValueError(f"{len(issame)} pairs cannot be split into {nfolds} folds")
    emb = _l2_normalize(embeddings)
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), axis=1)
    correct = (dist[None, :] < THRESHOLDS[:, None]) == issame[None, :]  # (thresholds, pairs)
    accuracy = np.zeros(nfolds)
    best = np.zeros(nfolds)
    for fold, (train, test) in enumerate(KFold(n_splits=nfolds, shuffle=False).split(dist)):
        index = int(np.argmax(correct[:, train].mean(axis=1)))
        best[fold] = THRESHOLDS[index]
        accuracy[fold] = correct[index, test].mean()
    return float(accuracy.mean()), float(accuracy.std()), float(best.mean())


@torch.inference_mode()
def embed_images(
    model: nn.Module, images_rgb: np.ndarray, batch_size: int = 64, device: str | torch.device = "cpu",
    progress: bool = False, desc: str = "embedding",
) -> tuple[np.ndarray, np.ndarray]:
    """Embed uint8 RGB images (N, H, W, 3) and their mirrors -> two (N, D) float32 arrays."""
    device = torch.device(device)
    outputs: list[np.ndarray] = []
    flipped: list[np.ndarray] = []
    for start in tqdm(range(0, len(images_rgb), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = torch.from_numpy(np.ascontiguousarray(images_rgb[start : start + batch_size]))
        x = batch.to(device).permute(0, 3, 1, 2).float().div_(255).sub_(0.5).div_(0.5)
        outputs.append(model(x).float().cpu().numpy())
        flipped.append(model(torch.flip(x, dims=[3])).float().cpu().numpy())
    return np.concatenate(outputs), np.concatenate(flipped)


def evaluate_bin(
    model: nn.Module,
    bin_path: str,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    image_size: tuple[int, int] = (112, 112),
    nfolds: int = 10,
    progress: bool = False,
) -> dict:
    """Verification accuracy of ``model`` on one ``.bin`` set (with flip).

    Returns ``{"accuracy", "std", "xnorm", "best_threshold", "num_pairs"}``; ``xnorm`` is the mean
    norm of the raw embeddings (images and mirrors), as arcface_torch logs it. The model's
    train/eval mode is restored afterwards.
    """
    from protomem_plugin.data.binsets import load_bin

    images, issame = load_bin(str(bin_path), image_size)
    was_training = model.training
    model.eval()
    try:
        plain, mirrored = embed_images(model, images, batch_size, device, progress, desc=Path(bin_path).name)
    finally:
        model.train(was_training)
    xnorm = float(np.mean(np.linalg.norm(np.concatenate([plain, mirrored]), axis=1)))
    accuracy, std, threshold = verification_accuracy(plain + mirrored, issame, nfolds)
    return {
        "accuracy": accuracy,
        "std": std,
        "xnorm": xnorm,
        "best_threshold": threshold,
        "num_pairs": int(len(issame)),
    }
