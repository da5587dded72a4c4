"""NVIDIA DALI training loader reading InsightFace-layout .rec files directly.

``fn.external_source`` is fed, batch by batch, with the encoded bytes of the records chosen by the
:class:`GroupedBatchSampler`, their labels and the flip decisions; ``fn.decoders.image`` decodes on
the GPU (``device="mixed"``) when the loader's device is CUDA and on the CPU otherwise
(``device_id=None``, no GPU needed). Then optional ``dali_aug`` augmentations, resize when the
stored size differs from ``image_size``, and ``fn.crop_mirror_normalize`` to float NCHW
``(x/255-0.5)/0.5``. The external source runs in the loader's thread: reading a record is a copy
out of the memory-mapped .rec, far cheaper than decoding it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .loader import TrainLoader
from .recordio import InsightFaceRec, check_image_payload
from .sampler import GroupedBatchSampler

__all__ = ["DaliAugmentation", "DaliTrainLoader", "build_dali_pipeline"]


@dataclass(frozen=True)
class DaliAugmentation:
    """The ``dali_aug`` augmentations, each applied to an image with its own probability.

    * random low resolution: downscale to a random fraction ``low_res_scale`` of the side, back up;
    * Gaussian blur with a sigma drawn from ``blur_sigma`` (pixels at 112, scaled with the size);
    * colour jitter: hue shift (degrees), saturation, brightness and contrast factors;
    * grayscale.
    """

    low_res_prob: float = 0.1
    low_res_scale: tuple[float, float] = (0.5, 0.8)
    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    color_jitter_prob: float = 0.2
    hue: tuple[float, float] = (-10.0, 10.0)
    saturation: tuple[float, float] = (0.8, 1.2)
    brightness: tuple[float, float] = (0.8, 1.2)
    contrast: tuple[float, float] = (0.8, 1.2)
    gray_prob: float = 0.1


class _BatchFeed:
    """Callable external source: one batch (encoded bytes, labels, flips) per call, StopIteration at the end."""

    def __init__(self, rec: InsightFaceRec):
        self.rec = rec
        self.batches = np.zeros((0, 0), dtype=np.int64)
        self.flips = np.zeros((0, 0), dtype=bool)
        self.next = 0

    def start(self, batches: np.ndarray, flips: np.ndarray) -> None:
        self.batches, self.flips, self.next = batches, flips, 0

    def stop(self) -> None:
        self.next = len(self.batches)

    def __call__(self):
        if self.next >= len(self.batches):
            raise StopIteration
        positions = self.batches[self.next]
        flips = self.flips[self.next]
        self.next += 1
        keys = self.rec.image_keys[positions]
        encoded = [
            np.frombuffer(check_image_payload(self.rec.read_image_bytes(int(k)), self.rec.where(int(k))), np.uint8)
            for k in keys
        ]
        labels = self.rec.labels[positions].astype(np.int64)
        return encoded, labels, flips.astype(np.int32)


def _augment(images, aug: DaliAugmentation, size: int):
    from nvidia.dali import fn, types

    if fn.random.coin_flip(probability=aug.low_res_prob, dtype=types.BOOL):
        side = fn.random.uniform(range=[size * aug.low_res_scale[0], size * aug.low_res_scale[1]])
        images = fn.resize(images, resize_x=side, resize_y=side)
        images = fn.resize(images, size=[size, size])
    if fn.random.coin_flip(probability=aug.blur_prob, dtype=types.BOOL):
        sigma = fn.random.uniform(range=[s * size / 112 for s in aug.blur_sigma])
        images = fn.gaussian_blur(images, sigma=sigma)
    if fn.random.coin_flip(probability=aug.color_jitter_prob, dtype=types.BOOL):
        images = fn.color_twist(
            images,
            hue=fn.random.uniform(range=list(aug.hue)),
            saturation=fn.random.uniform(range=list(aug.saturation)),
            brightness=fn.random.uniform(range=list(aug.brightness)),
            contrast=fn.random.uniform(range=list(aug.contrast)),
        )
    if fn.random.coin_flip(probability=aug.gray_prob, dtype=types.BOOL):
        images = fn.hsv(images, saturation=0.0)
    return images


def build_dali_pipeline(
    feed,
    *,
    batch_size: int,
    image_size: int,
    stored_size: tuple[int, int] | None,
    device_id: int | None,
    num_threads: int,
    prefetch: int,
    seed: int,
    augmentation: DaliAugmentation | None = None,
):
    """Build the DALI pipeline: external source -> decode -> [aug] -> [resize] -> flip + normalise."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(enable_conditionals=augmentation is not None)
    def pipeline():
        encoded, labels, flips = fn.external_source(
            source=feed,
            num_outputs=3,
            batch=True,
            dtype=[types.UINT8, types.INT64, types.INT32],
            ndim=[1, 0, 0],
        )
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if stored_size != (image_size, image_size):
            images = fn.resize(images, size=[image_size, image_size])
        if augmentation is not None:
            images = _augment(images, augmentation, image_size)
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[127.5] * 3,
            std=[127.5] * 3,
            mirror=flips,
        )
        return images, labels

    pipe = pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        seed=seed,
    )
    pipe.build()
    return pipe


class DaliTrainLoader(TrainLoader):
    """DALI implementation of the :class:`TrainLoader` contract (CPU or GPU decoding)."""

    def __init__(
        self,
        rec: InsightFaceRec,
        sampler: GroupedBatchSampler,
        *,
        dali_aug: bool | DaliAugmentation = False,
        num_threads: int | None = None,
        prefetch: int = 2,
        device: str | torch.device = "cpu",
        image_size: int = 112,
        random_flip: bool = True,
    ):
        super().__init__(rec, sampler, device=device, image_size=image_size, random_flip=random_flip)
        if self.device.type == "cuda":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        elif self.device.type == "cpu":
            device_id = None
        else:
            raise ValueError(f"DALI loader supports cpu and cuda devices, got {self.device}")
        augmentation = dali_aug if isinstance(dali_aug, DaliAugmentation) else (DaliAugmentation() if dali_aug else None)
        self._feed = _BatchFeed(rec)
        self.pipeline = build_dali_pipeline(
            self._feed,
            batch_size=sampler.batch_size,
            image_size=self.image_size,
            stored_size=rec.image_size,
            device_id=device_id,
            num_threads=num_threads or max(1, os.cpu_count() or 1),
            prefetch=prefetch,
            seed=(sampler.seed * 1009 + sampler.rank) % (2**31),
            augmentation=augmentation,
        )
        self._started = False

    def _finish_epoch(self) -> None:
        """Drop what the pipeline prefetched for an abandoned epoch and reset it."""
        if not self._started:
            return
        self._feed.stop()
        try:
            while True:
                self.pipeline.run()
        except StopIteration:
            pass
        self.pipeline.reset()
        self._started = False

    def _to_torch(self, tensor_list, dtype: torch.dtype) -> torch.Tensor:
        """Copy a dense DALI output into a torch tensor on the device where DALI left it."""
        from nvidia.dali.plugin.pytorch import feed_ndarray
        from nvidia.dali.tensors import TensorListGPU

        on_gpu = isinstance(tensor_list, TensorListGPU)
        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=dtype, device=self.device if on_gpu else "cpu")
        stream = torch.cuda.current_stream(self.device) if on_gpu else None
        feed_ndarray(dense, out, cuda_stream=stream)
        return out

    def _iterate(self, batches: np.ndarray, flips: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._finish_epoch()
        self._feed.start(batches, flips)
        self._started = True
        for _ in range(len(batches)):
            images, labels = self.pipeline.run()
            yield self._to_torch(images, torch.float32), self._to_torch(labels, torch.int64).to(self.device)
        self._finish_epoch()
