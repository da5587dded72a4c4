"""ONNX export of recognition backbones, in the form insightface's ``ArcFaceONNX`` expects.

Contract: one input named ``data`` of shape (batch, 3, 112, 112) with a dynamic batch, one
output (batch, D), no Sub/Mul preprocessing at the head of the graph. The model takes RGB
normalised as ``(x/255 - 0.5)/0.5``; insightface then feeds it with mean = std = 127.5 and
swaps BGR -> RGB itself, so ``ArcFaceONNX.get_feat(bgr_image)`` equals the PyTorch model on the
RGB image.
"""

from __future__ import annotations

import argparse
import copy
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
IMAGE_SIZE = 112
DEFAULT_OPSET = 17
HEAD_NODES = 8  # insightface inspects the first 8 nodes for mxnet-style Sub/Mul preprocessing


class OnnxContractError(ValueError):
    """An ONNX file does not follow the recognition-model contract."""


def export_onnx(
    model: nn.Module, path: str | Path, opset: int = DEFAULT_OPSET, image_size: int = IMAGE_SIZE
) -> Path:
    """Export ``model`` (float32, eval mode, on CPU) to ``path`` and check the result.

    Uses PyTorch's TorchScript-based exporter, which writes a plain graph with the input name
    and dynamic batch axis the contract needs. Raises :class:`OnnxContractError` if the graph
    breaks the contract.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).float().cpu().eval()
    if hasattr(model, "fp16"):
        model.fp16 = False  # export the float32 graph; autocast regions do not trace to ONNX
    dummy = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buffer = io.BytesIO()
        torch.onnx.export(
            model,
            (dummy,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    path.write_bytes(buffer.getvalue())
    check_onnx_model(path, image_size=image_size)
    return path


def check_onnx_model(path: str | Path, image_size: int = IMAGE_SIZE) -> None:
    """``onnx.checker`` plus the recognition-model contract; raises OnnxContractError naming the file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise OnnxContractError(f"{path}: onnx.checker rejects the model: {err}") from None
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise OnnxContractError(f"{path}: expected one input named {INPUT_NAME!r}, got {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    static = [d.dim_value for d in dims[1:]]
    if len(dims) != 4 or not dims[0].dim_param or static != [3, image_size, image_size]:
        shape = [d.dim_param or d.dim_value for d in dims]
        raise OnnxContractError(
            f"{path}: input shape {shape}, expected (dynamic batch, 3, {image_size}, {image_size})"
        )
    if len(graph.output) != 1:
        raise OnnxContractError(f"{path}: expected one output, got {[o.name for o in graph.output]}")
    head = graph.node[:HEAD_NODES]
    ops = {n.op_type for n in head}
    names = [n.name for n in head]
    if {"Sub", "Mul"} <= ops or (
        any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul")) for n in names)
    ):
        raise OnnxContractError(
            f"{path}: Sub/Mul nodes at the head of the graph; insightface would treat the model as "
            "taking raw 0..255 input (mean 0, std 1)"
        )


def onnxruntime_parity(model: nn.Module, path: str | Path, batch_sizes: tuple[int, ...] = (1, 8), seed: int = 0) -> dict:
    """Max abs difference between PyTorch and onnxruntime outputs on random inputs, per batch size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = copy.deepcopy(model).float().cpu().eval()
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for batch in batch_sizes:
        x = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(None, {INPUT_NAME: x.numpy()})[0]
        if got.shape != expected.shape:
            raise OnnxContractError(f"{path}: output shape {got.shape} for batch {batch}, PyTorch gives {expected.shape}")
        result[batch] = float(np.max(np.abs(got - expected)))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protomem-export", description="Export an arcface_torch backbone (model.pt) to ONNX for insightface."
    )
    parser.add_argument("--network", required=True, help="backbone name, e.g. r50, r100, mbf")
    parser.add_argument("--weights", required=True, help="backbone state_dict (arcface_torch output/model.pt)")
    parser.add_argument("--output", required=True, help="ONNX file to write")
    parser.add_argument("--num-features", type=int, default=512, help="embedding size (default 512)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``protomem-export``."""
    args = build_parser().parse_args(argv)
    from protomem_plugin.eval.embedders import load_backbone

    model = load_backbone(args.network, args.weights, args.num_features)
    path = export_onnx(model, args.output, opset=args.opset)
    parity = onnxruntime_parity(model, path)
    print(f"wrote {path} (input {INPUT_NAME!r}: batch x 3 x {IMAGE_SIZE} x {IMAGE_SIZE}, opset {args.opset})")
    for batch, diff in parity.items():
        print(f"onnxruntime vs PyTorch, batch {batch}: max abs difference {diff:.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
