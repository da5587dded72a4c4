"""Face embedders for evaluation: a PyTorch backbone or an ONNX file through insightface.

Both take batches of aligned 112x112 **BGR** uint8 images (as read by OpenCV) and return
float32 embeddings, so the evaluation code does not care which one runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn


class Embedder(Protocol):
    """Maps (B, H, W, 3) uint8 BGR aligned faces to (B, D) float32 embeddings."""

    def __call__(self, images_bgr: np.ndarray) -> np.ndarray: ...


def bgr_to_input(images_bgr: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 BGR -> (B, 3, H, W) float RGB normalised as ``(x/255 - 0.5)/0.5``."""
    rgb = np.ascontiguousarray(images_bgr[..., ::-1])
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()
    return x.div_(255.0).sub_(0.5).div_(0.5)


class TorchEmbedder:
    """Runs an arcface_torch-style backbone (NCHW RGB input normalised to [-1, 1])."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, images_bgr: np.ndarray) -> np.ndarray:
        x = bgr_to_input(images_bgr).to(self.device)
        return self.model(x).float().cpu().numpy()


def load_backbone(network: str, weights: str | Path, num_features: int = 512) -> nn.Module:
    """Build ``network`` with ``protomem_plugin.backbones.get_model`` and load a plain state_dict.

    Accepts arcface_torch's ``model.pt`` (a backbone state_dict); a ``module.`` prefix from a DDP
    checkpoint is stripped.
    """
    from protomem_plugin.backbones import get_model

    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"backbone weights not found: {weights}")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict_backbone" in state:
        state = state["state_dict_backbone"]
    if not isinstance(state, dict):
        raise ValueError(f"{weights}: expected a backbone state_dict, got {type(state).__name__}")
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    model = get_model(network, num_features=num_features)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights}: does not match backbone {network!r} (num_features={num_features}): {err}") from None
    return model.eval()


def check_single_output(onnx_path: str | Path) -> None:
    """Raise ValueError unless the ONNX graph has exactly one input and one output."""
    import onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    outputs = [o.name for o in graph.output]
    if len(outputs) != 1:
        raise ValueError(f"{onnx_path}: a recognition model needs exactly one output, found {len(outputs)}: {outputs}")
    if len(inputs) != 1:
        raise ValueError(f"{onnx_path}: a recognition model needs exactly one input, found {len(inputs)}: {inputs}")


class OnnxEmbedder:
    """Runs an ONNX recognition model through insightface's ``ArcFaceONNX`` (onnxruntime).

    insightface chooses the input normalisation from the graph (mean = std = 127.5 unless the
    graph starts with Sub/Mul nodes) and swaps BGR -> RGB itself.
    """

    def __init__(self, onnx_path: str | Path, providers: list[str] | None = None):
        from insightface.model_zoo import get_model
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX

        check_single_output(onnx_path)
        kwargs = {"providers": providers} if providers else {"providers": ["CPUExecutionProvider"]}
        model = get_model(str(onnx_path), **kwargs)
        if not isinstance(model, ArcFaceONNX):
            raise ValueError(
                f"{onnx_path}: insightface does not load it as a recognition model (got {type(model).__name__}); "
                "expected input 1x3xSxS with S >= 112 and a multiple of 16"
            )
        self.model = model

    def __call__(self, images_bgr: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.get_feat(list(images_bgr)), dtype=np.float32)


def make_embedder(
    network: str | None = None,
    weights: str | Path | None = None,
    onnx_path: str | Path | None = None,
    num_features: int = 512,
    device: str = "cpu",
) -> Embedder:
    """An embedder from either ``network`` + ``weights`` or an ``onnx_path``."""
    if (onnx_path is None) == (weights is None):
        raise ValueError("give either an ONNX file or backbone weights (with a network name), not both")
    if onnx_path is not None:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        return OnnxEmbedder(onnx_path, providers=providers)
    if network is None:
        raise ValueError("backbone weights need a network name (for example r50)")
    return TorchEmbedder(load_backbone(network, weights, num_features), device=device)
