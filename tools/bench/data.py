"""Training-loader throughput: NVIDIA DALI (CPU pipeline) vs the PyTorch/OpenCV fallback.

Both loaders read the same synthetic InsightFace-layout .rec (JPEG, 112x112) with the same
identity-grouped batches, in the same run. Writes tools/bench/results/data.json and data.png
and prints a Markdown table.

    python tools/bench/data.py [--identities 250 --images-per-identity 16 --batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from protomem_plugin.data.loader import build_train_loader  # noqa: E402
from protomem_plugin.data.synthetic import make_synthetic_dataset  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def measure(loader, epochs: int) -> float:
    """Images per second over ``epochs`` full epochs, after one warm-up epoch."""
    loader.set_epoch(0)
    for _ in loader:
        pass
    count, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        for images, _ in loader:
            count += images.shape[0]
    return count / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "protomem_bench_data"))
    parser.add_argument("--identities", type=int, default=250)
    parser.add_argument("--images-per-identity", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per configuration")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per configuration (best kept)")
    args = parser.parse_args(argv)

    data = make_synthetic_dataset(args.data_dir, args.identities, args.images_per_identity, val_identities=2,
                                  val_pairs=2, image_size=112)
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    configs = [("fallback", dict(use_dali=False, num_workers=w), f"PyTorch DataLoader + OpenCV, num_workers={w}")
               for w in sorted({1, 2})]
    for threads in sorted({1, 2, cores, 2 * cores}):
        for prefetch in (2, 4):
            configs.append(("dali", dict(use_dali=True, dali_num_threads=threads, prefetch=prefetch),
                            f"DALI CPU, num_threads={threads}, prefetch={prefetch}"))
    rows = []
    for kind, kwargs, label in configs:
        best = 0.0
        for _ in range(args.repeats):
            loader = build_train_loader(data, args.batch_size, samples_per_class=2, seed=0, **kwargs)
            best = max(best, measure(loader, args.epochs))
            del loader
        rows.append({"loader": kind, "config": label, "images_per_s": round(best, 1), **kwargs})
        print(f"{label}: {best:.0f} images/s", flush=True)
    aug_loader = build_train_loader(data, args.batch_size, use_dali=True, dali_aug=True,
                                    dali_num_threads=max(r.get("dali_num_threads") or 0 for r in rows), prefetch=2)
    aug = measure(aug_loader, args.epochs)
    rows.append({"loader": "dali", "config": "DALI CPU + dali_aug", "images_per_s": round(aug, 1), "dali_aug": True})

    fallback_2 = next(r for r in rows if r["loader"] == "fallback" and r["num_workers"] == 2)
    best_dali = max((r for r in rows if r["loader"] == "dali" and not r.get("dali_aug")), key=lambda r: r["images_per_s"])
    ratio = best_dali["images_per_s"] / fallback_2["images_per_s"]
    result = {
        "machine": {"cpu": cpu_name(), "cores": cores, "gpu": torch.cuda.is_available(), "python": platform.python_version(),
                    "torch": torch.__version__, "dali": __import__("nvidia.dali").dali.__version__,
                    "load_average_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}},
        "dataset": {"images": args.identities * args.images_per_identity, "identities": args.identities,
                    "size": "112x112 JPEG q95 (synthetic)"},
        "batch_size": args.batch_size, "samples_per_class": 2, "timed_epochs": args.epochs,
        "rows": rows,
        "best_dali": best_dali["config"],
        "dali_over_fallback_workers2": round(ratio, 2),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, RESULTS / "data.png", result["machine"])

    print()
    load = result["machine"]["load_average_1min"]
    print(f"Machine: {result['machine']['cpu']}, {cores} cores, GPU: {result['machine']['gpu']}, "
          f"1-min load average {load['start']} -> {load['end']}")
    print("| loader | configuration | images/s | vs fallback (2 workers) |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['loader']} | {r['config']} | {r['images_per_s']:.0f} | {r['images_per_s'] / fallback_2['images_per_s']:.2f}x |")
    print(f"\nBest DALI / fallback(num_workers=2) = {ratio:.2f}x")
    return 0


def plot(rows: list[dict], path: pathlib.Path, machine: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    labels = [r["config"] for r in rows]
    values = [r["images_per_s"] for r in rows]
    colours = ["tab:green" if r["loader"] == "dali" else "tab:gray" for r in rows]
    ax.barh(np.arange(len(rows)), values, color=colours)
    ax.set_yticks(np.arange(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlabel("images / s (112x112 JPEG, decode + flip + normalise)")
    ax.set_title(f"Training loader throughput, {machine['cores']}-core CPU, no GPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
