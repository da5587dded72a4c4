"""arcface_torch's own train_v2.py through protomem's hook: PartialFC_V2 vs Prototype Memory.

Runs an unmodified arcface_torch checkout with ``python -m protomem_plugin.arcface_torch`` (and
under ``torchrun --nproc_per_node 2``, gloo on the CPU) on the built-in synthetic identities at
112x112 with arcface_torch's ``mbf``: the same job once without ``head`` (arcface_torch's
PartialFC_V2) and once with ``head = "prototype_memory"``. Records, per run:

* held-out verification accuracy (``val.bin`` of identities not trained on) as train_v2's own
  callback logs it, and again from the saved ``model.pt`` loaded strictly into protomem's ``mbf``;
* from the batch log (``PROTOMEM_BATCH_LOG``): whether every batch is made of identity groups of
  ``samples_per_class`` and whether the ranks' batches of a step are disjoint.

Each finished run is cached in tools/bench/results/<tag>_runs/; results go to
tools/bench/results/<tag>.json, <tag>.png and <tag>.md (tag ``hook`` by default).

    python tools/bench/hook.py /path/to/insightface/recognition/arcface_torch
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from machine import cpu_name  # noqa: E402
from protomem_plugin.backbones import get_model  # noqa: E402
from protomem_plugin.data.synthetic import make_synthetic_dataset  # noqa: E402
from protomem_plugin.eval.verification import evaluate_bin  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ACCURACY_LINE = re.compile(r"\[val\]\[(\d+)\]Accuracy-Flip: ([0-9.]+)\+-([0-9.]+)")

JOB = """from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "mbf"
config.embedding_size = 512
config.batch_size = {batch_size}
config.lr = {lr}
config.sample_rate = {sample_rate}
config.rec = {rec!r}
config.num_classes = {identities}
config.num_image = {num_image}
config.num_epoch = {epochs}
config.warmup_epoch = 0
config.val_targets = ["val"]
config.verbose = {verbose}
config.frequent = 10
config.num_workers = 2
config.seed = {seed}
config.output = {output!r}
"""
PM_KEYS = """config.head = "prototype_memory"
config.samples_per_class = {k}
"""  # memory_size: the default, sample_rate * num_classes (at least one global batch)


def batch_checks(log_dir: pathlib.Path, k: int) -> dict:
    """Identity groups of ``k`` in every batch, and ranks disjoint within every step."""
    rows = [json.loads(line) for f in sorted(log_dir.glob("batches_rank*.jsonl")) for line in f.open()]
    grouped = all(len(set(r["labels"][i:i + k])) == 1 for r in rows for i in range(0, len(r["labels"]), k))
    by_step: dict[tuple, list] = {}
    for r in rows:
        by_step.setdefault((r["epoch"], r["step"]), []).append(set(r["positions"]))
    disjoint = all(not (a & b) for sets in by_step.values() for i, a in enumerate(sets) for b in sets[i + 1:])
    return {"batches": len(rows), "ranks": len({r["rank"] for r in rows}), "identity_groups": grouped,
            "ranks_disjoint": disjoint}


def run_one(args, name: str, head: str, nproc: int, seed: int, lr: float, k: int, data: str,
            work: pathlib.Path) -> dict:
    cache = RESULTS / f"{args.tag}_runs" / f"{name}.json"
    if cache.is_file() and not args.force:
        return json.loads(cache.read_text())
    out = work / name
    shutil.rmtree(out, ignore_errors=True)  # a batch log left by an interrupted run would be appended to
    out.mkdir(parents=True, exist_ok=True)
    num_image = args.identities * args.images_per_identity
    per_rank = args.batch_size // nproc
    steps_per_epoch = num_image // args.batch_size
    job = JOB.format(batch_size=per_rank, lr=lr, sample_rate=args.sample_rate, rec=data, identities=args.identities, num_image=num_image,
                     epochs=args.epochs, verbose=steps_per_epoch * args.verify_every_epochs, seed=seed,
                     output=str(out / "output"))
    if head == "prototype_memory":
        job += PM_KEYS.format(k=k)
    (out / "job.py").write_text(job)
    env = {**os.environ, "PROTOMEM_BATCH_LOG": str(out / "batches"), "OMP_NUM_THREADS": str(max(1, 2 // nproc))}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "protomem_plugin.arcface_torch", args.checkout, str(out / "job.py")]
    start = time.perf_counter()
    with open(out / "stdout.txt", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out)
    wall = time.perf_counter() - start
    if code:
        raise SystemExit(f"{name}: exit {code}; see {out / 'stdout.txt'}")
    curve = [(int(s), float(a)) for s, a, _ in ACCURACY_LINE.findall((out / "output" / "training.log").read_text())]
    model = get_model("mbf", num_features=512)
    model.load_state_dict(torch.load(out / "output" / "model.pt", weights_only=True), strict=True)
    final = evaluate_bin(model, os.path.join(data, "val.bin"))
    result = {"name": name, "head": head or "PartialFC_V2 (arcface_torch)", "nproc": nproc, "seed": seed, "lr": lr,
              "sample_rate": args.sample_rate,
              "samples_per_class": k, "steps": steps_per_epoch * args.epochs, "wall_s": round(wall, 1),
              "curve": curve, "model_pt_accuracy": final["accuracy"], **batch_checks(out / "batches", k)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1))
    return result


def plot(results: list[dict], path: pathlib.Path) -> None:
    """One bar per run: held-out accuracy of the saved model.pt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(results) + 2), 4))
    labels = [f"{'PM K=' + str(r['samples_per_class']) if r['head'] == 'prototype_memory' else 'PartialFC_V2'}\n"
              f"{r['nproc']} proc, seed {r['seed']}" for r in results]
    colours = ["tab:blue" if r["head"] == "prototype_memory" else "tab:gray" for r in results]
    values = [100 * r["model_pt_accuracy"] for r in results]
    ax.bar(range(len(results)), values, color=colours)
    for x, v in enumerate(values):
        ax.text(x, v + 0.5, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set_ylim(min(values) - 10, 100)
    ax.set_ylabel("held-out verification accuracy (%)")
    ax.set_title("arcface_torch train_v2 through the hook (mbf, 112 px synthetic)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: list[dict]) -> str:
    lines = ["| run | head | lr | processes | K | steps | accuracy (train_v2 log) | accuracy (model.pt) | identity groups | ranks disjoint | wall |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in results:
        logged = f"{100 * r['curve'][-1][1]:.1f}" if r["curve"] else "-"
        lines.append(f"| {r['name']} | {r['head']} | {r['lr']:g} | {r['nproc']} | {r['samples_per_class']} | {r['steps']} | {logged} | "
                     f"{100 * r['model_pt_accuracy']:.1f} | {'yes' if r['identity_groups'] else 'no'} | "
                     f"{'yes' if r['ranks_disjoint'] else 'no'} | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", help="recognition/arcface_torch of an insightface checkout")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "protomem_bench_hook"))
    parser.add_argument("--identities", type=int, default=128)
    parser.add_argument("--images-per-identity", type=int, default=8)
    parser.add_argument("--val-identities", type=int, default=64)
    parser.add_argument("--val-pairs", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch")
    parser.add_argument("--pm-samples-per-class", type=int, nargs="+", default=[2], help="K of the PM runs")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--verify-every-epochs", type=int, default=2)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.1], help="the job's lr (both heads)")
    parser.add_argument("--sample-rate", type=float, default=1.0,
                        help="the job's sample_rate: Partial FC's share of centres, PM's memory share")
    parser.add_argument("--tag", default="hook", help="name of the results files and run cache")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--multiprocess-seeds", type=int, default=1,
                        help="run the --nprocs above 1 for this many of the seeds only")
    parser.add_argument("--force", action="store_true", help="rerun cached runs")
    args = parser.parse_args(argv)
    args.checkout = str(pathlib.Path(args.checkout).resolve())
    work = pathlib.Path(args.work_dir)
    data = str(work / f"synthetic_s112_n{args.identities}_k{args.images_per_identity}")
    make_synthetic_dataset(data, args.identities, args.images_per_identity, val_identities=args.val_identities,
                           val_pairs=args.val_pairs, image_size=112, seed=0)
    results = []
    plan = [(seed, nproc, lr, head, k) for i, seed in enumerate(args.seeds) for nproc in args.nprocs
            if nproc == 1 or i < args.multiprocess_seeds for lr in args.lrs
            for head, ks in (("", [1]), ("prototype_memory", args.pm_samples_per_class)) for k in ks]
    for seed, nproc, lr, head, k in plan:
        name = f"{'pm_k' + str(k) if head else 'pfc'}_lr{lr:g}_np{nproc}_seed{seed}"
        results.append(run_one(args, name, head, nproc, seed, lr, k, data, work))
        print(f"{name}: {results[-1]['model_pt_accuracy']:.4f} in {results[-1]['wall_s']} s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    commit = subprocess.run(["git", "-C", args.checkout, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, no GPU", "torch": torch.__version__,
            "arcface_torch_commit": commit or "unknown", "args": {k: v for k, v in vars(args).items() if k != "force"}}
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    plot(results, RESULTS / f"{args.tag}.png")
    md = table(results)
    (RESULTS / f"{args.tag}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
