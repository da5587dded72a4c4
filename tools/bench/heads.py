#!/usr/bin/env python
"""Head benchmark: Partial FC (ours and, with ``--arcface-torch``, arcface_torch's own PartialFC_V2) vs
Prototype Memory and QAPM, memory size vs class count, chunked logits, storage precision, and each
step against its matrix-multiply floor.

Every configuration runs in a fresh process (torch pinned to ``--threads``, default 1) and times the
head alone: forward + backward (+ the SGD step of arcface_torch, momentum 0.9, weight decay 5e-4,
where the head has parameters) on a leaf embedding tensor that stands for the backbone output; batch
of ``K=2`` images per class. Prototype Memory starts full (every slot holds a distinct class) and
keeps evicting. On CPU the step time is the process CPU time (``time.process_time``: other jobs on
the machine disturb it less than wall time; the wall time is kept in the JSON); on CUDA it is the
synchronised wall time.

GEMM floor, measured in the same process before and after the timed steps: the matrix products a
step cannot avoid, timed alone on preallocated outputs. For PM/QAPM these are the logits
``normed @ memory.T`` and the embedding gradient ``grad_logits @ memory`` (``B x M x D`` each; the
gradient into this step's prototypes is a ``B x (B/K) x D`` product, negligible); Partial FC adds
the gradient of its sampled centres (``grad_logits.T @ normed``). Each product is timed whole (when
the ``(B, M)`` matrix takes at most 256 MiB) and in the column blocks of the fused margin softmax,
and the floor is the faster of the two. *GEMM efficiency* = floor / step (1.0: the step costs no
more than its products).

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs`` after the warm-up step and after freed heap memory has been handed
back with ``malloc_trim``, else ``ru_maxrss``) during the timed steps. ``peak`` is the increase over
the freshly imported process (head state included: centres and momentum, or the prototype memory
and the head's reused workspace); ``step peak`` the increase over the resident state after the
warm-up (the working memory of a step: logits, gradients).

A profile (torch.profiler, one step, top entries by self CPU time) of a few configurations goes to
``heads_profile.txt``. Writes tools/bench/results/heads.json, heads.png, heads.md and
heads_profile.txt from one run and prints the table.

    python tools/bench/heads.py --arcface-torch PATH   # full grid on CPU with PartialFC_V2 rows (about 30 minutes)
    python tools/bench/heads.py --quick                # small grid (about 10 minutes)
    python tools/bench/heads.py --device cuda
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # tools/bench/machine.py, beside this script

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[2]
EMBEDDING, BATCH, K = 512, 128, 2
KEY_BATCH = 256  # the Partial FC vs PM comparison (2e6 classes, sample rate 0.1, memory 2e5)
CHUNK = 8192
FULL_FLOOR_BYTES = 256 * 2**20  # largest (B, M) float32 matrix for the whole-product floor
TARGET_EFFICIENCY = 1 / 1.5
HEAD_NAMES = {"partial_fc": "Partial FC (ours)", "partial_fc_v2": "PartialFC_V2 (arcface_torch)",
              "prototype_memory": "PM", "qapm": "QAPM"}


# ----------------------------------------------------------------------------- machine
def meminfo_kb(key: str) -> int:
    for line in open("/proc/meminfo", encoding="utf-8"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def status_kb(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in kB."""
    for line in open("/proc/self/status", encoding="utf-8"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> bool:
    """Collect garbage and hand freed heap memory back to the system (glibc ``malloc_trim``), so that
    memory freed before a measurement does not count as resident in it."""
    gc.collect()
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------- grid
def config(group: str, head: str, num_classes: float, columns: float, batch: int = BATCH, chunk: int = 0,
           memory_dtype: str = "float32", margin: str = "ours") -> dict:
    """One configuration: ``columns`` is the sampled centres (Partial FC) or the memory size (PM/QAPM);
    ``margin``: ``"ours"`` (protomem's CombinedMarginLoss) or ``"arcface_torch"`` (the checkout's)."""
    num_classes, columns = int(num_classes), int(columns)
    partial = head in ("partial_fc", "partial_fc_v2")
    if partial:
        margin = "arcface_torch" if head == "partial_fc_v2" else margin
    return {"groups": [group], "head": head, "num_classes": num_classes, "columns": columns,
            "sample_rate": columns / num_classes if partial else None,
            "batch": batch, "logits_chunk": chunk, "memory_dtype": memory_dtype, "margin": margin}


def grid(quick: bool, arcface: bool = False) -> list[dict]:
    configs = []
    pfc_heads = ("partial_fc", "partial_fc_v2") if arcface else ("partial_fc",)
    pairs = ((1e5, 1.0), (1e5, 0.1), (1e6, 0.1)) if quick else (
        (1e5, 1.0), (1e5, 0.1), (1e6, 0.1), (2e6, 0.1), (1e7, 0.1))
    for n, rate in pairs:
        for head in pfc_heads + ("prototype_memory", "qapm"):
            configs.append(config("pfc_vs_pm", head, n, rate * n, batch=KEY_BATCH))
    if arcface:  # the hook's default: train_v2's own margin, which the heads can only call (no fused path)
        n = 1e6 if quick else 2e6
        configs.append(config("pfc_vs_pm", "prototype_memory", n, 0.1 * n, batch=KEY_BATCH, margin="arcface_torch"))
    for n in ((1e5, 1e6) if quick else (1e5, 1e7)):
        for m in ((1e4, 1e5) if quick else (1e4, 1e5, 1e6)):
            configs.append(config("pm_memory_size", "prototype_memory", n, m))
    for b in ((256,) if quick else (256, 1024)):
        for m in ((1e5,) if quick else (1e5, 1e6)):
            for chunk in (0, CHUNK):
                configs.append(config("chunked", "prototype_memory", 1e7, m, batch=b, chunk=chunk))
                if b == KEY_BATCH:
                    configs.append(config("chunked", "qapm", 1e7, m, batch=b, chunk=chunk))
    for dtype in ("float32", "float16", "bfloat16"):
        configs.append(config("memory_dtype", "prototype_memory", 1e7, 1e5 if quick else 1e6, memory_dtype=dtype))
    merged: dict[str, dict] = {}
    for c in configs:  # one run per distinct configuration, listed in every group that uses it
        key = config_key(c)
        if key in merged:
            merged[key]["groups"] += [g for g in c["groups"] if g not in merged[key]["groups"]]
        else:
            merged[key] = c
    return list(merged.values())


def profile_grid(quick: bool, arcface: bool = False) -> list[dict]:
    """Configurations profiled for heads_profile.txt."""
    m_small, m_big = (1e5, 1e5) if quick else (1e5, 1e6)
    out = [config("profile", "prototype_memory", 1e7, m_small, batch=KEY_BATCH),
           config("profile", "prototype_memory", 1e7, m_small, batch=KEY_BATCH, chunk=CHUNK),
           config("profile", "qapm", 1e7, m_small, batch=KEY_BATCH)]
    if not quick:
        out.append(config("profile", "prototype_memory", 1e7, m_big, batch=KEY_BATCH))
        out.append(config("profile", "prototype_memory", 1e7, m_big, batch=BATCH))
    if arcface:
        out.append(config("profile", "prototype_memory", 1e7, m_small, batch=KEY_BATCH, margin="arcface_torch"))
    return out


def config_key(c: dict) -> str:
    return (f"{c['head']}|{c['num_classes']}|{c['columns']}|{c['batch']}|{c['logits_chunk']}|{c['memory_dtype']}"
            f"|{c.get('margin', 'ours')}")


def estimated_bytes(c: dict) -> int:
    """Resident need of a configuration (fitted to measured peaks on CPU), to skip what cannot fit."""
    d, b, cols = EMBEDDING, c["batch"], c["columns"]
    width = min(cols, c["logits_chunk"]) if c["logits_chunk"] else cols
    if c["head"] in ("partial_fc", "partial_fc_v2"):  # centres + momentum; dense gradient; normalised sampled centres
        return 4 * (2 * c["num_classes"] * d + c["num_classes"] * d + 3 * cols * d + 5 * b * width)
    state = {"float32": 4, "float16": 2, "bfloat16": 2}[c["memory_dtype"]] * cols * d
    if c.get("margin", "ours") == "ours":  # fused margin softmax: blocks of about 2**20 logits
        width = min(width, max(256, 2**20 // b))
    return state + 4 * 4 * b * width  # about four (B, C) float32 buffers at the peak of an unfused step


# ----------------------------------------------------------------------------- one configuration
def _arcface_module(path: str, name: str, file: str):
    """Import one file of an arcface_torch checkout under a private module name."""
    spec = importlib.util.spec_from_file_location(name, str(Path(path) / file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arcface_modules(path: str, device_type: str) -> dict:
    """arcface_torch's ``partial_fc_v2`` and ``losses`` from the checkout at ``path``, with the process
    group PartialFC_V2 needs (a world of one, file store); on a machine without CUDA its ``.cuda()``
    calls do nothing (the hook's CPU fallback)."""
    import torch
    import torch.distributed as dist

    if device_type == "cpu":
        from protomem_plugin.arcface_torch.compat import apply_cpu_fallback

        apply_cpu_fallback()
    if not dist.is_initialized():
        store = Path(tempfile.mkdtemp(prefix="heads_bench_")) / "store"
        dist.init_process_group("nccl" if device_type == "cuda" and torch.cuda.is_available() else "gloo",
                                init_method=f"file://{store}", rank=0, world_size=1)
    return {"partial_fc_v2": _arcface_module(path, "arcface_partial_fc_v2", "partial_fc_v2.py"),
            "losses": _arcface_module(path, "arcface_losses", "losses.py")}


def build(c: dict, device, arcface: dict | None):
    """The head of a configuration, its optimizer (or ``None``) and a ``step() -> (wall_s, cpu_s)``."""
    import torch

    from protomem_plugin.heads import PartialFC, PrototypeMemory, QualityAwarePrototypeMemory
    from protomem_plugin.losses import CombinedMarginLoss

    cuda = device.type == "cuda"
    if c.get("margin", "ours") == "arcface_torch":
        if arcface is None:
            raise ValueError("this configuration needs --arcface-torch")
        margin = arcface["losses"].CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0)  # as train_v2 builds it
    else:
        margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    optimizer = None
    if c["head"] == "partial_fc_v2":  # as train_v2.py builds it
        head = arcface["partial_fc_v2"].PartialFC_V2(margin, EMBEDDING, c["num_classes"], c["sample_rate"], False)
        head.train().to(device)
    elif c["head"] == "partial_fc":
        head = PartialFC(margin, EMBEDDING, c["num_classes"], sample_rate=c["sample_rate"],
                         logits_chunk=c["logits_chunk"]).to(device)
    else:
        cls = QualityAwarePrototypeMemory if c["head"] == "qapm" else PrototypeMemory
        head = cls(margin, EMBEDDING, c["num_classes"], memory_size=c["columns"],
                   logits_chunk=c["logits_chunk"], memory_dtype=c["memory_dtype"]).to(device)
        fill_memory(head)
    if c["head"] in ("partial_fc", "partial_fc_v2"):
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(c["batch"], EMBEDDING, device=device, requires_grad=True)
    generator = torch.Generator(device=device).manual_seed(1)

    def step() -> tuple[float, float]:
        labels = torch.randint(0, c["num_classes"], (c["batch"] // K,), device=device, generator=generator)
        labels = labels.repeat_interleave(K)
        if cuda:
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        loss = head(x, labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        x.grad = None
        return time.perf_counter() - start, time.process_time() - cpu

    return head, optimizer, step


def floor_columns(c: dict, head) -> int:
    """Logit columns of a step: the sampled centres (Partial FC) or the occupied slots (PM/QAPM)."""
    if c["head"] == "partial_fc_v2":
        return int(head.num_sample) if c["sample_rate"] < 1 else int(head.num_local)
    if c["head"] == "partial_fc":
        return int(head.num_sample)
    return int(min(c["columns"], c["num_classes"]))


def gemm_floor(c: dict, head, device, reps: int) -> dict:
    """Seconds of the step's unavoidable matrix products alone (see the module docstring), best of
    the whole products and the fused path's column blocks; ``reps`` repetitions, the fastest kept."""
    import torch

    from protomem_plugin.heads.fused import default_block

    cuda = device.type == "cuda"
    rows, dim, cols = c["batch"], EMBEDDING, floor_columns(c, head)
    products = 3 if c["head"] in ("partial_fc", "partial_fc_v2") else 2
    memory = getattr(head, "memory", None)
    if memory is not None and memory.dtype == torch.float32 and memory.shape[0] >= cols:
        weight = memory[:cols]
    else:  # the products run in float32: a float32 stand-in of the columns
        weight = torch.randn(cols, dim, device=device)
    x = torch.randn(rows, dim, device=device)
    grad_x = torch.empty(rows, dim, device=device)
    grad_w = torch.empty(cols, dim, device=device) if products == 3 else None
    block = min(default_block(rows, device), cols)
    logits_block = torch.empty(rows * block, device=device)

    def blocked() -> None:
        grad_x.zero_()
        for start in range(0, cols, block):
            w = weight[start : start + block]
            logits = logits_block[: rows * w.shape[0]].view(rows, w.shape[0])
            torch.mm(x, w.t(), out=logits)
            grad_x.addmm_(logits, w)
            if grad_w is not None:
                torch.mm(logits.t(), x, out=grad_w[start : start + w.shape[0]])

    schedules = {"blocks": blocked}
    whole = None
    if rows * cols * 4 <= FULL_FLOOR_BYTES:
        whole = torch.empty(rows, cols, device=device)

        def full() -> None:
            torch.mm(x, weight.t(), out=whole)
            torch.mm(whole, weight, out=grad_x)
            if grad_w is not None:
                torch.mm(whole.t(), x, out=grad_w)

        schedules["whole"] = full
    out = {}
    for name, fn in schedules.items():
        if name == "whole":
            fn()  # first touch of the (B, M) output
        best = float("inf")
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize()
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            if cuda:
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - start) if cuda else (time.process_time() - cpu))
        out[name] = best
    del whole, logits_block, grad_w
    return {"floor_s": min(out.values()), "schedules_s": out, "products": products, "columns": cols,
            "block": block}


def run_config(c: dict, device_name: str, warmup: int, min_iters: int, max_iters: int, budget_s: float,
               threads: int = 1, arcface_path: str | None = None, floor_reps: int = 1) -> dict:
    """Measure one configuration in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    import protomem_plugin.heads  # noqa: F401  (imported before the baseline)

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    arcface = None
    if arcface_path and (c["head"] == "partial_fc_v2" or c.get("margin") == "arcface_torch"):
        arcface = arcface_modules(arcface_path, device.type)
    torch.manual_seed(0)
    torch.ones(8, 8) @ torch.ones(8, 8)  # start the thread pool before the baseline
    base_kb = status_kb("VmRSS")
    maxrss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    head, optimizer, step = build(c, device, arcface)
    for _ in range(warmup):  # also creates the optimizer's momentum: part of the state, not of a step
        step()
    floors = [gemm_floor(c, head, device, floor_reps)]
    if cuda:
        torch.cuda.synchronize()
        state_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    trimmed = release_free_memory() if not cuda else False
    state_kb = status_kb("VmRSS")
    hwm_reset = reset_peak_rss()
    walls: list[float] = []
    cpus: list[float] = []
    while len(walls) < min_iters or (len(walls) < max_iters and sum(walls) < budget_s):
        wall, cpu = step()
        walls.append(wall)
        cpus.append(cpu)
    timed = walls if cuda else cpus
    out = {"times_s": timed, "wall_times_s": walls, "cpu_times_s": cpus,
           "time_ms": 1e3 * statistics.median(timed), "wall_ms": 1e3 * statistics.median(walls),
           "cpu_ms": 1e3 * statistics.median(cpus), "time_measure": "wall (synchronised)" if cuda else "process CPU",
           "threads": threads, "load_average_1min": os.getloadavg()[0]}  # other work on the machine skews times
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        out.update(peak_mb=peak / 2**20, step_peak_mb=(peak - state_bytes) / 2**20, state_mb=state_bytes / 2**20,
                   memory_measure="torch.cuda.max_memory_allocated")
    else:
        if hwm_reset:
            peak_kb, measure = status_kb("VmHWM"), "VmHWM after malloc_trim and clear_refs"
        else:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_base + base_kb
            measure = "ru_maxrss"
        out.update(peak_mb=(peak_kb - base_kb) / 1024, step_peak_mb=(peak_kb - state_kb) / 1024,
                   state_mb=(state_kb - base_kb) / 1024, memory_measure=measure, heap_trimmed=trimmed)
    floors.append(gemm_floor(c, head, device, floor_reps))
    floor_s = statistics.median([f["floor_s"] for f in floors])
    out.update(floor_ms=1e3 * floor_s, gemm_efficiency=floor_s / (out["time_ms"] / 1e3),
               floor=floors, floor_products=floors[0]["products"], floor_columns=floors[0]["columns"])
    workspace = getattr(head, "workspace", None)
    if workspace is not None:
        out["workspace_mb"] = workspace.nbytes / 2**20
    if hasattr(head, "slot_class"):
        out["occupied_slots"] = int((head.slot_class >= 0).sum())
    return out


def profile_config(c: dict, device_name: str, threads: int = 1, arcface_path: str | None = None,
                   rows: int = 18) -> dict:
    """One step of a configuration under torch.profiler (after a warm-up step): the top entries by self
    time, and the share of the matrix products."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    device = torch.device(device_name)
    arcface = None
    if arcface_path and (c["head"] == "partial_fc_v2" or c.get("margin") == "arcface_torch"):
        arcface = arcface_modules(arcface_path, device.type)
    torch.manual_seed(0)
    head, _, step = build(c, device, arcface)
    step()
    unprofiled = step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall, cpu = step()
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"))
    return {"table": events.table(sort_by=sort, row_limit=rows), "self_cpu_ms": total / 1e3,
            "gemm_self_cpu_ms": gemm / 1e3, "gemm_share": gemm / total if total else None,
            "step_cpu_ms_profiled": cpu * 1e3, "step_cpu_ms_unprofiled": unprofiled[1] * 1e3}


def fill_memory(head) -> None:
    """Every slot (up to num_classes) holds a distinct class, written at step 0; a few steps have passed."""
    import torch
    import torch.nn.functional as F

    slots = head.num_local_slots
    count = min(slots, head.num_classes)
    stride = max(1, head.num_classes // count)
    g = torch.Generator(device=head.memory.device).manual_seed(2)
    with torch.no_grad():
        for start in range(0, count, 65536):  # bounded transient memory
            stop = min(count, start + 65536)
            rows = torch.randn(stop - start, head.embedding_size, generator=g, device=head.memory.device)
            head.memory[start:stop] = F.normalize(rows, dim=1).to(head.memory.dtype)
        head.slot_class[:count] = torch.arange(count, device=head.memory.device) * stride
        head.slot_step[:count] = 0
        head.step.fill_(3)


# ----------------------------------------------------------------------------- storage precision
def precision_sequence(steps: int, num_classes: int, memory_size: int, batch: int) -> dict:
    """|loss(float16 / bfloat16 storage) - loss(float32)| on one sequence of class-structured batches."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from protomem_plugin.heads import PrototypeMemory
    from protomem_plugin.losses import CombinedMarginLoss

    g = torch.Generator().manual_seed(0)
    # classes in 20 families (cosine about 0.8 within a family): hard negatives, a non-trivial loss
    families = F.normalize(torch.randn(20, EMBEDDING, generator=g), dim=1)
    own = torch.randn(num_classes, EMBEDDING, generator=g) / EMBEDDING**0.5
    centres = F.normalize(families[torch.arange(num_classes) % 20] + 0.5 * own, dim=1)
    heads = {d: PrototypeMemory(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), EMBEDDING, num_classes,
                                memory_size=memory_size, memory_dtype=d) for d in ("float32", "float16", "bfloat16")}
    losses: dict[str, list[float]] = {d: [] for d in heads}
    for _ in range(steps):
        labels = torch.randperm(num_classes, generator=g)[: batch // K].repeat_interleave(K)
        x = centres[labels] + 1.0 * torch.randn(batch, EMBEDDING, generator=g) / EMBEDDING**0.5
        x = x * (10 + 5 * torch.rand(batch, 1, generator=g))
        for d, head in heads.items():
            xl = x.clone().requires_grad_(True)
            loss = head(xl, labels)
            loss.backward()
            losses[d].append(loss.item())
    ref = torch.tensor(losses["float32"], dtype=torch.float64)
    out = {"steps": steps, "num_classes": num_classes, "memory_size": memory_size, "batch": batch,
           "loss_float32_mean": float(ref.mean()),
           "memory_fill": heads["float32"].diagnostics()["memory_fill"]}
    for d in ("float16", "bfloat16"):
        diff = (torch.tensor(losses[d], dtype=torch.float64) - ref).abs()
        out[d] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                  "max_rel_diff": float((diff / ref.abs()).max())}
    return out


# ----------------------------------------------------------------------------- driver
def spawn(args: list[str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_grid(configs: list[dict], device: str, timeout: float, iters: tuple[int, int, int, float],
             threads: int = 1, arcface: str | None = None, floor_reps: int = 1) -> list[dict]:
    from tqdm import tqdm

    results = []
    for c in tqdm(configs, desc="head configurations", unit="config"):
        if (c["head"] == "partial_fc_v2" or c.get("margin") == "arcface_torch") and not arcface:
            continue
        need = estimated_bytes(c)
        available = meminfo_kb("MemAvailable") * 1024 if device == "cpu" else None
        if available is not None and need > 0.9 * available:
            results.append({**c, "skipped": f"needs about {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"})
            continue
        payload = json.dumps({"config": c, "device": device, "iters": iters, "threads": threads,
                              "arcface": arcface, "floor_reps": floor_reps})
        results.append({**c, **spawn_or_timeout(["--worker", payload], timeout)})
    return results


def spawn_or_timeout(args: list[str], timeout: float) -> dict:
    """A worker's result, or an ``error`` entry when it ran past ``timeout`` seconds."""
    try:
        return spawn(args, timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}


def run_profiles(configs: list[dict], device: str, timeout: float, threads: int, arcface: str | None) -> list[dict]:
    out = []
    for c in configs:
        if c.get("margin") == "arcface_torch" and not arcface:
            continue
        payload = json.dumps({"config": c, "device": device, "threads": threads, "arcface": arcface})
        out.append({**c, **spawn_or_timeout(["--profile-worker", payload], timeout)})
    return out


def find(results: list[dict], **match) -> dict | None:
    for r in results:
        if all(r.get(k) == v for k, v in match.items()) and "time_ms" in r:
            return r
    return None


def targets(results: list[dict], quick: bool) -> list[dict]:
    """The stated targets, evaluated on this run (``met`` is None where a side could not be measured)."""
    out = []

    def add(name, a, b, value_fn, ok_fn, detail=""):
        if a and b:
            value = value_fn(a, b)
            out.append({"target": name, "value": round(value, 3), "met": bool(ok_fn(value)), "detail": detail})
        else:
            out.append({"target": name, "value": None, "met": None, "detail": detail})

    n = 1_000_000 if quick else 2_000_000
    pm = find(results, head="prototype_memory", num_classes=n, columns=n // 10, batch=KEY_BATCH, logits_chunk=0,
              memory_dtype="float32", margin="ours")
    for head in ("partial_fc", "partial_fc_v2"):
        add(f"PM step time <= 0.5 x {HEAD_NAMES[head]} 0.1 at {n:.0e} classes, B={KEY_BATCH} (equal columns)",
            pm, find(results, head=head, num_classes=n, columns=n // 10, batch=KEY_BATCH),
            lambda a, b: a["time_ms"] / b["time_ms"], lambda v: v <= 0.5)
    for head in ("prototype_memory", "qapm"):
        for chunked in (False, True):
            rows = [r for r in results if r["head"] == head and "gemm_efficiency" in r and r["columns"] >= 100_000
                    and r.get("margin") == "ours" and bool(r["logits_chunk"]) == chunked]
            name = (f"{HEAD_NAMES[head]} {'chunked' if chunked else 'plain'}: step <= 1.5 x GEMM floor "
                    f"(efficiency >= {TARGET_EFFICIENCY:.3f}) at every M >= 1e5")
            if rows:
                worst = min(rows, key=lambda r: r["gemm_efficiency"])
                out.append({"target": name, "value": round(worst["gemm_efficiency"], 3),
                            "met": all(r["gemm_efficiency"] >= TARGET_EFFICIENCY for r in rows),
                            "detail": f"lowest of {len(rows)} rows: {label(worst)}, M={worst['columns']:.0e}, "
                                      f"B={worst['batch']}"})
            else:
                out.append({"target": name, "value": None, "met": None, "detail": ""})
    big = 1_000_000 if quick else 10_000_000
    for m in ((10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)):
        add(f"PM peak memory at {big:.0e} classes within 5% of 1e+05 classes (M={m:.0e})",
            find(results, head="prototype_memory", num_classes=big, columns=m, batch=BATCH, logits_chunk=0,
                 memory_dtype="float32", margin="ours"),
            find(results, head="prototype_memory", num_classes=100_000, columns=m, batch=BATCH, logits_chunk=0,
                 memory_dtype="float32", margin="ours"),
            lambda a, b: a["peak_mb"] / b["peak_mb"], lambda v: abs(v - 1) <= 0.05)
    sizes = [(256, 100_000)] if quick else [(256, 1_000_000), (1024, 1_000_000)]
    for b, m in sizes:
        chunked = find(results, head="prototype_memory", columns=m, batch=b, logits_chunk=CHUNK, memory_dtype="float32",
                       margin="ours")
        plain = find(results, head="prototype_memory", columns=m, batch=b, logits_chunk=0, memory_dtype="float32",
                     margin="ours")
        logits_mb = b * m * 4 / 2**20
        for name, r in (("plain", plain), ("chunked", chunked)):
            add(f"PM {name} step peak <= 15% of the (B, M) float32 logits ({logits_mb:.0f} MB) at B={b}, M={m:.0e}",
                r, r, lambda a, _: a["step_peak_mb"] / logits_mb, lambda v: v <= 0.15)
        add(f"chunked step time <= 1.25 x plain at B={b}, M={m:.0e}", chunked, plain,
            lambda a, p: a["time_ms"] / p["time_ms"], lambda v: v <= 1.25)
    return out


def label(r: dict) -> str:
    if r["head"] in ("partial_fc", "partial_fc_v2"):
        return f"{HEAD_NAMES[r['head']]}, sample_rate {r['sample_rate']:g}"
    extra = f", chunk {r['logits_chunk']}" if r["logits_chunk"] else ""
    extra += f", {r['memory_dtype']}" if r["memory_dtype"] != "float32" else ""
    extra += ", arcface_torch margin" if r.get("margin") == "arcface_torch" else ""
    return f"{HEAD_NAMES[r['head']]}{extra}"


GROUPS = ("pfc_vs_pm", "pm_memory_size", "chunked", "memory_dtype")


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu']} ({m['cores']} cores), {m['device']}, torch {m['torch']}, "
             f"{m.get('threads', 1)} torch thread(s) per process, embedding {EMBEDDING}, K={K}. "
             f"Step times are {'process CPU time' if m['device'] == 'cpu' else 'synchronised wall time'}; "
             "ratios are side by side in one run; absolute times only for this machine.",
             ""]
    lines += ["| group | head | classes | columns (sampled / memory) | B | step ms | GEMM floor ms | GEMM efficiency "
              "| peak MB | step peak MB | state MB | PM / PFC time (ours / V2) | note |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    results = report["results"]
    for group in GROUPS:
        for r in results:
            if group not in r["groups"]:
                continue
            note = r.get("skipped") or r.get("error") or ""
            if "occupied_slots" in r and r["occupied_slots"] < r["columns"]:
                note = f"{r['occupied_slots']} slots occupied (memory > classes)"
            if r.get("margin") == "arcface_torch" and r["head"] not in ("partial_fc", "partial_fc_v2"):
                note = (note + "; " if note else "") + "margin called on the (B, M) logits (no fused path)"
            if "time_ms" not in r:
                lines.append(f"| {group} | {label(r)} | {r['num_classes']:.0e} | {r['columns']:.0e} | {r['batch']} "
                             f"| - | - | - | - | - | - | - | {note} |")
                continue
            ratio = ""
            if r["head"] in ("prototype_memory", "qapm") and group == "pfc_vs_pm":
                parts = []
                for head in ("partial_fc", "partial_fc_v2"):
                    pfc = find(results, head=head, num_classes=r["num_classes"], columns=r["columns"], batch=r["batch"])
                    parts.append(f"{r['time_ms'] / pfc['time_ms']:.3f}" if pfc else "-")
                ratio = " / ".join(parts)
            lines.append(
                f"| {group} | {label(r)} | {r['num_classes']:.0e} | {r['columns']:.0e} | {r['batch']} | "
                f"{r['time_ms']:.1f} | {r['floor_ms']:.1f} | {r['gemm_efficiency']:.2f} | {r['peak_mb']:.0f} | "
                f"{r['step_peak_mb']:.0f} | {r['state_mb']:.0f} | {ratio} | {note} |")
    lines += ["", "GEMM floor: the step's unavoidable matrix products timed alone in the same process (PM/QAPM: "
              "logits and embedding gradient, B x M x D each; Partial FC also its centres' gradient); "
              "GEMM efficiency = floor / step.", ""]
    lines += ["| target | value | met | detail |", "|---|---:|---|---|"]
    verdict = {True: "yes", False: "no", None: "not measured (see the rows above)"}
    lines += [f"| {t['target']} | {t['value'] if t['value'] is not None else '-'} | {verdict[t['met']]} "
              f"| {t.get('detail', '')} |" for t in report["targets"]]
    p = report.get("precision")
    if p and "float16" in p:
        lines += ["", f"Storage precision, {p['steps']} steps, {p['num_classes']} classes, memory {p['memory_size']}, "
                  f"B={p['batch']}, mean float32 loss {p['loss_float32_mean']:.3f}, memory fill {p['memory_fill']:.2f}:",
                  "", "| memory_dtype | max abs loss diff | mean abs loss diff | max rel diff |", "|---|---:|---:|---:|"]
        for d in ("float16", "bfloat16"):
            lines.append(f"| {d} | {p[d]['max_abs_diff']:.2e} | {p[d]['mean_abs_diff']:.2e} | {p[d]['max_rel_diff']:.2e} |")
    profiles = [q for q in report.get("profiles", []) if "gemm_share" in q]
    if profiles:
        lines += ["", "Profile of one step (torch.profiler; full tables in heads_profile.txt):", "",
                  "| head | classes | M | B | step ms (profiled) | matrix products share of self CPU time |",
                  "|---|---:|---:|---:|---:|---:|"]
        for q in profiles:
            lines.append(f"| {label(q)} | {q['num_classes']:.0e} | {q['columns']:.0e} | {q['batch']} | "
                         f"{q['step_cpu_ms_profiled']:.0f} | {q['gemm_share']:.2f} |")
    return "\n".join(lines) + "\n"


def profile_text(report: dict) -> str:
    lines = [f"Profiles of one head step (torch.profiler, after a warm-up step); {report['command']}",
             f"Machine: {report['machine']['cpu']}, {report['machine'].get('threads', 1)} torch thread(s).", ""]
    for q in report.get("profiles", []):
        lines.append(f"=== {label(q)}: {q['num_classes']:.0e} classes, M={q['columns']:.0e}, B={q['batch']}")
        if "table" not in q:
            lines += [f"error: {q.get('error')}", ""]
            continue
        lines.append(f"step CPU {q['step_cpu_ms_profiled']:.0f} ms profiled ({q['step_cpu_ms_unprofiled']:.0f} ms "
                     f"unprofiled); matrix products {q['gemm_self_cpu_ms']:.0f} of {q['self_cpu_ms']:.0f} ms self CPU "
                     f"({100 * q['gemm_share']:.0f}%)")
        lines += [q["table"], ""]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if "time_ms" in r]
    fig = plt.figure(figsize=(17, 10))
    grid_spec = fig.add_gridspec(2, 3, height_ratios=(1, 1.1))
    axes = [fig.add_subplot(grid_spec[0, i]) for i in range(3)] + [fig.add_subplot(grid_spec[1, :])]
    ax = axes[0]
    for name, head, rate in (("Partial FC 1.0 (ours)", "partial_fc", 1.0), ("Partial FC 0.1 (ours)", "partial_fc", 0.1),
                             ("PartialFC_V2 1.0", "partial_fc_v2", 1.0), ("PartialFC_V2 0.1", "partial_fc_v2", 0.1),
                             ("PM M=N", "prototype_memory", 1.0), ("PM M=0.1N", "prototype_memory", 0.1),
                             ("QAPM M=0.1N", "qapm", 0.1)):
        pts = sorted((r["num_classes"], r["time_ms"]) for r in results if "pfc_vs_pm" in r["groups"]
                     and r["head"] == head and (head == "partial_fc_v2" or r.get("margin") == "ours")
                     and abs(r["columns"] / r["num_classes"] - rate) < 1e-9)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="num_classes", ylabel="head step time (ms)",
           title=f"Partial FC vs PM (B={KEY_BATCH})")
    ax.legend(fontsize=7)
    ax = axes[1]
    for n in sorted({r["num_classes"] for r in results if "pm_memory_size" in r["groups"]}):
        pts = sorted((r["columns"], r["peak_mb"]) for r in results if "pm_memory_size" in r["groups"] and r["num_classes"] == n)
        ax.plot(*zip(*pts), marker="o", label=f"{n:.0e} classes")
    ax.set(xscale="log", yscale="log", xlabel="memory_size", ylabel="peak memory (MB)", title="PM cost vs num_classes")
    ax.legend()
    ax = axes[2]
    chunk = [r for r in results if "chunked" in r["groups"]]
    names = [f"{HEAD_NAMES[r['head']]} {'chunk' if r['logits_chunk'] else 'plain'}, B={r['batch']}, M={r['columns']:.0e}"
             for r in chunk]
    ax.bar(range(len(chunk)), [max(r["step_peak_mb"], 0.1) for r in chunk],
           color=["tab:green" if r["logits_chunk"] else "tab:gray" for r in chunk])
    ax.set_xticks(range(len(chunk)), names, fontsize=6, rotation=60, ha="right")
    ax.set(yscale="log", ylabel="step peak memory (MB)", title="chunked vs plain logits")
    ax = axes[3]
    eff = sorted((r for r in results if "gemm_efficiency" in r), key=lambda r: (
        r["head"] not in ("prototype_memory", "qapm"), r["columns"], r["batch"], label(r), r["num_classes"]))
    names = [f"{label(r)}\n{r['num_classes']:.0e} cl., M={r['columns']:.0e}\nB={r['batch']}" for r in eff]
    colors = ["tab:gray" if r["head"] not in ("prototype_memory", "qapm")
              else "tab:red" if r["gemm_efficiency"] < TARGET_EFFICIENCY else "tab:blue" for r in eff]
    ax.bar(range(len(eff)), [r["gemm_efficiency"] for r in eff], color=colors)
    ax.axhline(TARGET_EFFICIENCY, color="k", linestyle="--", linewidth=1, label="target 1/1.5 (PM/QAPM, M >= 1e5)")
    ax.set_xticks(range(len(eff)), names, fontsize=5.5, rotation=90)
    ax.set(ylabel="GEMM floor / step", ylim=(0, 1.05),
           title="GEMM efficiency (blue: PM/QAPM, red: below target, gray: Partial FC)")
    ax.legend(fontsize=8)
    fig.suptitle(f"{report['machine']['cpu']} / {report['machine']['device']}, torch {report['machine']['torch']}, "
                 f"{report['machine'].get('threads', 1)} thread(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small grid (a few minutes)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--arcface-torch", type=Path, default=None,
                        help="arcface_torch checkout (recognition/arcface_torch): adds its PartialFC_V2 rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per configuration process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--min-iters", type=int, default=2)
    parser.add_argument("--max-iters", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed steps per configuration")
    parser.add_argument("--floor-reps", type=int, default=1, help="repetitions of each floor measurement")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled steps")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration process")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", help=argparse.SUPPRESS)
    parser.add_argument("--precision-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(run_config(job["config"], job["device"], *job["iters"], threads=job["threads"],
                                    arcface_path=job["arcface"], floor_reps=job["floor_reps"])))
        return {}
    if args.profile_worker:
        job = json.loads(args.profile_worker)
        print(json.dumps(profile_config(job["config"], job["device"], threads=job["threads"],
                                        arcface_path=job["arcface"])))
        return {}
    if args.precision_worker:
        print(json.dumps(precision_sequence(**json.loads(args.precision_worker))))
        return {}

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    arcface = None
    if args.arcface_torch is not None:
        arcface = str(args.arcface_torch.resolve())
        if not (Path(arcface) / "partial_fc_v2.py").is_file() or not (Path(arcface) / "losses.py").is_file():
            parser.error(f"--arcface-torch {args.arcface_torch}: no partial_fc_v2.py and losses.py there "
                         "(expected recognition/arcface_torch of an insightface checkout)")
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
               "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
               "memory_gib": round(meminfo_kb("MemTotal") / 2**20, 1)}
    started = time.time()
    results = run_grid(grid(args.quick, arcface is not None), args.device, args.timeout,
                       (args.warmup, args.min_iters, args.max_iters, args.budget), threads=args.threads,
                       arcface=arcface, floor_reps=args.floor_reps)
    precision_job = {"steps": 30 if args.quick else 100, "num_classes": 5000, "memory_size": 2000, "batch": BATCH}
    precision = spawn(["--precision-worker", json.dumps(precision_job)], args.timeout)
    profiles = [] if args.no_profile else run_profiles(profile_grid(args.quick, arcface is not None), args.device,
                                                       args.timeout, args.threads, arcface)
    command = "python tools/bench/heads.py" + (" --quick" if args.quick else "") + (
        f" --device {args.device}" if args.device != "cpu" else "") + (
        f" --arcface-torch {args.arcface_torch}" if arcface else "") + (
        f" --threads {args.threads}" if args.threads != 1 else "")
    report = {"machine": machine, "command": command, "wall_s": round(time.time() - started, 1),
              "arcface_torch": arcface, "results": results, "precision": precision, "profiles": profiles,
              "targets": targets(results, args.quick)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heads.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out / "heads.md").write_text(table)
    if profiles:
        (args.out / "heads_profile.txt").write_text(profile_text(report))
    plot(report, args.out / "heads.png")
    print(table)
    return report


if __name__ == "__main__":
    main()
