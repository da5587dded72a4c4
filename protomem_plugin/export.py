"""ONNX export of recognition backbones, in the form insightface's ``ArcFaceONNX`` expects.

Contract: one input named ``data`` of shape (batch, 3, 112, 112) with a dynamic batch, one
output (batch, D), no Sub/Mul preprocessing at the head of the graph. The model takes RGB
normalised as ``(x/255 - 0.5)/0.5``; insightface then feeds it with mean = std = 127.5 and
swaps BGR -> RGB itself, so ``ArcFaceONNX.get_feat(bgr_image)`` equals the PyTorch model on the
RGB image.

ONNX has no adaptive average pool whose output size does not divide its input size (``tiny``
pools its 7x7 map at 112x112 to 4x4): for the export such a pool is replaced by the same average
written as two constant matrix products for the contract's fixed input size (exact, checked by
the onnxruntime parity). An operator the exporter cannot convert raises :class:`OnnxContractError`
naming the network.

Models whose graph exceeds protobuf's 2 GiB limit (``r2060``, ``vit_h``) are written in ONNX's
external data format: the graph in ``<name>.onnx`` and the weights in one side file
``<name>.onnx.data`` next to it, which onnxruntime and insightface read from the same folder.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cli_errors import add_cli_arguments, cli_entry

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
IMAGE_SIZE = 112
DEFAULT_OPSET = 17
HEAD_NODES = 8  # insightface inspects the first 8 nodes for mxnet-style Sub/Mul preprocessing
EXTERNAL_DATA_SUFFIX = ".data"
EXTERNAL_DATA_MIN_BYTES = 1024  # smaller tensors stay inside the graph file


class OnnxContractError(ValueError):
    """An ONNX file does not follow the recognition-model contract."""


@contextlib.contextmanager
def _float32_cpu_eval(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode, float32 on CPU, with ``fp16`` off; the caller's model is left as it was.

    A model already float32 on CPU is used in place (its modes are restored afterwards), so a
    multi-GB backbone is not copied; any other is deep-copied and converted.
    """
    tensors = itertools.chain(model.parameters(), model.buffers())
    if not all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        converted = copy.deepcopy(model).float().cpu().eval()
        if hasattr(converted, "fp16"):
            converted.fp16 = False
        yield converted
        return
    modes = [(m, m.training) for m in model.modules()]
    fp16 = getattr(model, "fp16", None)
    model.eval()
    if fp16 is not None:
        model.fp16 = False  # export the float32 graph; autocast regions do not trace to ONNX
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        if fp16 is not None:
            model.fp16 = fp16


def _pool_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) averaging matrix of adaptive pooling along one axis (PyTorch's bins)."""
    matrix = torch.zeros(size_out, size_in)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class _FixedSizeAdaptiveAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d`` for one input size, as ``rows @ x @ cols`` (exportable to ONNX)."""

    def __init__(self, size_in: tuple[int, int], size_out: tuple[int, int]):
        super().__init__()
        self.register_buffer("rows", _pool_matrix(size_in[0], size_out[0]), persistent=False)
        self.register_buffer("cols", _pool_matrix(size_in[1], size_out[1]).t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows @ x @ self.cols


@contextlib.contextmanager
def _exportable_pools(model: nn.Module, image_size: int) -> Iterator[nn.Module]:
    """``model`` with every adaptive average pool whose output size does not divide its input
    size (at ``image_size`` input) replaced by :class:`_FixedSizeAdaptiveAvgPool2d`; restored after."""
    pools = {name: m for name, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)}
    if not pools:
        yield model
        return
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            sizes.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in pools.items()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    swapped = []
    for name, pool in pools.items():
        size_in = sizes.get(name)
        if size_in is None:
            continue
        out = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size, pool.output_size)
        size_out = tuple(i if o is None else int(o) for i, o in zip(size_in, out))
        if all(i % o == 0 for i, o in zip(size_in, size_out)):
            continue  # the exporter handles it
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, _FixedSizeAdaptiveAvgPool2d(size_in, size_out))
        swapped.append((parent, attr, pool))
    try:
        yield model
    finally:
        for parent, attr, pool in swapped:
            setattr(parent, attr, pool)


def export_onnx(
    model: nn.Module, path: str | Path, opset: int = DEFAULT_OPSET, image_size: int = IMAGE_SIZE,
    external_data: bool | None = None,
) -> Path:
    """Export ``model`` (as float32, eval mode, on CPU) to ``path`` and check the result.

    Uses PyTorch's TorchScript-based exporter, which writes a plain graph with the input name
    and dynamic batch axis the contract needs. ``external_data``: ``None`` writes the weights to
    the side file ``<path>.data`` only when the graph would exceed protobuf's 2 GiB limit, ``True``
    always, ``False`` never (a larger model then raises). A stale side file is removed. Raises
    :class:`OnnxContractError` if the graph breaks the contract.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    dummy = torch.zeros(1, 3, image_size, image_size)
    with _float32_cpu_eval(model) as ready, _exportable_pools(ready, image_size) as ready, \
            tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        staged = Path(tmp) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # given a file name, the exporter writes one file per tensor beside it above 2 GiB
            try:
                torch.onnx.export(
                    ready,
                    (dummy,),
                    str(staged),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
            except torch.onnx.errors.OnnxExporterError as err:
                first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise OnnxContractError(
                    f"{type(model).__name__} cannot be exported to ONNX (opset {opset}): {first_line}") from None
        too_large = any(p != staged for p in Path(tmp).iterdir())
        if too_large and external_data is False:
            raise OnnxContractError(f"{path}: the graph exceeds protobuf's 2 GiB limit; export with external data")
        data_path.unlink(missing_ok=True)
        if too_large or external_data:
            graph = onnx.load(str(staged))
            onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_path.name, size_threshold=EXTERNAL_DATA_MIN_BYTES)
            del graph
        else:
            os.replace(staged, path)
    check_onnx_model(path, image_size=image_size)
    return path


def check_onnx_model(path: str | Path, image_size: int = IMAGE_SIZE) -> None:
    """``onnx.checker`` plus the recognition-model contract; raises OnnxContractError naming the file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        onnx.checker.check_model(str(path))  # by path: works with external data and above 2 GiB
    except onnx.checker.ValidationError as err:
        raise OnnxContractError(f"{path}: onnx.checker rejects the model: {err}") from None
    graph = onnx.load(str(path), load_external_data=False).graph
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
    generator = torch.Generator().manual_seed(seed)
    result = {}
    with _float32_cpu_eval(model) as ready:
        for batch in batch_sizes:
            x = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
            with torch.inference_mode():
                expected = ready(x).numpy()
            got = session.run(None, {INPUT_NAME: x.numpy()})[0]
            if got.shape != expected.shape:
                raise OnnxContractError(
                    f"{path}: output shape {got.shape} for batch {batch}, PyTorch gives {expected.shape}")
            result[batch] = float(np.max(np.abs(got - expected)))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protomem-export", description="Export an arcface_torch backbone (model.pt) to ONNX for insightface."
    )
    parser.add_argument("--network", required=True, help="backbone name, e.g. r50, r100, mbf")
    parser.add_argument("--weights", required=True, help="backbone state_dict (arcface_torch output/model.pt)")
    parser.add_argument("--output", required=True, help="ONNX file to write")
    parser.add_argument("--num-features", type=int, default=None,
                        help="embedding size (default: read from the weights); must match the weights")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    return parser


@cli_entry("protomem-export")
def main(argv: list[str] | None = None) -> int:
    """Console entry point ``protomem-export``."""
    args = add_cli_arguments(build_parser()).parse_args(argv)
    from protomem_plugin.eval.embedders import load_backbone

    if args.opset < 9:
        raise ValueError(f"--opset must be >= 9, got {args.opset}")
    model = load_backbone(args.network, args.weights, args.num_features)
    path = export_onnx(model, args.output, opset=args.opset)
    parity = onnxruntime_parity(model, path)
    print(f"wrote {path} (input {INPUT_NAME!r}: batch x 3 x {IMAGE_SIZE} x {IMAGE_SIZE}, opset {args.opset})")
    data_path = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    if data_path.is_file():
        print(f"weights in the external data file {data_path} (keep it next to {path.name})")
    for batch, diff in parity.items():
        print(f"onnxruntime vs PyTorch, batch {batch}: max abs difference {diff:.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
