"""mxnet-free stand-ins for the two arcface_torch modules that import mxnet (and torchvision).

arcface_torch's ``dataset.py`` imports mxnet and torchvision at the top, and ``eval/verification.py``
imports mxnet; ``train_v2.py`` imports both, so without mxnet no job starts. When one of them fails
to import for that reason, the hook registers a module of ours under its name:

* ``dataset``: ``get_dataloader`` with arcface_torch's signature (see :mod:`.loaders`);
* ``eval.verification``: ``load_bin(path, image_size)`` and
  ``test(data_set, backbone, batch_size, nfolds) -> (acc1, std1, acc2, std2, xnorm, embeddings_list)``
  as arcface_torch's callback calls them, computed with our verification protocol
  (:mod:`protomem_plugin.eval.verification`; ``acc1`` without, ``acc2`` with the flipped image).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..data.binsets import load_bin as _load_bin_images
from ..eval.verification import embed_images, verification_accuracy

__all__ = ["MXNET_FREE_MISSING", "dataset_module", "import_or_none", "verification_module"]

#: Missing modules for which the hook substitutes ours.
MXNET_FREE_MISSING = ("mxnet", "torchvision")


def import_or_none(name: str) -> tuple[types.ModuleType | None, str | None]:
    """``(module, None)``, or ``(None, missing)`` when it fails only because mxnet/torchvision is absent."""
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if root in MXNET_FREE_MISSING:
            return None, root
        raise


def dataset_module(get_dataloader: Callable) -> types.ModuleType:
    """A ``dataset`` module offering ``get_dataloader``."""
    module = types.ModuleType("dataset", "protomem's mxnet-free replacement of arcface_torch's dataset.py")
    module.get_dataloader = get_dataloader
    sys.modules["dataset"] = module
    return module


def load_bin(path: str, image_size=(112, 112)) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB images (2N, H, W, 3) and the N pair flags of a ``.bin`` set."""
    return _load_bin_images(str(path), tuple(image_size))


@torch.no_grad()
def test(data_set, backbone: nn.Module, batch_size: int, nfolds: int = 10):
    """arcface_torch's verification call: accuracies without and with flip, mean norm, embeddings."""
    images, issame = data_set
    device = next(backbone.parameters()).device
    plain, mirrored = embed_images(backbone, images, batch_size=max(int(batch_size), 1), device=device)
    acc1, std1, _ = verification_accuracy(plain, issame, nfolds)
    acc2, std2, _ = verification_accuracy(plain + mirrored, issame, nfolds)
    xnorm = float(np.mean(np.linalg.norm(np.concatenate([plain, mirrored]), axis=1)))
    return acc1, std1, acc2, std2, xnorm, [plain, mirrored]


def verification_module() -> types.ModuleType:
    """Register ``eval.verification`` (under the checkout's ``eval`` package) as ours."""
    module = types.ModuleType("eval.verification", "protomem's mxnet-free replacement of eval/verification.py")
    module.load_bin = load_bin
    module.test = test
    package = importlib.import_module("eval")
    sys.modules["eval.verification"] = module
    package.verification = module
    return module
