"""NVIDIA DALI training loader reading InsightFace-layout .rec files directly.

``fn.external_source`` is fed, batch by batch, with the encoded bytes of the records chosen by the
:class:`GroupedBatchSampler`, their labels, the flip decisions and, with ``dali_aug``, each image's
augmentation decisions and parameters; ``fn.decoders.image`` decodes on the GPU
(``device="mixed"``) when the loader's device is CUDA and on the CPU otherwise (``device_id=None``,
no GPU needed). Then, as in the PyTorch loader, every image whose stored size differs from
``image_size`` is resized (bilinear; the size is read from the encoded header with
``fn.peek_image_shape``, images of the right size pass untouched), the optional ``dali_aug``
augmentations, and ``fn.crop_mirror_normalize`` to float NCHW ``(x/255-0.5)/0.5``.
The external source runs in the loader's thread: reading a record is a copy out of the
memory-mapped .rec, far cheaper than decoding it.

Nothing random happens inside DALI: the augmentation draws, like the flips, come from ``(seed,
epoch)`` on the host (:meth:`TrainLoader.image_uniforms`, own stream), so a run resumed inside an
epoch augments every image exactly as the uninterrupted run does, on any number of ranks.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence

import numpy as np
import torch

from .lazy_rows import LazyRows
from .loader import TrainLoader, host_to_device
from .recordio import InsightFaceRec, RecordIOError, check_image_payload
from .sampler import GroupedBatchSampler

__all__ = ["DaliAugmentation", "DaliTrainLoader", "build_dali_pipeline"]

_AUG_STREAM = 0xA06  # separates the augmentation random stream from the flips' and the sampler's


@dataclass(frozen=True)
class DaliAugmentation:
    """The ``dali_aug`` augmentations, each applied to an image with its own probability.

    * random low resolution: downscale to a random fraction ``low_res_scale`` of the side, back up;
    * Gaussian blur with a sigma drawn from ``blur_sigma`` (pixels at 112, scaled with the size);
    * colour jitter: hue shift (degrees), saturation, brightness and contrast factors;
    * grayscale.

    :meth:`draws` turns uniform ``[0, 1)`` values (``NUM_UNIFORMS`` per image, drawn on the host)
    into each image's decisions and parameters.
    """

    NUM_UNIFORMS: ClassVar[int] = 10

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

    def draws(self, uniforms: np.ndarray, size: int) -> dict[str, np.ndarray]:
        """Per-image decisions (bool) and parameters (float32) from ``uniforms`` of shape
        (..., NUM_UNIFORMS); ``size`` is the image side. Keys in the order the pipeline reads them."""
        if uniforms.shape[-1] != self.NUM_UNIFORMS:
            raise ValueError(f"expected {self.NUM_UNIFORMS} uniforms per image, got shape {uniforms.shape}")
        u = np.moveaxis(uniforms, -1, 0)

        def between(x, low, high):
            return (low + x * (high - low)).astype(np.float32)

        scale = size / 112
        return {
            "low_res": u[0] < self.low_res_prob,
            "low_res_side": between(u[1], size * self.low_res_scale[0], size * self.low_res_scale[1]),
            "blur": u[2] < self.blur_prob,
            "blur_sigma": between(u[3], self.blur_sigma[0] * scale, self.blur_sigma[1] * scale),
            "color_jitter": u[4] < self.color_jitter_prob,
            "hue": between(u[5], *self.hue),
            "saturation": between(u[6], *self.saturation),
            "brightness": between(u[7], *self.brightness),
            "contrast": between(u[8], *self.contrast),
            "gray": u[9] < self.gray_prob,
        }


class _BatchFeed:
    """Callable external source: one batch (encoded bytes, labels, flips, augmentation draws) per
    call, StopIteration at the end."""

    def __init__(self, rec: InsightFaceRec):
        self.rec = rec
        self.batches: Sequence = ()
        self.per_image: tuple[Sequence, ...] = ()
        self.next = 0  # batches handed to DALI so far (it prefetches ahead of what it outputs)

    def start(self, batches: Sequence, flips: LazyRows, *augment: Sequence) -> None:
        """``flips`` and each of ``augment``: one row of batch_size values per batch."""
        self.batches, self.next = batches, 0
        self.per_image = (flips.map(lambda f: f.astype(np.int32)), *augment)

    def stop(self) -> None:
        self.next = len(self.batches)

    def __call__(self):
        if self.next >= len(self.batches):
            raise StopIteration
        positions = self.batches[self.next]
        per_image = [values[self.next] for values in self.per_image]
        self.next += 1
        keys = self.rec.image_keys[positions]
        encoded = [
            np.frombuffer(check_image_payload(self.rec.read_image_bytes(int(k)), self.rec.where(int(k))), np.uint8)
            for k in keys
        ]
        labels = self.rec.labels[positions].astype(np.int64)
        return (encoded, labels, *per_image)


def _augment(images, draws: dict, size: int):
    """Apply each augmentation to the images whose host draw says so (``draws``: per-sample DataNodes)."""
    from nvidia.dali import fn

    if draws["low_res"]:
        side = draws["low_res_side"]
        images = fn.resize(images, resize_x=side, resize_y=side)
        images = fn.resize(images, size=[size, size])
    if draws["blur"]:
        images = fn.gaussian_blur(images, sigma=draws["blur_sigma"])
    if draws["color_jitter"]:
        images = fn.color_twist(
            images,
            hue=draws["hue"],
            saturation=draws["saturation"],
            brightness=draws["brightness"],
            contrast=draws["contrast"],
        )
    if draws["gray"]:
        images = fn.hsv(images, saturation=0.0)
    return images


def build_dali_pipeline(
    feed,
    *,
    batch_size: int,
    image_size: int,
    device_id: int | None,
    num_threads: int,
    prefetch: int,
    seed: int,
    augmentation: DaliAugmentation | None = None,
):
    """Build the DALI pipeline: external source -> decode -> [resize] -> [aug] -> flip + normalise.

    ``feed`` yields ``(encoded, labels, flips)`` per batch and, with ``augmentation``, the arrays of
    ``augmentation.draws`` after them, one value per image.
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    drawn = {} if augmentation is None else augmentation.draws(np.zeros((1, augmentation.NUM_UNIFORMS)), image_size)
    drawn_types = [types.BOOL if values.dtype == bool else types.FLOAT for values in drawn.values()]

    @pipeline_def(enable_conditionals=True)
    def pipeline():
        encoded, labels, flips, *draws = fn.external_source(
            source=feed,
            num_outputs=3 + len(drawn),
            batch=True,
            dtype=[types.UINT8, types.INT64, types.INT32, *drawn_types],
            ndim=[1, 0, 0] + [0] * len(drawn),
        )
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        stored = fn.peek_image_shape(encoded)
        if (stored[0] != image_size) | (stored[1] != image_size):  # per image, like the PyTorch loader
            images = fn.resize(images, size=[image_size, image_size])
        if augmentation is not None:
            images = _augment(images, dict(zip(drawn, draws)), image_size)
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
        self.augmentation = augmentation
        self._failure: RecordIOError | None = None
        self._feed = _BatchFeed(rec)
        self.pipeline = build_dali_pipeline(
            self._feed,
            batch_size=sampler.batch_size,
            image_size=self.image_size,
            device_id=device_id,
            num_threads=num_threads or max(1, os.cpu_count() or 1),
            prefetch=prefetch,
            seed=(sampler.seed * 1009 + sampler.rank) % (2**31),
            augmentation=augmentation,
        )
        self._started = False

    def augmentation_draws(self, epoch: int) -> dict[str, LazyRows]:
        """Each image's augmentation decisions and parameters (rows of batch_size per batch) of this
        rank for ``epoch`` (see :meth:`DaliAugmentation.draws`); empty without ``dali_aug``."""
        if self.augmentation is None:
            return {}
        uniforms = self.image_uniforms(epoch, _AUG_STREAM, self.augmentation.NUM_UNIFORMS, np.float32)
        per_batch = functools.lru_cache(maxsize=2)(lambda b: self.augmentation.draws(uniforms[b], self.image_size))
        names = self.augmentation.draws(np.zeros((1, self.augmentation.NUM_UNIFORMS)), self.image_size)
        return {name: LazyRows(len(uniforms), lambda b, name=name: per_batch(b)[name]) for name in names}

    def per_image_draws(self, epoch: int) -> tuple[LazyRows, ...]:
        return (*super().per_image_draws(epoch), *self.augmentation_draws(epoch).values())

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

    def _iterate(self, batches: Sequence, flips: LazyRows, *augment: Sequence
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._finish_epoch()
        if self._failure is not None:
            raise self._failure
        self._feed.start(batches, flips, *augment)
        self._started = True
        for index in range(len(batches)):
            try:
                images, labels = self.pipeline.run()
            except Exception as err:  # DALI's own errors name no record; find it (the pipeline is unusable now)
                self._started = False
                self._failure = self._name_failure(batches[index:self._feed.next], err)
                raise self._failure from err
            yield self._to_torch(images, torch.float32), host_to_device(self._to_torch(labels, torch.int64), self.device)
        self._finish_epoch()

    def _name_failure(self, suspects: Sequence, err: Exception) -> RecordIOError:
        """A RecordIOError naming the first record of ``suspects`` (the batches DALI had been given but
        not delivered) that OpenCV cannot decode either, else the keys of the batch that failed."""
        import cv2

        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        suspects = np.concatenate([np.asarray(row).reshape(-1) for row in suspects]) if len(suspects) else []
        for position in suspects:
            key = int(self.rec.image_keys[position])
            data = self.rec.read_image_bytes(key)
            if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is None:
                return RecordIOError(f"{self.rec.where(key)}: payload of {len(data)} bytes is not a decodable "
                                     f"image (DALI: {first_line})")
        keys = self.rec.image_keys[np.asarray(suspects[: self.sampler.batch_size], dtype=np.int64)]
        return RecordIOError(f"{self.rec.rec_path}: DALI failed on the batch of keys {keys.tolist()}: {first_line}")
