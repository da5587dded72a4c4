"""``rec = "synthetic"``: arcface_torch's speed-test data, without files or decoding.

arcface_torch's speed-test jobs (``configs/3millions.py``) train on one fixed random image. Here
the image is also fixed (drawn from ``seed``), and the labels are spread over the classes
(image ``i`` belongs to class ``i mod num_classes``) and grouped as for any dataset, so a memory
head sees the writes and evictions of a real run. Only throughput means anything.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .loader import TrainLoader, host_to_device
from .sampler import GroupedBatchSampler

__all__ = ["SPEED_TEST_REC", "SpeedTestSource", "build_speed_test_loader"]

SPEED_TEST_REC = "synthetic"


class SpeedTestSource:
    """``num_image`` images over ``num_classes`` classes; no image is ever read."""

    def __init__(self, num_image: int, num_classes: int) -> None:
        if num_image < 1 or num_classes < 1:
            raise ValueError(f"rec = 'synthetic' needs positive num_image and num_classes, got {num_image}, {num_classes}")
        self.rec_path = SPEED_TEST_REC
        self.image_size = None
        self.num_classes = int(num_classes)
        self.image_keys = np.arange(int(num_image), dtype=np.int64)
        self.labels = self.image_keys % self.num_classes

    def where(self, key: int) -> str:
        return f"speed-test image {int(key)}"


class SpeedTestLoader(TrainLoader):
    """Yields the fixed image batch with each batch's grouped labels, on ``device``."""

    def __init__(self, source: SpeedTestSource, sampler: GroupedBatchSampler, *, device="cpu", image_size: int = 112,
                 seed: int = 0) -> None:
        super().__init__(source, sampler, device=device, image_size=image_size, random_flip=False)
        generator = torch.Generator().manual_seed(int(seed))
        image = torch.randint(0, 256, (3, self.image_size, self.image_size), generator=generator).float()
        image = image.div_(127.5).sub_(1.0)
        self.images = image.expand(sampler.batch_size, -1, -1, -1).contiguous().to(self.device)

    def _iterate(self, batches, flips) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images = self.images
        for row in batches:
            yield images, host_to_device(torch.from_numpy(self.rec.labels[row]), self.device)


def build_speed_test_loader(num_image: int, num_classes: int, batch_size: int, *, samples_per_class: int = 2,
                            rank: int = 0, world_size: int = 1, seed: int = 2048, device="cpu",
                            image_size: int = 112) -> SpeedTestLoader:
    """The loader behind ``rec = "synthetic"``."""
    source = SpeedTestSource(num_image, num_classes)
    sampler = GroupedBatchSampler(source.labels, batch_size, samples_per_class=samples_per_class, rank=rank,
                                  world_size=world_size, seed=seed)
    return SpeedTestLoader(source, sampler, device=device, image_size=image_size, seed=seed)
