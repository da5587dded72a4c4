"""Align loose face crops with their 5 landmarks and embed them (image and mirror image)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
from insightface.utils.face_align import norm_crop
from tqdm import tqdm

from .embedders import Embedder

ALIGNED_SIZE = 112


def load_aligned(path: str | Path, landmarks: np.ndarray, image_size: int = ALIGNED_SIZE) -> np.ndarray:
    """Read a loose crop (BGR) and warp it so its 5 landmarks meet the ArcFace template."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: cannot read image")
    return norm_crop(image, np.asarray(landmarks, dtype=np.float32), image_size=image_size)


def _aligned_batches(
    paths: Sequence[Path], landmarks: np.ndarray, batch_size: int, workers: int
) -> Iterator[np.ndarray]:
    """Yield aligned batches; the next batch is read while the caller embeds the current one."""
    starts = list(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as loaders, ThreadPoolExecutor(max_workers=1) as ahead:

        def load(start: int) -> np.ndarray:
            stop = min(start + batch_size, len(paths))
            return np.stack(list(loaders.map(load_aligned, paths[start:stop], landmarks[start:stop])))

        pending = ahead.submit(load, starts[0]) if starts else None
        for i in range(len(starts)):
            batch = pending.result()
            if i + 1 < len(starts):
                pending = ahead.submit(load, starts[i + 1])
            yield batch


def embed_with_flip(embedder: Embedder, aligned_bgr: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) aligned faces -> (B, 2, D): embeddings of the images and of their mirrors."""
    flipped = aligned_bgr[:, :, ::-1]
    both = embedder(np.concatenate([aligned_bgr, flipped], axis=0))
    n = len(aligned_bgr)
    return np.stack([both[:n], both[n:]], axis=1)


def extract_features(
    embedder: Embedder,
    image_paths: Sequence[str | Path],
    landmarks: np.ndarray,
    batch_size: int = 64,
    workers: int = 4,
    desc: str = "embedding",
) -> np.ndarray:
    """Embed every listed loose crop: returns (N, 2, D) float32 (image, mirrored image).

    Images are read and aligned by a thread pool while the model runs; a tqdm bar shows progress.
    """
    paths = [Path(p) for p in image_paths]
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.shape != (len(paths), 5, 2):
        raise ValueError(f"expected landmarks of shape ({len(paths)}, 5, 2), got {landmarks.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    chunks: list[np.ndarray] = []
    with tqdm(total=len(paths), desc=desc, unit="img") as bar:
        for batch in _aligned_batches(paths, landmarks, batch_size, workers):
            chunks.append(embed_with_flip(embedder, batch).astype(np.float32))
            bar.update(len(batch))
    if not chunks:
        raise ValueError("no images to embed")
    return np.concatenate(chunks, axis=0)
