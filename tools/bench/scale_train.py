#!/usr/bin/env python
"""End to end at 1e8 classes: ``protomem-train`` with the ``tiny`` backbone and Prototype Memory,
its checkpoint and a resume, against the same job at 1e6 classes.

The dataset is a headerless ``.rec`` of real (synthetic-face) JPEGs whose labels are spread over
``[0, num_classes)``: identity ``i`` gets label ``i * stride`` (a multiple of 8, so exact in the
float32 IRHeader label). The same images serve every class count, so any difference in peak memory
or step time comes from ``num_classes`` alone. Each run is a fresh ``protomem-train`` process;
peak RSS and CPU time come from the kernel (``os.wait4``). A run trains one epoch and checkpoints;
the resume run loads that checkpoint and trains a second epoch.

Writes tools/bench/results/scale_train.json and scale_train.md and prints the table.

    python tools/bench/scale_train.py                  # 1e6 and 1e8 classes (about 2 minutes)
    python tools/bench/scale_train.py --quick --out /tmp/x
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIG = """from easydict import EasyDict as edict
config = edict()
config.head = "prototype_memory"
config.memory_size = {memory_size}
config.samples_per_class = 2
config.margin_list = (1.0, 0.0, 0.35)
config.margin_scale = 32.0
config.network = "tiny"
config.embedding_size = 64
config.image_size = {image_size}
config.batch_size = 32
config.lr = 0.1
config.num_epoch = {num_epoch}
config.warmup_epoch = 0
config.rec = {rec!r}
config.num_classes = {num_classes}
config.num_image = {num_image}
config.val_targets = []
config.verbose = 10**9
config.frequent = 10
config.num_workers = 0
config.resume = {resume}
config.save_all_states = True
config.output = {output!r}
"""


def write_spread_dataset(out_dir: Path, identities: int, per_identity: int, num_classes: int, image_size: int) -> int:
    """A headerless .rec of ``identities x per_identity`` synthetic faces with labels spread over
    ``[0, num_classes)``; returns the number of images."""
    from protomem_plugin.data.recordio import IRHeader, RecordIOWriter, pack_record, write_property
    from protomem_plugin.data.synthetic import SyntheticFaces, _encode

    stride = max(8, (num_classes // identities) // 8 * 8)
    if stride * (identities - 1) >= num_classes:
        raise ValueError(f"{identities} identities do not spread over {num_classes} classes")
    faces = SyntheticFaces(identities, seed=0, image_size=image_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = 0
    with RecordIOWriter(str(out_dir / "train.rec"), str(out_dir / "train.idx")) as writer:
        for identity in range(identities):
            for sample in range(per_identity):
                image, _ = faces.render(identity, sample)
                label = float(identity * stride)
                writer.write(key, pack_record(IRHeader(0, label, key, 0), _encode(image)))
                key += 1
    write_property(str(out_dir / "property"), num_classes, image_size, image_size)
    return key


def train(config_path: Path, log_path: Path) -> dict:
    """Run protomem-train on ``config_path``: wall and CPU seconds, peak RSS (MB)."""
    cmd = [sys.executable, "-m", "protomem_plugin.train.cli", str(config_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{config_path}: protomem-train failed:\n{log_path.read_text()[-3000:]}")
    return {"wall_s": round(time.perf_counter() - started, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def measure(work: Path, class_counts: list[int], *, memory_size: int, identities: int, per_identity: int,
            image_size: int = 32) -> list[dict]:
    """For each class count: a fresh run of one epoch (with its checkpoint) and a resumed second epoch."""
    rows = []
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "configs" / "base.py", work / "base.py")  # arcface_torch: job configs extend base.py
    for num_classes in class_counts:
        data = work / f"data_{num_classes}"
        num_image = write_spread_dataset(data, identities, per_identity, num_classes, image_size)
        output = work / f"out_{num_classes}"
        row = {"num_classes": num_classes, "memory_size": memory_size, "images": num_image}
        for phase, epochs, resume in (("fresh", 1, False), ("resume", 2, True)):
            config = work / f"cfg_{num_classes}_{phase}.py"
            config.write_text(CONFIG.format(memory_size=memory_size, image_size=image_size, num_epoch=epochs,
                                            rec=str(data), num_classes=num_classes, num_image=num_image,
                                            resume=resume, output=str(output)))
            row[phase] = train(config, work / f"log_{num_classes}_{phase}.txt")
        checkpoint = output / "checkpoint_gpu_0.pt"
        row["checkpoint_mb"] = round(checkpoint.stat().st_size / 2**20, 1)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| classes | memory slots | peak RSS, train (MB) | peak RSS, resume (MB) | vs first row | "
             "checkpoint (MB) | CPU s, train | CPU s, resume |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = max(r[p]["peak_rss_mb"] / base[p]["peak_rss_mb"] for p in ("fresh", "resume"))
        lines.append(f"| {r['num_classes']:.0e} | {r['memory_size']:,} | {r['fresh']['peak_rss_mb']:.0f} | "
                     f"{r['resume']['peak_rss_mb']:.0f} | {ratio:.3f} | {r['checkpoint_mb']:.1f} | "
                     f"{r['fresh']['cpu_s']:.1f} | {r['resume']['cpu_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny memory and dataset: mechanics only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=ROOT / "data_cache" / "scale_train")
    args = parser.parse_args(argv)
    from machine import cpu_name

    settings = (dict(memory_size=4096, identities=40, per_identity=4) if args.quick
                else dict(memory_size=1_000_000, identities=200, per_identity=8))
    rows = measure(args.work, [10**6, 10**8], **settings)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python tools/bench/scale_train.py" + (" --quick" if args.quick else "")
    result = {"command": command, "cpu": cpu_name(), "cores": os.cpu_count(), "settings": settings, "rows": rows}
    (args.out / "scale_train.json").write_text(json.dumps(result, indent=2) + "\n")
    md = f"{table(rows)}\n\n`{command}` ({cpu_name()}, {os.cpu_count()} cores)\n"
    (args.out / "scale_train.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
