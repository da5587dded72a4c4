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


_SENTINEL_FEATURES = 1009  # a prime no backbone uses as a channel count


def _feature_sized_entries(network: str) -> dict[str, int]:
    """``{state_dict key: axis}`` of the ``network`` tensors whose size is ``num_features``.

    Found by building the network on the meta device (no memory, no initialisation cost) with a
    sentinel embedding size and looking for it in the shapes.
    """
    from protomem_plugin.backbones import get_model

    with torch.device("meta"):
        state = get_model(network, num_features=_SENTINEL_FEATURES).state_dict()
    return {key: list(t.shape).index(_SENTINEL_FEATURES) for key, t in state.items() if _SENTINEL_FEATURES in t.shape}


def infer_num_features(network: str, state: dict) -> int | None:
    """The embedding size a ``network`` state_dict was trained with (the size of its last layer,
    e.g. ``features`` BatchNorm / ``fc.weight.shape[0]``), or None if the state_dict does not say."""
    sizes = set()
    for key, axis in _feature_sized_entries(network).items():
        tensor = state.get(key)
        if isinstance(tensor, torch.Tensor) and tensor.dim() > axis:
            sizes.add(int(tensor.shape[axis]))
    return sizes.pop() if len(sizes) == 1 else None


def read_state_dict(weights: str | Path) -> dict:
    """A backbone state_dict from a file (arcface_torch ``model.pt``, or a checkpoint holding
    ``state_dict_backbone``); a DDP ``module.`` prefix is stripped. Raises FileNotFoundError or
    ValueError naming the file."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"backbone weights not found: {weights}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{weights}: not a PyTorch state_dict file ({first_line})") from None
    if isinstance(state, dict) and "state_dict_backbone" in state:
        state = state["state_dict_backbone"]
    if not isinstance(state, dict):
        raise ValueError(f"{weights}: expected a backbone state_dict, got {type(state).__name__}")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def _mismatch(weights: Path, network: str, num_features: int, model: nn.Module, state: dict) -> str:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            parts.append(f"{len(keys)} {label} key(s) (e.g. {keys[0]})")
    return f"{weights}: does not match backbone {network!r} (num_features={num_features}): {'; '.join(parts)}"


def load_backbone(network: str, weights: str | Path, num_features: int | None = None) -> nn.Module:
    """Build ``network`` with ``protomem_plugin.backbones.get_model`` and load a plain state_dict.

    Accepts arcface_torch's ``model.pt`` (a backbone state_dict); a ``module.`` prefix from a DDP
    checkpoint is stripped. ``num_features=None`` (default) takes the embedding size from the
    weights; a given one that contradicts the weights raises ValueError naming both sizes.
    """
    from protomem_plugin.backbones import get_model

    state = read_state_dict(weights)
    inferred = infer_num_features(network, state)
    if num_features is None:
        num_features = inferred if inferred is not None else 512
    elif inferred is not None and inferred != num_features:
        raise ValueError(
            f"{weights}: the weights give {inferred}-d embeddings but num_features (--num-features) is "
            f"{num_features}; leave it out to use {inferred}"
        )
    model = get_model(network, num_features=num_features)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise ValueError(_mismatch(Path(weights), network, num_features, model, state)) from None
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
    num_features: int | None = None,
    device: str = "cpu",
) -> Embedder:
    """An embedder from either ``network`` + ``weights`` or an ``onnx_path``.

    ``num_features`` (backbone weights only): None takes the embedding size from the weights.
    """
    if (onnx_path is None) == (weights is None):
        raise ValueError("give either an ONNX file or backbone weights (with a network name), not both")
    if onnx_path is not None:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        return OnnxEmbedder(onnx_path, providers=providers)
    if network is None:
        raise ValueError("backbone weights need a network name (for example r50)")
    return TorchEmbedder(load_backbone(network, weights, num_features), device=device)
