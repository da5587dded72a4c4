"""Peak host memory per rank of a resume on another number of ranks: whole files vs memory-mapped.

For each head (Partial FC, Prototype Memory) it writes real checkpoints of a run on 2 ranks and of
a run on 1 rank (gloo on the CPU, ``save_training_checkpoint``; Partial FC with SGD momentum
buffers for every centre, the memory filled in every slot), then resumes 2 -> 1 and 1 -> 2 with
``load_resume_state`` twice per rank, each time into freshly built modules:

* before: ``mmap=False``, every old file read whole (what resuming did before memory-mapping);
* after: ``mmap=True`` (the default): only the pages a rank takes are read.

Peak host memory of a load is the rise of the process's peak resident set (VmHWM, reset through
``/proc/self/clear_refs`` just before the load) above its resident set before it. It counts the
pages of the mapped files the load read (page cache that the ranks of a node share and the kernel
can drop) as well as private memory, so it is an upper bound of what a rank needs. Also recorded:
what a rank keeps (its head, optimizer and backbone state after the load), the file sizes and the
cost of reading the old world size.

Results: tools/bench/results/resume_memory.json, .png and .md.

    python tools/bench/resume_memory.py --classes 1000000 --embedding-size 128 --memory-size 400000
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from tqdm import tqdm  # noqa: E402

from machine import cpu_name  # noqa: E402
from protomem_plugin.data.synthetic import make_synthetic_dataset  # noqa: E402
from protomem_plugin.train.checkpoint import checkpoint_path, save_training_checkpoint  # noqa: E402
from protomem_plugin.train.config import get_config  # noqa: E402
from protomem_plugin.train.resume import _old_world_size, load_resume_state  # noqa: E402
from protomem_plugin.train.runtime import Runtime  # noqa: E402
from protomem_plugin.train.trainer import build_setup  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CPU = torch.device("cpu")
MiB = 2**20
CASES = ((2, 1), (1, 2))  # (old world size, new world size)
MODES = (("before", False), ("after", True))  # label, mmap


# ----------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rise_mib(fn) -> tuple[float, object]:
    """``(MiB, fn())``: how far the peak resident set rose above the resident set while ``fn`` ran."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # peak resident set := current resident set
    before = _status_kib("VmRSS")
    result = fn()
    return (_status_kib("VmHWM") - before) / 1024, result


def state_mib(setup) -> float:
    """What a rank keeps: its head, optimizer and backbone tensors."""
    tensors = [*setup.head.state_dict().values(), *setup.backbone.state_dict().values()]
    tensors += [v for s in setup.optimizer.state.values() for v in s.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) / MiB


# ----------------------------------------------------------------------------- processes
def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """``fn(rank, world, *args)`` on ``world`` fresh processes joined by gloo."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(world, port, fn, args), nprocs=world, join=True)


# ----------------------------------------------------------------------------- checkpoints
def write_job(work: pathlib.Path, head: str, args, rec: str) -> pathlib.Path:
    configs = work / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "configs" / "base.py", configs / "base.py")
    values = dict(network="tiny", embedding_size=args.embedding_size, image_size=32, batch_size=8, samples_per_class=2,
                  num_classes=args.classes, rec=rec, num_epoch=1, warmup_epoch=0, val_targets=[], num_workers=0,
                  progress=False, margin_list=(1.0, 0.0, 0.35), head=head)
    if head == "prototype_memory":
        values["memory_size"] = args.memory_size
    lines = ["from easydict import EasyDict as edict", "config = edict()", *(f"config.{k} = {v!r}" for k, v in values.items())]
    path = configs / f"{head}.py"
    path.write_text("\n".join(lines) + "\n")
    return path


@torch.no_grad()
def fill(setup) -> None:
    """A state as after many steps: momentum buffers for every parameter, every memory slot written."""
    head = setup.head
    if hasattr(head, "write_prototypes"):
        owned = torch.arange(head.rank, head.num_classes, head.world_size)[: head.num_local_slots]
        for chunk in owned.split(65536):
            head.write_prototypes(chunk, torch.nn.functional.normalize(torch.randn(chunk.numel(), head.embedding_size)))
            head.step += 1
    with torch.enable_grad():
        for group in setup.optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p) * 1e-3
    setup.optimizer.step()
    setup.scheduler.step()


def save_worker(rank: int, world: int, job: str, output: str) -> None:
    cfg = get_config(job)
    cfg.output = output
    setup = build_setup(cfg, Runtime(rank, world, 0, CPU))
    fill(setup)
    extra = {"protomem": {"loader": setup.loader.state_dict(), "world_size": world,
                          "global_batch": cfg.batch_size * world, "head": cfg.head}}
    save_training_checkpoint(output, rank, epoch=0, global_step=1, backbone=setup.backbone, head=setup.head,
                             optimizer=setup.optimizer, lr_scheduler=setup.scheduler, extra=extra)


def measure_worker(rank: int, world: int, job: str, output: str, dump: str) -> None:
    cfg = get_config(job)
    cfg.update(output=output, resume=True)
    row = {"rank": rank}
    row["world_size_read_mib"], _ = peak_rise_mib(lambda: _old_world_size(pathlib.Path(output)))
    for label, mmap in MODES:
        setup = build_setup(cfg, Runtime(rank, world, 0, CPU))
        start = time.perf_counter()
        row[f"{label}_mib"], _ = peak_rise_mib(lambda: load_resume_state(
            output, setup.runtime, setup.backbone, setup.head, setup.optimizer, setup.scheduler, setup.loader, mmap=mmap))
        row[f"{label}_s"] = time.perf_counter() - start
        row["kept_mib"] = state_mib(setup)
        del setup
    pathlib.Path(dump, f"rank{rank}.json").write_text(json.dumps(row))


# ----------------------------------------------------------------------------- report
def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4))
    labels = [f"{r['head']}\n{r['old_world']} -> {r['new_world']}, rank {r['rank']}" for r in rows]
    width = 0.38
    for i, (key, name, colour) in enumerate((("before_mib", "before: whole files", "tab:gray"),
                                             ("after_mib", "after: memory-mapped", "tab:blue"))):
        xs = [x + (i - 0.5) * width for x in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width, label=name, color=colour)
        for x, r in zip(xs, rows):
            ax.text(x, r[key], f"{r[key]:.0f}", ha="center", va="bottom", fontsize=7)
    ax.scatter(range(len(rows)), [r["kept_mib"] for r in rows], marker="_", s=600, color="black", zorder=3,
               label="state the rank keeps")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("peak host memory of the resume (MiB)")
    ax.set_title("resume on another world size: peak resident set rise per rank", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    lines = ["| head | resume | rank | old files (MiB) | kept by the rank (MiB) | before: whole files (MiB) | "
             "after: memory-mapped (MiB) | after / before | world size read (MiB) | time before / after |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['head']} | {r['old_world']} -> {r['new_world']} | {r['rank']} | {r['files_mib']:.0f} | "
                     f"{r['kept_mib']:.0f} | {r['before_mib']:.0f} | {r['after_mib']:.0f} | "
                     f"{r['after_mib'] / r['before_mib']:.2f} | {r['world_size_read_mib']:.1f} | "
                     f"{r['before_s']:.1f} s / {r['after_s']:.1f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1_000_000, help="identities (Partial FC centres)")
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--memory-size", type=int, default=400_000, help="Prototype Memory slots over all ranks")
    parser.add_argument("--heads", nargs="+", default=["partial_fc", "prototype_memory"])
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "protomem_bench_resume_memory"))
    args = parser.parse_args(argv)
    work = pathlib.Path(args.work_dir)
    rec = work / "data"
    make_synthetic_dataset(str(rec), 60, 6, val_identities=30, val_pairs=100, image_size=32, progress=False, num_workers=1)
    rows = []
    plan = [(head, old, new) for head in args.heads for old, new in CASES]
    with tqdm(total=len(plan) * 2, desc="resume memory", unit="run") as bar:
        for head in args.heads:
            job = write_job(work, head, args, str(rec))
            for old, new in CASES:
                output = work / f"{head}_w{old}"
                if output.exists():
                    shutil.rmtree(output)
                bar.set_postfix_str(f"{head}: write {old} rank(s)")
                spawn(save_worker, old, str(job), str(output))
                bar.update()
                files_mib = sum(checkpoint_path(output, r).stat().st_size for r in range(old)) / MiB
                dump = work / f"{head}_{old}to{new}"
                dump.mkdir(exist_ok=True)
                bar.set_postfix_str(f"{head}: resume {old} -> {new}")
                spawn(measure_worker, new, str(job), str(output), str(dump))
                bar.update()
                for r in range(new):
                    row = json.loads((dump / f"rank{r}.json").read_text())
                    rows.append({"head": head, "old_world": old, "new_world": new, "files_mib": files_mib, **row})
                shutil.rmtree(output)
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "measure": "rise of VmHWM over VmRSS during load_resume_state (peak reset via /proc/self/clear_refs)",
            "args": {k: v for k, v in vars(args).items() if k != "work_dir"}}
    (RESULTS / "resume_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, RESULTS / "resume_memory.png")
    md = table(rows)
    (RESULTS / "resume_memory.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
