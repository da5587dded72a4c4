"""Learning benchmark: does Prototype Memory beat Partial FC where the papers say it should?

Trains the same small backbone for the same number of steps with each head on the built-in
synthetic identities, in two regimes, through the project's own loaders, recipe and evaluation:

* ``obsolescence``: many identities with few images each, every identity seen a handful of times;
* ``quality``: a large share of heavily degraded training images.

Each run is evaluated on held-out identities with the IJB-format evaluation (TAR at FAR 1e-3 and
1e-4 on templates, a synthetic IJB tree of other identities) and the ``.bin`` verification, at
several points of training (the run is resumed step-exactly between points). Several seeds give
mean and spread. Writes ``learning.json``, ``learning.md``, ``learning_tar.png`` (TAR vs step)
and ``learning_age.png`` (histograms of the age of the class weights used) under ``--out``.

    python tools/bench/learning.py                  # full grid (about an hour on 2 CPU cores)
    python tools/bench/learning.py --quick          # mechanics only (the tests run this)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_name  # noqa: E402  (tools/bench/machine.py, beside this script)

# regime -> dataset and evaluation tree; identities of the IJB tree use another seed (never trained on)
REGIMES = {
    "obsolescence": dict(num_identities=4000, images_per_identity=4, degraded_fraction=0.1, val_identities=150),
    "quality": dict(num_identities=600, images_per_identity=12, degraded_fraction=0.5, val_identities=150),
}
QUICK_REGIMES = {
    "obsolescence": dict(num_identities=120, images_per_identity=4, degraded_fraction=0.1, val_identities=30),
    "quality": dict(num_identities=40, images_per_identity=8, degraded_fraction=0.5, val_identities=30),
}
HEADS = {
    "full_softmax": dict(head="partial_fc", sample_rate=1.0),
    "partial_fc_0.1": dict(head="partial_fc", sample_rate=0.1),
    "pm": dict(head="prototype_memory"),
    "pm_mining": dict(head="prototype_memory", doppelganger_mining=True),
    "qapm_norm": dict(head="qapm", quality_source="norm"),
    "qapm_soft": dict(head="qapm", quality_source="recognizability_soft"),
    "qapm_hard": dict(head="qapm", quality_source="recognizability_hard"),
    "qapm_oracle": dict(head="qapm", quality_source="external", quality_file="QUALITY"),
}
REGIME_HEADS = {
    "obsolescence": ["full_softmax", "partial_fc_0.1", "pm", "pm_mining"],
    "quality": ["pm", "qapm_norm", "qapm_soft", "qapm_hard", "qapm_oracle"],
}
IMAGE_SIZE = 32


def dataset_dir(root: Path, regime: str, spec: dict) -> Path:
    return root / f"{regime}_n{spec['num_identities']}x{spec['images_per_identity']}_s{IMAGE_SIZE}"


def prepare(root: Path, regime: str, spec: dict, ijb_identities: int) -> tuple[Path, Path]:
    """The training .rec (+ val.bin) and a synthetic IJB tree of unseen identities."""
    from protomem_plugin.data.synthetic import make_synthetic_dataset
    from protomem_plugin.eval.synthetic_ijb import make_synthetic_ijb

    rec = dataset_dir(root, regime, spec)
    make_synthetic_dataset(str(rec), spec["num_identities"], spec["images_per_identity"],
                           val_identities=spec["val_identities"], val_pairs=600, image_size=IMAGE_SIZE,
                           degraded_fraction=spec["degraded_fraction"], seed=0, progress=False)
    ijb = root / f"{regime}_ijb{ijb_identities}" / "IJBC"
    if not (ijb / "meta").is_dir():
        make_synthetic_ijb(ijb, "IJBC", num_identities=ijb_identities, templates_per_identity=3, seed=7919,
                           degraded_fraction=spec["degraded_fraction"], impostor_pairs=None)
    return rec, ijb


def job_config(path: Path, rec: Path, output: Path, spec: dict, head: dict, seed: int, steps: int, stop: int) -> Path:
    """An arcface_torch job file (base.py copied beside it) for one run."""
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "configs" / "base.py", path.parent / "base.py")
    classes = spec["num_identities"]
    values = dict(
        network="tiny", embedding_size=64, image_size=IMAGE_SIZE, batch_size=64, samples_per_class=2,
        lr=0.1, weight_decay=5e-4, margin_list=(1.0, 0.0, 0.35), margin_scale=32.0, num_epoch=10_000,
        warmup_epoch=0, max_steps=steps, stop_at_step=stop, num_classes=classes, rec=str(rec), output=str(output),
        seed=seed, frequent=50, verbose=0, val_targets=["val"], num_workers=0, progress=False, save_every_steps=stop,
    )
    for key, value in head.items():
        values[key] = str(rec / "quality.npy") if value == "QUALITY" else value
    if values["head"] != "partial_fc":
        values["memory_size"] = max(64, classes // 10)  # as many logit columns as Partial FC 0.1
    path.write_text("from easydict import EasyDict as edict\nconfig = edict()\n"
                    + "".join(f"config.{k} = {v!r}\n" for k, v in values.items()))
    return path


class ResizingEmbedder:
    """Embeds the 112x112 aligned IJB crops at the training resolution."""

    def __init__(self, model, size: int):
        from protomem_plugin.eval.embedders import TorchEmbedder

        self.inner = TorchEmbedder(model, "cpu")
        self.size = size

    def __call__(self, images_bgr: np.ndarray) -> np.ndarray:
        import cv2

        small = np.stack([cv2.resize(im, (self.size, self.size), interpolation=cv2.INTER_AREA) for im in images_bgr])
        return self.inner(small)


def evaluate(output: Path, ijb: Path, step: int) -> dict:
    """TAR at FAR 1e-3/1e-4 on the IJB tree and .bin accuracy of ``output/model.pt``."""
    from protomem_plugin.eval.embedders import load_backbone
    from protomem_plugin.eval.ijb import evaluate_ijb

    model = load_backbone("tiny", output / "model.pt", num_features=64).eval()
    res = evaluate_ijb(ijb, "IJBC", output / f"ijb_{step}", embedder=ResizingEmbedder(model, IMAGE_SIZE),
                       name=output.name, protocols=("1:1",), batch_size=256, workers=1, far_targets=(1e-4, 1e-3))
    tar = res["1:1"]["tar_at_far_nearest"]
    log = (output / "training.log").read_text()
    accuracy = float(log.rsplit("Accuracy-Flip: ", 1)[1].split("+-")[0]) if "Accuracy-Flip" in log else float("nan")
    return {"step": step, "tar@1e-4": float(tar["0.0001"]), "tar@1e-3": float(tar["0.001"]), "bin_accuracy": accuracy}


def run_one(args: tuple) -> dict:
    """Train one (regime, head, seed) in segments, evaluating after each."""
    regime, head_name, seed, rec, ijb, out_root, steps, points, spec = args
    output = Path(out_root) / regime / f"{head_name}_seed{seed}"
    curve, started = [], time.time()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for i, stop in enumerate(np.linspace(0, steps, points + 1)[1:].astype(int)):
        cfg = job_config(output.parent / "configs" / f"{head_name}_seed{seed}.py", Path(rec), output, spec,
                         HEADS[head_name], seed, steps, int(stop))
        cmd = [sys.executable, "-m", "protomem_plugin.train.cli", str(cfg)] + (["--resume"] if i else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{regime}/{head_name}/seed{seed} failed:\n{done.stderr[-2000:]}")
        curve.append(evaluate(output, Path(ijb), int(stop)))
    ages = age_histogram(output)
    return {"regime": regime, "head": head_name, "seed": seed, "curve": curve, "final": curve[-1],
            "ages": ages, "seconds": time.time() - started}


def age_histogram(output: Path) -> dict:
    """Ages (steps since last update) of the class weights used, from the last checkpoint's head state."""
    import torch

    state = torch.load(output / "checkpoint_gpu_0.pt", weights_only=True)
    head = state["state_dict_softmax_fc"]
    step = int(state["global_step"])
    if "slot_step" in head:
        written = head["slot_step"][head["slot_step"] >= 0]
        ages = (step - 1 - written).clamp_min(0)
    elif "last_update_step" in head:
        ages = (step - head["last_update_step"]).clamp_min(0)
    else:
        return {}
    return {"mean": float(ages.float().mean()), "p90": float(ages.float().quantile(0.9)),
            "values": ages.tolist()[:20000]}


def summarise(results: list[dict]) -> tuple[dict, str]:
    table: dict = {}
    for r in results:
        table.setdefault(r["regime"], {}).setdefault(r["head"], []).append(r["final"])
    lines = ["| regime | head | TAR@FAR=1e-4 | TAR@FAR=1e-3 | .bin accuracy | seeds |", "|---|---|---:|---:|---:|---:|"]
    summary: dict = {}
    for regime, heads in table.items():
        for head, finals in heads.items():
            stats = {}
            for key in ("tar@1e-4", "tar@1e-3", "bin_accuracy"):
                values = np.array([f[key] for f in finals]) * 100
                stats[key] = {"mean": float(values.mean()), "std": float(values.std())}
            summary.setdefault(regime, {})[head] = stats
            cell = lambda k: f"{stats[k]['mean']:.2f} ± {stats[k]['std']:.2f}"  # noqa: E731
            lines.append(f"| {regime} | {head} | {cell('tar@1e-4')} | {cell('tar@1e-3')} | {cell('bin_accuracy')} | {len(finals)} |")
    return summary, "\n".join(lines)


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = sorted({r["regime"] for r in results})
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4.5), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for head in dict.fromkeys(r["head"] for r in results if r["regime"] == regime):
            runs = [r for r in results if r["regime"] == regime and r["head"] == head]
            steps = [p["step"] for p in runs[0]["curve"]]
            tar = np.array([[p["tar@1e-3"] for p in r["curve"]] for r in runs]) * 100
            ax.errorbar(steps, tar.mean(0), yerr=tar.std(0), marker="o", capsize=3, label=head)
        ax.set_title(f"{regime} regime: TAR@FAR=1e-3 on unseen identities")
        ax.set_xlabel("training step")
        ax.set_ylabel("TAR (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_tar.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4.5), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for head in dict.fromkeys(r["head"] for r in results if r["regime"] == regime):
            run = next(r for r in results if r["regime"] == regime and r["head"] == head)
            if run["ages"]:
                ax.hist(run["ages"]["values"], bins=40, histtype="step", density=True, label=head)
        ax.set_title(f"{regime}: age of class weights at the end (steps since update)")
        ax.set_xlabel("age (steps)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_age.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "tools/bench/results"))
    parser.add_argument("--data", default=str(REPO / "data_cache/learning"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--points", type=int, default=3, help="evaluations along training")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    parser.add_argument("--regimes", default="obsolescence,quality")
    parser.add_argument("--heads", default="", help="comma-separated subset of the heads")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the mechanics only")
    args = parser.parse_args(argv)

    regimes = QUICK_REGIMES if args.quick else REGIMES
    ijb_identities = 12 if args.quick else 200
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_root = Path(args.data) / ("runs_quick" if args.quick else "runs")
    tasks = []
    for regime in args.regimes.split(","):
        spec = regimes[regime]
        rec, ijb = prepare(Path(args.data), regime, spec, ijb_identities)
        heads = [h for h in REGIME_HEADS[regime] if not args.heads or h in args.heads.split(",")]
        for head in heads:
            for seed in range(args.seeds):
                tasks.append((regime, head, seed, str(rec), str(ijb), str(runs_root), args.steps, args.points, spec))
    from tqdm import tqdm

    results = []
    # spawn: a child forked from a process that already ran torch or OpenCV thread pools can hang
    import multiprocessing

    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for result in tqdm(pool.map(run_one, tasks), total=len(tasks), desc="runs"):
            results.append(result)
    summary, table = summarise(results)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "steps": args.steps, "seeds": args.seeds,
               "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    stem = "learning_quick" if args.quick else "learning"
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "summary": summary, "runs": results}, indent=1))
    (out / f"{stem}.md").write_text(table + "\n")
    if not args.quick:
        plot(results, out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
