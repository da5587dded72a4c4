"""Procedural synthetic face identities: the project's built-in, deterministic dataset.

Each identity has its own face shape, skin tone and texture, hair colour and style, eye, brow,
nose and mouth geometry (small offsets around the ArcFace 5-point template), marks, and
optionally beard and glasses. Each image of an identity varies the nuisances: small pose
(rotation, scale, shift, yaw-like feature shift), lighting (direction, strength, colour cast),
expression (smile, open mouth, eye openness, brow raise), background, and a graded degradation
``d`` in [0, 1] that drives blur, downscaling, noise, JPEG compression and occlusion.

Ground-truth quality: every degradation component ``c_k`` in [0, 1] (blur, low resolution,
noise, JPEG, occluded fraction of the face) removes a share of the information,
``quality = prod_k (1 - a_k c_k)`` with ``a = (0.7, 0.6, 0.4, 0.3, 1.5)`` clipped to [0, 1].

Images are aligned: the landmarks are the ArcFace template scaled to the image size (``S/112``)
plus identity geometry and the small pose nuisance (mean absolute deviation about 1.7 px at 112,
roll within 7 degrees before the identity's own eye-line tilt).
Everything is a pure function of ``(seed, identity, sample)``; drawing uses OpenCV.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from tqdm import tqdm

from .binsets import write_bin
from .packing import staged_dataset_dir, write_insightface_rec

__all__ = ["ARCFACE_TEMPLATE", "SyntheticSample", "SyntheticFaces", "make_synthetic_dataset", "identity_image_counts"]

#: ArcFace 5-point template at 112x112 (left eye, right eye, nose tip, mouth left, mouth right),
#: the same values as ``insightface.utils.face_align.arcface_dst``.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
_SHIFT = 4  # fractional bits for OpenCV drawing coordinates
_ONE = 1 << _SHIFT
_QUALITY_WEIGHTS = np.array([0.7, 0.6, 0.4, 0.3, 1.5])
_SKIN_LIGHT = np.array([238.0, 206.0, 180.0])
_SKIN_DARK = np.array([92.0, 58.0, 38.0])
_HAIR_COLOURS = np.array(
    [[25, 20, 18], [60, 40, 25], [110, 75, 40], [200, 165, 100], [150, 70, 35], [160, 160, 160], [235, 225, 200]],
    dtype=np.float64,
)
_IRIS_COLOURS = np.array([[60, 40, 25], [90, 60, 30], [60, 100, 150], [80, 120, 80], [40, 30, 25]], dtype=np.float64)


@dataclass
class SyntheticSample:
    """One rendered image: RGB uint8 (S, S, 3), quality in [0, 1], landmarks (5, 2), degradation."""

    image: np.ndarray
    quality: float
    landmarks: np.ndarray
    degradation: float


@dataclass(frozen=True)
class _Identity:
    face_center: tuple[float, float]
    face_axes: tuple[float, float]
    face_power: float
    chin: float
    skin: np.ndarray
    texture_seed: int
    texture_amp: float
    hair: np.ndarray
    hairline: float
    fringe: float
    fringe_phase: float
    long_hair: bool
    bald: bool
    eye_offsets: np.ndarray
    eye_size: tuple[float, float]
    iris: np.ndarray
    brow_gap: float
    brow_thick: float
    brow_angle: float
    nose_top: float
    nose_width: float
    mouth_scale: float
    lip_thick: float
    lip: np.ndarray
    marks: np.ndarray
    beard: bool
    glasses: int
    glasses_colour: np.ndarray


def _c(x) -> int:
    return int(round(float(x) * _ONE))


def _pts(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points) * _ONE).astype(np.int32).reshape(-1, 1, 2)


def _colour(rgb) -> tuple[int, int, int]:
    return tuple(int(min(max(float(v), 0.0), 255.0)) for v in rgb[:3])


def _eye_offsets(rng: np.random.Generator) -> np.ndarray:
    """Identity eye offsets (2, 2) px at 112: shared height, symmetric spacing, small asymmetry."""
    height, spacing = rng.normal(0, 1.0), rng.normal(0, 1.0)
    return np.array([[-spacing, height], [spacing, height]]) + rng.normal(0, 0.3, (2, 2))


def identity_image_counts(
    num_identities: int, images_per_identity: int, *, long_tail: bool = False, seed: int = 0
) -> np.ndarray:
    """Images per identity: constant, or long-tailed (Zipf-like, mean about ``images_per_identity``, min 1)."""
    if not long_tail:
        return np.full(num_identities, int(images_per_identity), dtype=np.int64)
    rng = np.random.default_rng([seed, 0x7A11])
    weights = 1.0 / np.arange(1, num_identities + 1) ** 0.8
    weights = weights[rng.permutation(num_identities)]
    counts = np.round(weights / weights.mean() * images_per_identity).astype(np.int64)
    return np.maximum(counts, 1)


class SyntheticFaces:
    """Deterministic generator of aligned synthetic face images for ``num_identities`` identities.

    Knobs: ``image_size`` (S; 112 default, 32 or 56 for quick tests), ``degraded_fraction``
    (share of images with a heavy degradation in [0.5, 1] when ``render`` draws it; the others get
    a light one in [0, 0.2]), ``nuisance`` (scales pose, lighting and expression variation),
    ``seed``. Identities beyond ``num_identities`` can be rendered too (held-out identities).
    """

    def __init__(
        self,
        num_identities: int,
        seed: int = 0,
        image_size: int = 112,
        *,
        degraded_fraction: float = 0.2,
        nuisance: float = 1.0,
    ):
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if not 0.0 <= degraded_fraction <= 1.0:
            raise ValueError(f"degraded_fraction must be in [0, 1], got {degraded_fraction}")
        self.num_identities = int(num_identities)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.degraded_fraction = float(degraded_fraction)
        self.nuisance = float(nuisance)
        factor = max(1, -(-64 // self.image_size))
        self.canvas_size = self.image_size * factor
        self.scale = self.canvas_size / 112.0
        r = self.canvas_size
        yy, xx = np.mgrid[0:r, 0:r].astype(np.float32)
        self._grid = (xx / r - 0.5, yy / r - 0.5)
        self._identity = lru_cache(maxsize=4096)(self._make_identity)
        self._texture = lru_cache(maxsize=1024)(self._make_texture)
        self._noise_bank: np.ndarray | None = None

    def _noise(self, rng: np.random.Generator) -> np.ndarray:
        """Unit Gaussian noise (S, S, 3): a random window of a fixed, seeded noise bank."""
        if self._noise_bank is None:
            bank_rng = np.random.default_rng([self.seed, 0x401])
            self._noise_bank = bank_rng.standard_normal((3 * self.image_size, 3 * self.image_size, 3), dtype=np.float32)
        s = self.image_size
        y, x = rng.integers(0, 2 * s, 2)
        window = self._noise_bank[y : y + s, x : x + s]
        return window if rng.uniform() < 0.5 else -window

    # -- identity ------------------------------------------------------------------------------
    def _make_identity(self, identity: int) -> _Identity:
        rng = np.random.default_rng([self.seed, int(identity), 0x1D])
        tone = rng.uniform(0, 1)
        skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * tone + rng.normal(0, 10, 3)
        hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.8, 1.15) + rng.normal(0, 8, 3)
        marks = np.column_stack(
            [rng.uniform(30, 82, 4), rng.uniform(45, 100, 4), rng.uniform(0.8, 2.2, 4), rng.uniform(0, 1, 4) < 0.5]
        )
        return _Identity(
            face_center=(56 + rng.normal(0, 1.0), 64 + rng.normal(0, 2.0)),
            face_axes=(rng.uniform(33, 42), rng.uniform(43, 54)),
            face_power=rng.uniform(1.7, 2.8),
            chin=rng.uniform(0.0, 0.35),
            skin=skin,
            texture_seed=int(rng.integers(2**31)),
            texture_amp=rng.uniform(6, 16),
            hair=hair,
            hairline=rng.uniform(18, 34),
            fringe=rng.uniform(-6, 10),
            fringe_phase=rng.uniform(0, 2 * np.pi),
            long_hair=bool(rng.uniform() < 0.4),
            bald=bool(rng.uniform() < 0.08),
            eye_offsets=_eye_offsets(rng),
            eye_size=(rng.uniform(6.5, 10.5), rng.uniform(2.6, 4.6)),
            iris=_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] + rng.normal(0, 10, 3),
            brow_gap=rng.uniform(7, 11),
            brow_thick=rng.uniform(1.5, 3.8),
            brow_angle=rng.uniform(-0.25, 0.25),
            nose_top=rng.uniform(54, 62),
            nose_width=rng.uniform(5.5, 11),
            mouth_scale=rng.uniform(0.8, 1.12),
            lip_thick=rng.uniform(1.8, 5.0),
            lip=skin * np.array([0.85, 0.55, 0.55]) + rng.normal(0, 10, 3),
            marks=marks,
            beard=bool(rng.uniform() < 0.22),
            glasses=int(rng.integers(3)) if rng.uniform() < 0.18 else -1,
            glasses_colour=rng.uniform(0, 120, 3),
        )

    def _make_texture(self, identity: int) -> np.ndarray:
        ident = self._identity(identity)
        rng = np.random.default_rng(ident.texture_seed)
        r = self.canvas_size
        coarse = cv2.resize(rng.normal(0, 1, (7, 7)).astype(np.float32), (r, r), interpolation=cv2.INTER_CUBIC)
        fine = cv2.resize(rng.normal(0, 0.5, (28, 28)).astype(np.float32), (r, r), interpolation=cv2.INTER_LINEAR)
        return (coarse + fine) * np.float32(ident.texture_amp)

    # -- rendering -----------------------------------------------------------------------------
    def render(self, identity: int, sample: int, degradation: float | None = None) -> tuple[np.ndarray, float]:
        """Aligned RGB uint8 (S, S, 3) image and its ground-truth quality in [0, 1].

        ``degradation=None`` draws it from the sample's random stream (see ``degraded_fraction``).
        """
        out = self.render_sample(identity, sample, degradation)
        return out.image, out.quality

    def render_sample(self, identity: int, sample: int, degradation: float | None = None) -> SyntheticSample:
        """Like :meth:`render`, also returning the 5 landmarks and the degradation used."""
        rng = np.random.default_rng([self.seed, int(identity), int(sample), 0x5A])
        if degradation is None:
            heavy = rng.uniform() < self.degraded_fraction
            degradation = rng.uniform(0.5, 1.0) if heavy else rng.uniform(0.0, 0.2)
        else:
            rng.uniform(), rng.uniform()  # keep the nuisance stream independent of the choice
        degradation = float(np.clip(degradation, 0.0, 1.0))
        ident = self._identity(int(identity))
        image, landmarks = self._draw(ident, int(identity), rng)
        image, quality = self._degrade(image, degradation, rng)
        return SyntheticSample(image, quality, landmarks, degradation)

    def _draw(self, ident: _Identity, identity: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        r, k, nu = self.canvas_size, self.scale, self.nuisance
        gx, gy = self._grid
        # background: colour, gradient and blotches
        base = rng.uniform(20, 235, 3)
        angle = rng.uniform(0, 2 * np.pi)
        amount = rng.uniform(0, 90)
        ramp = gx * float(np.cos(angle) * amount) + gy * float(np.sin(angle) * amount)
        blotch = rng.normal(0, 25, (4, 4, 3)) + base
        canvas = cv2.resize(blotch.astype(np.float32), (r, r), interpolation=cv2.INTER_LINEAR)
        canvas = cv2.add(canvas, cv2.merge([ramp, ramp, ramp]))
        canvas = np.clip(canvas, 0, 255).astype(np.uint8)
        mask = np.zeros((r, r), np.uint8)

        yaw = rng.normal(0, 1.0) * nu
        smile = rng.uniform(-1, 1) * nu
        open_mouth = rng.uniform() < 0.15 * nu
        eye_open = 0.08 if rng.uniform() < 0.04 * nu else float(np.clip(1 + rng.normal(0, 0.15) * nu, 0.4, 1.2))
        brow_raise = rng.normal(0, 1.2) * nu
        cx, cy = ident.face_center
        ax, ay = ident.face_axes
        hair, skin = _colour(ident.hair), _colour(ident.skin)

        if ident.long_hair and not ident.bald:
            cv2.ellipse(canvas, (_c(cx * k), _c((cy + 12) * k)), (_c((ax + 9) * k), _c((ay + 10) * k)), 0, 0, 360,
                        hair, -1, cv2.LINE_AA, _SHIFT)
        neck = np.array([[cx - 15, cy + 30], [cx + 15, cy + 30], [cx + 18, 112], [cx - 18, 112]]) * k
        cv2.fillPoly(canvas, [_pts(neck)], _colour(ident.skin * 0.8), cv2.LINE_AA, _SHIFT)
        for side in (-1, 1):
            cv2.ellipse(canvas, (_c((cx + side * ax * 0.97) * k), _c((cy + 2) * k)), (_c(5 * k), _c(9 * k)), 0, 0, 360,
                        _colour(ident.skin * 0.93), -1, cv2.LINE_AA, _SHIFT)
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        c, s = np.cos(t), np.sin(t)
        p = 2.0 / ident.face_power
        rx = ax * np.sign(c) * np.abs(c) ** p * (1 - ident.chin * np.clip(s, 0, 1) ** 2)
        ry = ay * np.sign(s) * np.abs(s) ** p
        face = np.column_stack([cx + rx, cy + ry]) * k
        cv2.fillPoly(canvas, [_pts(face)], skin, cv2.LINE_AA, _SHIFT)
        cv2.fillPoly(mask, [_pts(face)], 255, cv2.LINE_8, _SHIFT)
        if not ident.bald:
            top = np.linspace(np.pi, 2 * np.pi, 24)
            arc = np.column_stack([cx + (ax + 3) * np.cos(top), cy - 2 + (ay + 6) * np.sin(top)])
            xs = np.linspace(cx + ax + 3, cx - ax - 3, 16)
            wave = ident.fringe * np.sin((xs - cx) / ax * 2.2 + ident.fringe_phase)
            line = np.column_stack([xs, ident.hairline + wave + 0.25 * np.abs(xs - cx)])
            cv2.fillPoly(canvas, [_pts(np.vstack([arc, line]) * k)], hair, cv2.LINE_AA, _SHIFT)

        # landmarks in the canonical frame, before the pose warp
        lm = ARCFACE_TEMPLATE.astype(np.float64).copy()
        lm[0:2] += ident.eye_offsets
        lm[0:2, 0] += 0.8 * yaw
        lm[2, 0] += 2.0 * yaw
        lm[3:5, 0] += 1.5 * yaw
        mouth_mid = lm[3:5].mean(0)
        lm[3:5] = mouth_mid + (lm[3:5] - mouth_mid) * (ident.mouth_scale + 0.06 * smile)

        # eyes and brows
        ew, eh = ident.eye_size
        for (ex, ey), side in zip(lm[0:2], (-1, 1)):
            h = max(eh * eye_open, 0.5)
            cv2.ellipse(canvas, (_c(ex * k), _c(ey * k)), (_c(ew * k), _c(h * k)), 0, 0, 360, (245, 245, 240), -1,
                        cv2.LINE_AA, _SHIFT)
            if eye_open > 0.2:
                cv2.circle(canvas, (_c(ex * k), _c(ey * k)), _c(min(h, eh * 0.9) * k), _colour(ident.iris), -1,
                           cv2.LINE_AA, _SHIFT)
                cv2.circle(canvas, (_c(ex * k), _c(ey * k)), _c(min(h, eh) * 0.4 * k), (15, 15, 15), -1, cv2.LINE_AA,
                           _SHIFT)
            cv2.ellipse(canvas, (_c(ex * k), _c(ey * k)), (_c(ew * k), _c(h * k)), 0, 180, 360,
                        _colour(ident.skin * 0.45), max(1, int(round(k))), cv2.LINE_AA, _SHIFT)
            by = ey - ident.brow_gap - brow_raise
            slope = ident.brow_angle * side
            brow = np.array([[ex - side * ew * 1.1, by + slope * ew], [ex, by - 1.2], [ex + side * ew * 1.2, by - slope * ew]])
            cv2.polylines(canvas, [_pts(brow * k)], False, _colour(ident.hair * 0.7), max(1, int(round(ident.brow_thick * k))),
                          cv2.LINE_AA, _SHIFT)

        # nose
        nx, ny = lm[2]
        shade = _colour(ident.skin * 0.72)
        bridge = np.array([[nx - 0.5 * yaw, ident.nose_top], [nx - 1.5, ny - 2], [nx, ny + 1]])
        cv2.polylines(canvas, [_pts(bridge * k)], False, shade, max(1, int(round(1.2 * k))), cv2.LINE_AA, _SHIFT)
        for side in (-1, 1):
            cv2.ellipse(canvas, (_c((nx + side * ident.nose_width * 0.45) * k), _c((ny + 2) * k)),
                        (_c(1.9 * k), _c(1.2 * k)), 0, 0, 360, _colour(ident.skin * 0.45), -1, cv2.LINE_AA, _SHIFT)

        # mouth
        (mlx, mly), (mrx, mry) = lm[3], lm[4]
        xs = np.linspace(0, 1, 9)
        curve = -smile * 3.0 * (1 - (2 * xs - 1) ** 2)
        upper = np.column_stack([mlx + (mrx - mlx) * xs, mly + (mry - mly) * xs + curve - ident.lip_thick * 0.5 * (1 - (2 * xs - 1) ** 2)])
        gap = 3.5 if open_mouth else 0.0
        lower = np.column_stack([mlx + (mrx - mlx) * xs, mly + (mry - mly) * xs + curve + (ident.lip_thick + gap) * (1 - (2 * xs - 1) ** 2)])
        cv2.fillPoly(canvas, [_pts(np.vstack([upper, lower[::-1]]) * k)], _colour(ident.lip), cv2.LINE_AA, _SHIFT)
        if open_mouth:
            cv2.ellipse(canvas, (_c((mlx + mrx) / 2 * k), _c(((mly + mry) / 2 + curve[4] + 1.5) * k)),
                        (_c(abs(mrx - mlx) * 0.35 * k), _c(1.6 * k)), 0, 0, 360, (50, 20, 20), -1, cv2.LINE_AA, _SHIFT)
        cv2.polylines(canvas, [_pts(np.column_stack([mlx + (mrx - mlx) * xs, (mly + mry) / 2 + curve]) * k)], False,
                      _colour(ident.lip * 0.6), 1, cv2.LINE_AA, _SHIFT)

        if ident.beard:
            jaw = face[(face[:, 1] > (lm[2, 1] + 6) * k)]
            jaw = jaw[np.argsort(np.arctan2(jaw[:, 1] - cy * k, jaw[:, 0] - cx * k))]
            upper_lip = np.array([[mrx + 2, mry - 4], [mlx - 2, mly - 4]]) * k
            beard = np.vstack([jaw, upper_lip])
            cv2.fillPoly(canvas, [_pts(beard)], _colour(ident.hair * 0.9 + 10), cv2.LINE_AA, _SHIFT)
            cv2.fillPoly(canvas, [_pts(np.vstack([upper, lower[::-1]]) * k)], _colour(ident.lip), cv2.LINE_AA, _SHIFT)
        for mx, my, mr, dark in ident.marks:
            if dark:
                cv2.circle(canvas, (_c(mx * k), _c(my * k)), _c(mr * k), _colour(ident.skin * 0.4), -1, cv2.LINE_AA, _SHIFT)
        if ident.glasses >= 0 and rng.uniform() > 0.25:
            colour = _colour(ident.glasses_colour)
            for ex, ey in lm[0:2]:
                if ident.glasses == 0:
                    cv2.circle(canvas, (_c(ex * k), _c(ey * k)), _c(ew * 1.35 * k), colour, max(1, int(round(1.3 * k))),
                               cv2.LINE_AA, _SHIFT)
                else:
                    w, h = ew * 1.45, ew * (0.9 if ident.glasses == 1 else 1.15)
                    box = np.array([[ex - w, ey - h], [ex + w, ey - h], [ex + w, ey + h], [ex - w, ey + h]]) * k
                    cv2.polylines(canvas, [_pts(box)], True, colour, max(1, int(round(1.3 * k))), cv2.LINE_AA, _SHIFT)
            bridge = np.array([[lm[0, 0] + ew * 1.3, lm[0, 1]], [lm[1, 0] - ew * 1.3, lm[1, 1]]]) * k
            cv2.polylines(canvas, [_pts(bridge)], False, colour, max(1, int(round(1.3 * k))), cv2.LINE_AA, _SHIFT)

        # skin texture, lighting, colour cast
        img = canvas.astype(np.float32)
        texture = self._texture(identity) * (mask * np.float32(1 / 255))
        img += texture[..., None]
        light_angle = rng.uniform(0, 2 * np.pi)
        amount = rng.uniform(0, 0.7) * nu
        light = gx * float(np.cos(light_angle) * amount) + gy * float(np.sin(light_angle) * amount) + np.float32(1)
        gain = rng.uniform(1 - 0.25 * nu, 1 + 0.15 * nu) * (1 + rng.normal(0, 0.04 * nu, 3))
        img = cv2.multiply(img, cv2.merge([light * float(gain[0]), light * float(gain[1]), light * float(gain[2])]))

        # pose: rotation, scale and shift about the eye centre
        centre = lm[0:2].mean(0) * k
        roll = float(np.clip(rng.normal(0, 3.0), -7, 7)) * nu
        zoom = 1 + float(np.clip(rng.normal(0, 0.03), -0.07, 0.07)) * nu
        rot = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), roll, zoom)
        rot[:, 2] += np.clip(rng.normal(0, 1.2, 2), -3, 3) * nu * k
        img = cv2.warpAffine(img, rot, (r, r), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        lm = (np.column_stack([lm * k, np.ones(5)]) @ rot.T) / k
        if r != self.image_size:
            img = cv2.resize(img, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
        lm = lm * (self.image_size / 112.0)
        return img, lm.astype(np.float32)

    def _degrade(self, img: np.ndarray, d: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        s = self.image_size
        strength = d * rng.uniform(0.6, 1.0, 4)  # blur, low resolution, noise, jpeg
        occluded = 0.0
        if rng.uniform() < d * 0.8:
            kind = rng.integers(3)
            w = s * rng.uniform(0.3, 0.3 + 0.4 * d)
            h = s * rng.uniform(0.12, 0.12 + 0.2 * d)
            x0 = rng.uniform(0.1 * s, 0.9 * s - w) if w < 0.8 * s else 0.1 * s
            y0 = {0: 0.4 * s, 1: 0.75 * s, 2: rng.uniform(0.2 * s, 0.8 * s)}[int(kind)] - h / 2
            colour = rng.uniform(0, 255, 3).astype(np.float32)
            x1, y1 = int(round(x0)), int(round(y0))
            x2, y2 = int(round(x0 + w)), int(round(y0 + h))
            img[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = colour
            face_w, face_h = 0.7 * s, 0.85 * s
            occluded = float(np.clip((x2 - x1) * (y2 - y1) / (face_w * face_h), 0, 0.4))
        sigma = strength[0] * 2.5 * s / 112
        if sigma > 0.3:
            img = cv2.GaussianBlur(img, (0, 0), sigma)
        low = 1 - 0.75 * strength[1]
        if low < 0.95:
            side = max(8, int(round(s * low)))
            img = cv2.resize(cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA), (s, s),
                             interpolation=cv2.INTER_LINEAR)
        if strength[2] > 0.05:
            img = img + self._noise(rng) * np.float32(25 * strength[2])
        out = cv2.convertScaleAbs(np.maximum(img, 0))
        if strength[3] > 0.1:
            quality = int(round(95 - 85 * strength[3]))
            out = cv2.imdecode(cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_UNCHANGED)
        components = np.array([strength[0], strength[1], strength[2], strength[3], occluded])
        q = float(np.clip(np.prod(1 - _QUALITY_WEIGHTS * components), 0.0, 1.0))
        return out, q


def _encode(image_rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


_worker_generator: SyntheticFaces | None = None


def _init_worker(gen_args: tuple) -> None:
    global _worker_generator
    num, seed, size, fraction = gen_args
    _worker_generator = SyntheticFaces(num, seed=seed, image_size=size, degraded_fraction=fraction)


def _init_pool_worker(gen_args: tuple) -> None:
    cv2.setNumThreads(1)
    _init_worker(gen_args)


def _render_identity(task: tuple[int, int]) -> list[tuple[bytes, float]]:
    identity, count = task
    out = []
    for sample in range(count):
        image, quality = _worker_generator.render(identity, sample)
        out.append((_encode(image), quality))
    return out


def _worker_count(num_workers: int | None, num_images: int) -> int:
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, 8)
    return 1 if num_images < 500 else max(1, int(num_workers))


@contextmanager
def _render_pool(gen_args: tuple, workers: int):
    """Yields ``render_many(tasks)``: an ordered iterator of per-identity renders."""
    if workers <= 1:
        _init_worker(gen_args)
        yield lambda tasks: map(_render_identity, tasks)
        return
    # spawn, not fork: a child forked after the parent used OpenCV's or torch's thread pools can hang
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_pool_worker, initargs=(gen_args,)) as pool:
        yield lambda tasks: pool.imap(_render_identity, tasks, chunksize=4)


_META = "synthetic.json"
_OUTPUTS = ("train.rec", "train.idx", "property", "quality.npy", "val.bin", _META)


def make_synthetic_dataset(
    out_dir: str,
    num_identities: int,
    images_per_identity: int = 20,
    *,
    val_identities: int = 100,
    val_pairs: int = 600,
    image_size: int = 112,
    degraded_fraction: float = 0.2,
    long_tail: bool = False,
    seed: int = 0,
    write_folders: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    num_workers: int | None = None,
) -> str:
    """Write a synthetic dataset to ``out_dir`` and return ``out_dir``.

    Files: ``train.rec``/``train.idx``/``property`` (InsightFace layout, identities
    ``0..num_identities-1``), ``quality.npy`` (float32 ground-truth quality aligned with the image
    keys 1..N), ``val.bin`` (``val_pairs`` pairs of the held-out identities
    ``num_identities..num_identities+val_identities-1``, half genuine, half impostor) and
    ``synthetic.json`` (the parameters). With ``write_folders`` also ``images/<id>/<n>.jpg``.
    Rendering runs in ``num_workers`` processes (default: CPU count, at most 8); the output does
    not depend on it.
    A complete dataset made with the same parameters is reused as it is; a different or partial
    one raises FileExistsError unless ``overwrite=True``.

    Every parameter is checked first (ValueError naming it). The dataset is rendered into a
    temporary sibling folder and swapped into ``out_dir`` only when complete, so a failed or
    interrupted run leaves an existing dataset as it was (see
    :func:`~protomem_plugin.data.packing.staged_dataset_dir`); other files in ``out_dir`` are kept.
    """
    _check_parameters(num_identities=num_identities, images_per_identity=images_per_identity,
                      val_identities=val_identities, val_pairs=val_pairs, image_size=image_size,
                      degraded_fraction=degraded_fraction, seed=seed, num_workers=num_workers)
    params = dict(
        num_identities=int(num_identities), images_per_identity=int(images_per_identity),
        val_identities=int(val_identities), val_pairs=int(val_pairs), image_size=int(image_size),
        degraded_fraction=float(degraded_fraction), long_tail=bool(long_tail), seed=int(seed),
        write_folders=bool(write_folders), version=1,
    )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    if _existing_params(out_dir) == params and not overwrite:
        return out_dir
    present = [n for n in _OUTPUTS + ("images",) if os.path.exists(os.path.join(out_dir, n))]
    if present and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {', '.join(present)} made with other parameters or incomplete; "
            "pass overwrite=True (--overwrite) to replace it"
        )
    with staged_dataset_dir(out_dir, replaced=_OUTPUTS + ("images",)) as stage:
        _write_dataset(stage, params, progress=progress, num_workers=num_workers)
    return out_dir


def _check_parameters(**values) -> None:
    """Raise ValueError naming the first parameter of :func:`make_synthetic_dataset` that cannot work."""
    def integer(name: str, minimum: int) -> int:
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
        return int(value)

    integer("num_identities", 1)
    integer("images_per_identity", 1)
    val_pairs = integer("val_pairs", 0)
    val_identities = integer("val_identities", 0)
    if val_pairs % 2:
        raise ValueError(f"val_pairs must be even (half genuine, half impostor), got {val_pairs}")
    if val_pairs and val_identities < 2:
        raise ValueError(f"val_identities must be >= 2 when val_pairs > 0, got {val_identities}")
    integer("image_size", 16)
    integer("seed", 0)
    if values["num_workers"] is not None:
        integer("num_workers", 1)
    fraction = values["degraded_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"degraded_fraction must be a number in [0, 1], got {fraction!r}")


def _existing_params(out_dir: str) -> dict | None:
    """The parameters of a complete synthetic dataset in ``out_dir``, else None."""
    if not all(os.path.exists(os.path.join(out_dir, n)) for n in _OUTPUTS):
        return None
    try:
        with open(os.path.join(out_dir, _META)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta.get("params") if isinstance(meta, dict) else None


def _write_dataset(out_dir: str, params: dict, *, progress: bool, num_workers: int | None) -> None:
    """Render and write every file of a synthetic dataset into the (empty) folder ``out_dir``."""
    num_identities, images_per_identity = params["num_identities"], params["images_per_identity"]
    val_identities, val_pairs = params["val_identities"], params["val_pairs"]
    image_size, degraded_fraction, seed = params["image_size"], params["degraded_fraction"], params["seed"]
    long_tail, write_folders = params["long_tail"], params["write_folders"]
    meta_path = os.path.join(out_dir, _META)
    gen = SyntheticFaces(num_identities + val_identities, seed=seed, image_size=image_size,
                         degraded_fraction=degraded_fraction)
    counts = identity_image_counts(num_identities, images_per_identity, long_tail=long_tail, seed=seed)
    qualities = np.zeros(int(counts.sum()), dtype=np.float32)
    folders = os.path.join(out_dir, "images") if write_folders else None

    gen_args = (num_identities + val_identities, seed, image_size, degraded_fraction)
    workers = _worker_count(num_workers, int(counts.sum()))

    def samples():
        n = 0
        tasks = [(identity, count) for identity, count in enumerate(counts.tolist())]
        with _render_pool(gen_args, workers) as render_many:
            for (identity, count), rendered in zip(tasks, render_many(tasks)):
                for sample, (data, quality) in enumerate(rendered):
                    qualities[n] = quality
                    n += 1
                    if folders:
                        folder = os.path.join(folders, f"{identity:06d}")
                        os.makedirs(folder, exist_ok=True)
                        with open(os.path.join(folder, f"{sample:05d}.jpg"), "wb") as f:
                            f.write(data)
                    yield identity, data

    write_insightface_rec(out_dir, samples(), num_classes=num_identities, image_size=(image_size, image_size),
                          total=int(counts.sum()), progress=progress, desc="synthetic train")
    np.save(os.path.join(out_dir, "quality.npy"), qualities)

    rng = np.random.default_rng([seed, 0xB1])
    encoded, issame = [], []
    first_val = num_identities
    for pair in tqdm(range(val_pairs), desc="synthetic val", disable=not progress, unit="pair"):
        genuine = pair % 2 == 0
        a = first_val + int(rng.integers(val_identities))
        b = a if genuine else first_val + (a - first_val + 1 + int(rng.integers(val_identities - 1))) % val_identities
        for identity, sample in ((a, 100_000 + 2 * pair), (b, 100_001 + 2 * pair)):
            encoded.append(_encode(gen.render(identity, sample)[0]))
        issame.append(genuine)
    write_bin(os.path.join(out_dir, "val.bin"), encoded, issame)
    with open(meta_path, "w") as f:
        json.dump({"params": params, "num_images": int(counts.sum()),
                   "images_per_identity": counts.tolist()}, f)
