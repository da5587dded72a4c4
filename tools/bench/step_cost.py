#!/usr/bin/env python
"""Head step cost of this checkout against a baseline revision, side by side in one run.

Each (revision, configuration) runs in a fresh process that imports ``protomem_plugin`` from that
revision (a ``git worktree`` of the baseline, removed afterwards). A step is forward + backward of the
head alone on a leaf embedding batch (K = 2 images per class) after the memory is full. Reported:
median step time and the step's peak resident memory above the state (``VmHWM`` reset through
``/proc/self/clear_refs`` after the warm-up), and the ratios new / baseline.

Writes tools/bench/results/step_cost.{json,md,png}.

    python tools/bench/step_cost.py --baseline 321ee8e
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
BATCH, DIM, SLOTS, CLASSES = 128, 512, 100_000, 10_000_000

CONFIGS = {
    "pm": dict(head="prototype_memory"),
    "pm chunked 8192": dict(head="prototype_memory", logits_chunk=8192),
    "pm float16 storage, fp16": dict(head="prototype_memory", memory_dtype="float16", fp16=True),
    "pm bfloat16 storage, fp16": dict(head="prototype_memory", memory_dtype="bfloat16", fp16=True),
    "qapm norm": dict(head="qapm"),
    "partial_fc 0.1 of 1e6": dict(head="partial_fc", sample_rate=0.1, num_classes=1_000_000),
}


def _kb(key: str) -> int:
    for line in open("/proc/self/status", encoding="utf-8"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def worker(name: str, steps: int) -> dict:
    """Runs in the child: build the head of ``name``, fill it, time ``steps`` steps."""
    import torch

    from protomem_plugin.losses import CombinedMarginLoss
    from protomem_plugin.registry import get_head_class

    torch.manual_seed(0)
    options = dict(CONFIGS[name])
    cls = get_head_class(options.pop("head"))
    classes_total = options.pop("num_classes", CLASSES)
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    if cls.__name__ == "PartialFC":
        head = cls(margin, DIM, classes_total, **options)
    else:
        head = cls(margin, DIM, CLASSES, memory_size=SLOTS, **options)
        with torch.no_grad():  # full memory of distinct classes, as after a long run
            classes = torch.arange(SLOTS) * (CLASSES // SLOTS)
            head.write_prototypes(classes, torch.nn.functional.normalize(torch.randn(SLOTS, DIM), dim=1))

    def step(i: int) -> float:
        g = torch.Generator().manual_seed(i)
        labels = (torch.randperm(classes_total // 100, generator=g)[: BATCH // 2] * 100 + 1).repeat_interleave(2)
        x = torch.randn(BATCH, DIM, generator=g).requires_grad_(True)
        start = time.perf_counter()
        head(x, labels).backward()
        return time.perf_counter() - start

    step(0)
    base = _kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass
    times = [step(i) for i in range(1, steps + 1)]
    return {"median_s": statistics.median(times), "step_peak_mb": (_kb("VmHWM") - base) / 1024}


def run_child(source: Path, name: str, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(steps)], env=env,
                         capture_output=True, text=True, check=True, cwd=source)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(baseline: str, steps: int, rounds: int) -> dict:
    from tqdm import tqdm

    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), baseline], check=True,
                       capture_output=True)
        try:
            results = {name: {"baseline": [], "new": []} for name in CONFIGS}
            jobs = [(r, name, tag) for r in range(rounds) for name in CONFIGS for tag in ("baseline", "new")]
            for _, name, tag in tqdm(jobs, desc="step cost", unit="run"):
                results[name][tag].append(run_child(old if tag == "baseline" else ROOT, name, steps))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False,
                           capture_output=True)
    summary = {}
    for name, runs in results.items():
        row = {}
        for tag in ("baseline", "new"):
            row[f"{tag}_s"] = statistics.median(r["median_s"] for r in runs[tag])
            row[f"{tag}_peak_mb"] = statistics.median(r["step_peak_mb"] for r in runs[tag])
        row["time_ratio"] = row["new_s"] / row["baseline_s"]
        summary[name] = row
    return {"baseline": baseline, "batch": BATCH, "dim": DIM, "slots": SLOTS, "classes": CLASSES,
            "steps": steps, "rounds": rounds, "configs": summary}


def write(result: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"| head step (B={result['batch']}, D={result['dim']}, memory {result['slots']:,} slots) | "
             f"baseline {result['baseline']} s | new s | new / baseline | step peak MB baseline | new |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in result["configs"].items():
        lines.append(f"| {name} | {r['baseline_s']:.3f} | {r['new_s']:.3f} | {r['time_ratio']:.2f} | "
                     f"{r['baseline_peak_mb']:.0f} | {r['new_peak_mb']:.0f} |")
    table = "\n".join(lines) + "\n"
    (RESULTS / "step_cost.md").write_text(table)
    names = list(result["configs"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "s", "median step time (s)"), (axes[1], "peak_mb", "step peak RSS (MB)")):
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [result["configs"][n][f"baseline_{key}"] for n in names], 0.4, label="baseline")
        ax.bar([x + 0.2 for x in xs], [result["configs"][n][f"new_{key}"] for n in names], 0.4, label="new")
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "step_cost.png", dpi=120)
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="alternating repetitions of every run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    print(write(measure(args.baseline, args.steps, args.rounds)))


if __name__ == "__main__":
    main()
