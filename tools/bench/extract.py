#!/usr/bin/env python
"""Feature-extraction throughput of the IJB evaluation: PyTorch backbone vs ONNX (insightface).

Builds a synthetic IJB tree, exports the backbone to ONNX, and measures side by side in one run:

* ``extract``: the whole IJB extraction (read loose crop, align with norm_crop, embed the image
  and its mirror), in loose-crop images per second;
* ``forward``: the model alone on a ready batch, in face crops per second.

Writes tools/bench/results/extract.json and extract.png and prints a markdown table.

    python tools/bench/extract.py                      # r50, 64 images, batch 32
    python tools/bench/extract.py --network r100 --images 256 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from protomem_plugin.backbones import get_model  # noqa: E402
from protomem_plugin.eval.embedders import OnnxEmbedder, TorchEmbedder  # noqa: E402
from protomem_plugin.eval.extract import extract_features  # noqa: E402
from protomem_plugin.eval.ijb_meta import read_image_list  # noqa: E402
from protomem_plugin.eval.synthetic_ijb import make_synthetic_ijb  # noqa: E402
from protomem_plugin.export import export_onnx  # noqa: E402
from machine import cpu_name  # noqa: E402  (tools/bench/machine.py, beside this script)

RESULTS = Path(__file__).resolve().parent / "results"


def _calibrate(model: torch.nn.Module) -> torch.nn.Module:
    """Estimate BatchNorm statistics on one random batch so activations have trained-like scales."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 112, 112) * 2 - 1)
    return model.eval()


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", default="r50")
    parser.add_argument("--images", type=int, default=64, help="loose crops to embed (each also mirrored)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timed runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=str(RESULTS / "extract"), help="results path stem (.json, .png)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = _calibrate(get_model(args.network, num_features=512))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        identities = max(2, -(-args.images // 9))  # about 9 images per identity at the default layout
        synthetic = make_synthetic_ijb(tmp / "IJBC", num_identities=identities, max_media_per_template=3,
                                       max_images_per_media=3, impostor_pairs=10, seed=0)
        images = read_image_list(synthetic.layout)
        count = min(args.images, len(images))
        paths = [synthetic.layout.image_dir / n for n in images.names[:count]]
        landmarks = images.landmarks[:count]
        onnx_path = export_onnx(model, tmp / f"{args.network}.onnx")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device.startswith("cuda") else None
        embedders = {
            "PyTorch": TorchEmbedder(model, args.device),
            "ONNX (insightface ArcFaceONNX)": OnnxEmbedder(onnx_path, providers=providers),
        }
        batch = np.random.default_rng(0).integers(0, 256, (args.batch_size, 112, 112, 3), dtype=np.uint8)
        rows = []
        for name, embedder in embedders.items():
            embedder(batch[:2])  # warm-up
            extract_s = _timed(lambda: extract_features(embedder, paths, landmarks, args.batch_size,
                                                        desc=name), args.repeats)
            forward_s = _timed(lambda: embedder(batch), args.repeats)
            rows.append({
                "path": name,
                "extract_images_per_s": count / extract_s,
                "forward_crops_per_s": args.batch_size / forward_s,
            })
        first = extract_features(embedders["PyTorch"], paths[:4], landmarks[:4], 4, desc="check")
        second = extract_features(embedders["ONNX (insightface ArcFaceONNX)"], paths[:4], landmarks[:4], 4,
                                  desc="check")
        a, b = first.reshape(-1, 512), second.reshape(-1, 512)
        cosine = float(np.min(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))

    machine = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "python": platform.python_version(),
    }
    result = {
        "network": args.network,
        "images": count,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "machine": machine,
        "min_cosine_pytorch_vs_onnx": cosine,
        "rows": rows,
    }
    stem = Path(args.output)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _plot(result, stem.with_suffix(".png"))

    print(f"{args.network} at 112x112, {count} loose crops, batch {args.batch_size}, "
          f"{machine['cpu']} ({machine['cpu_count']} cores, {machine['torch_threads']} torch threads), {args.device}")
    print()
    print("| path | extract (align + image & mirror), images/s | forward only, crops/s |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['path']} | {row['extract_images_per_s']:.2f} | {row['forward_crops_per_s']:.2f} |")
    print()
    print(f"min cosine PyTorch vs ONNX features: {cosine:.6f}")
    return 0


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["path"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.bar(x - 0.2, [r["extract_images_per_s"] for r in rows], 0.4, label="extract: loose crops/s")
    ax.bar(x + 0.2, [r["forward_crops_per_s"] for r in rows], 0.4, label="forward only: crops/s")
    ax.set_xticks(x, labels)
    ax.set_ylabel("per second")
    ax.set_title(f"{result['network']} feature extraction, {result['machine']['device']}, "
                 f"{result['machine']['cpu_count']} cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
