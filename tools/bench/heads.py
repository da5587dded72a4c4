#!/usr/bin/env python
"""Head benchmark: Partial FC vs Prototype Memory, memory size vs class count, chunked logits,
storage precision.

Every configuration runs in a fresh process and times the head alone: forward + backward
(+ the SGD step of arcface_torch, momentum 0.9, weight decay 5e-4, where the head has parameters)
on a leaf embedding tensor that stands for the backbone output; batch of ``K=2`` images per
class. Prototype Memory starts full (every slot holds a distinct class) and keeps evicting.

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set (``VmHWM``,
reset through ``/proc/self/clear_refs`` after the warm-up step, else ``ru_maxrss``) during the timed
steps. ``peak`` is the increase over the freshly imported process (head state included: centres and
momentum, or the prototype memory); ``step peak`` the increase over the resident state after the
warm-up (the working memory of a step: logits, gradients).

Writes tools/bench/results/heads.json, heads.png and heads.md from one run and prints the table.

    python tools/bench/heads.py                 # full grid on CPU (about 20 minutes on 2 cores)
    python tools/bench/heads.py --quick         # small grid
    python tools/bench/heads.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # tools/bench/machine.py, beside this script

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[2]
EMBEDDING, BATCH, K = 512, 128, 2
CHUNK = 8192


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


# ----------------------------------------------------------------------------- grid
def config(group: str, head: str, num_classes: float, columns: float, batch: int = BATCH, chunk: int = 0,
           memory_dtype: str = "float32") -> dict:
    """One configuration: ``columns`` is the sampled centres (Partial FC) or the memory size (PM)."""
    num_classes, columns = int(num_classes), int(columns)
    return {"groups": [group], "head": head, "num_classes": num_classes, "columns": columns,
            "sample_rate": columns / num_classes if head == "partial_fc" else None,
            "batch": batch, "logits_chunk": chunk, "memory_dtype": memory_dtype}


def grid(quick: bool) -> list[dict]:
    configs = []
    classes = (1e5, 1e6) if quick else (1e5, 1e6, 2e6, 1e7)
    for n in classes:
        for rate in (1.0, 0.1):
            configs.append(config("pfc_vs_pm", "partial_fc", n, rate * n))
            configs.append(config("pfc_vs_pm", "prototype_memory", n, rate * n))
    for n in ((1e5, 1e6) if quick else (1e5, 1e7)):
        for m in ((1e4, 1e5) if quick else (1e4, 1e5, 1e6)):
            configs.append(config("pm_memory_size", "prototype_memory", n, m))
    for b in ((256,) if quick else (256, 1024)):
        for m in ((1e5,) if quick else (1e5, 1e6)):
            for chunk in (0, CHUNK):
                configs.append(config("chunked", "prototype_memory", 1e7, m, batch=b, chunk=chunk))
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


def config_key(c: dict) -> str:
    return f"{c['head']}|{c['num_classes']}|{c['columns']}|{c['batch']}|{c['logits_chunk']}|{c['memory_dtype']}"


def estimated_bytes(c: dict) -> int:
    """Resident need of a configuration (fitted to measured peaks on CPU), to skip what cannot fit."""
    d, b, cols = EMBEDDING, c["batch"], c["columns"]
    width = min(cols, c["logits_chunk"]) if c["logits_chunk"] else cols
    if c["head"] == "partial_fc":  # centres + momentum; dense gradient; normalised sampled centres
        return 4 * (2 * c["num_classes"] * d + c["num_classes"] * d + 3 * cols * d + 5 * b * width)
    state = {"float32": 4, "float16": 2, "bfloat16": 2}[c["memory_dtype"]] * cols * d
    return state + 4 * 4 * b * width  # about four (B, C) float32 buffers at the peak of a plain step


# ----------------------------------------------------------------------------- one configuration
def run_config(c: dict, device_name: str, warmup: int, min_iters: int, max_iters: int, budget_s: float) -> dict:
    """Measure one configuration in this (fresh) process."""
    import torch

    sys.path.insert(0, str(ROOT))
    from protomem_plugin.heads import PartialFC, PrototypeMemory
    from protomem_plugin.losses import CombinedMarginLoss

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    torch.ones(8, 8) @ torch.ones(8, 8)  # start the thread pool before the baseline
    base_kb = status_kb("VmRSS")
    maxrss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    optimizer = None
    if c["head"] == "partial_fc":
        head = PartialFC(margin, EMBEDDING, c["num_classes"], sample_rate=c["sample_rate"],
                         logits_chunk=c["logits_chunk"]).to(device)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        head = PrototypeMemory(margin, EMBEDDING, c["num_classes"], memory_size=c["columns"],
                               logits_chunk=c["logits_chunk"], memory_dtype=c["memory_dtype"]).to(device)
        fill_memory(head)
    x = torch.randn(c["batch"], EMBEDDING, device=device, requires_grad=True)
    generator = torch.Generator(device=device).manual_seed(1)

    def step() -> float:
        labels = torch.randint(0, c["num_classes"], (c["batch"] // K,), device=device, generator=generator)
        labels = labels.repeat_interleave(K)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = head(x, labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        x.grad = None
        return time.perf_counter() - start

    for _ in range(warmup):  # also creates the optimizer's momentum: part of the state, not of a step
        step()
    if cuda:
        torch.cuda.synchronize()
        state_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    state_kb = status_kb("VmRSS")
    hwm_reset = reset_peak_rss()
    times: list[float] = []
    while len(times) < min_iters or (len(times) < max_iters and sum(times) < budget_s):
        times.append(step())
    out = {"times_s": times, "time_ms": 1e3 * statistics.median(times),
           "load_average_1min": os.getloadavg()[0]}  # other work on the machine skews absolute times
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        out.update(peak_mb=peak / 2**20, step_peak_mb=(peak - state_bytes) / 2**20, state_mb=state_bytes / 2**20,
                   memory_measure="torch.cuda.max_memory_allocated")
    else:
        if hwm_reset:
            peak_kb, measure = status_kb("VmHWM"), "VmHWM after clear_refs"
        else:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_base + base_kb
            measure = "ru_maxrss"
        out.update(peak_mb=(peak_kb - base_kb) / 1024, step_peak_mb=(peak_kb - state_kb) / 1024,
                   state_mb=(state_kb - base_kb) / 1024, memory_measure=measure)
    if hasattr(head, "slot_class"):
        out["occupied_slots"] = int((head.slot_class >= 0).sum())
    return out


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


def run_grid(configs: list[dict], device: str, timeout: float, iters: tuple[int, int, int, float]) -> list[dict]:
    from tqdm import tqdm

    results = []
    for c in tqdm(configs, desc="head configurations", unit="config"):
        need = estimated_bytes(c)
        available = meminfo_kb("MemAvailable") * 1024 if device == "cpu" else None
        if available is not None and need > 0.9 * available:
            results.append({**c, "skipped": f"needs about {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"})
            continue
        payload = json.dumps({"config": c, "device": device, "iters": iters})
        try:
            out = spawn(["--worker", payload], timeout)
        except subprocess.TimeoutExpired:
            out = {"error": f"timed out after {timeout:.0f} s"}
        results.append({**c, **out})
    return results


def find(results: list[dict], **match) -> dict | None:
    for r in results:
        if all(r.get(k) == v for k, v in match.items()) and "time_ms" in r:
            return r
    return None


def targets(results: list[dict], quick: bool) -> list[dict]:
    """The stated targets, evaluated on this run (``met`` is None where a side could not be measured)."""
    out = []

    def add(name, a, b, value_fn, ok_fn):
        if a and b:
            value = value_fn(a, b)
            out.append({"target": name, "value": round(value, 3), "met": bool(ok_fn(value))})
        else:
            out.append({"target": name, "value": None, "met": None})

    n = 1_000_000 if quick else 2_000_000
    add(f"PM step time <= 0.5 x Partial FC(0.1) at {n:.0e} classes (equal columns)",
        find(results, head="prototype_memory", num_classes=n, columns=n // 10, batch=BATCH, logits_chunk=0,
             memory_dtype="float32"),
        find(results, head="partial_fc", num_classes=n, columns=n // 10, batch=BATCH),
        lambda a, b: a["time_ms"] / b["time_ms"], lambda v: v <= 0.5)
    big = 1_000_000 if quick else 10_000_000
    for m in (10_000, 100_000):
        add(f"PM peak memory at {big:.0e} classes within 5% of 1e+05 classes (M={m:.0e})",
            find(results, head="prototype_memory", num_classes=big, columns=m, batch=BATCH, logits_chunk=0,
                 memory_dtype="float32"),
            find(results, head="prototype_memory", num_classes=100_000, columns=m, batch=BATCH, logits_chunk=0,
                 memory_dtype="float32"),
            lambda a, b: a["peak_mb"] / b["peak_mb"], lambda v: abs(v - 1) <= 0.05)
    sizes = [(256, 100_000)] if quick else [(256, 1_000_000), (1024, 1_000_000)]
    for b, m in sizes:
        chunked = find(results, head="prototype_memory", columns=m, batch=b, logits_chunk=CHUNK, memory_dtype="float32")
        plain = find(results, head="prototype_memory", columns=m, batch=b, logits_chunk=0, memory_dtype="float32")
        add(f"chunked step peak <= 15% of plain at B={b}, M={m:.0e}", chunked, plain,
            lambda a, p: a["step_peak_mb"] / p["step_peak_mb"], lambda v: v <= 0.15)
        add(f"chunked step time <= 1.25 x plain at B={b}, M={m:.0e}", chunked, plain,
            lambda a, p: a["time_ms"] / p["time_ms"], lambda v: v <= 1.25)
    return out


def label(r: dict) -> str:
    if r["head"] == "partial_fc":
        return f"Partial FC (sample_rate {r['sample_rate']:g})"
    extra = f", chunk {r['logits_chunk']}" if r["logits_chunk"] else ""
    extra += f", {r['memory_dtype']}" if r["memory_dtype"] != "float32" else ""
    return f"PM{extra}"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu']} ({m['cores']} cores), {m['device']}, torch {m['torch']}, "
             f"embedding {EMBEDDING}, K={K}. Ratios are side by side in one run; absolute times only for this machine.",
             ""]
    lines += ["| group | head | classes | columns (sampled / memory) | B | step ms | peak MB | step peak MB | "
              "state MB | PM / PFC(same columns) time | note |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    results = report["results"]
    for group in ("pfc_vs_pm", "pm_memory_size", "chunked", "memory_dtype"):
        for r in results:
            if group not in r["groups"]:
                continue
            note = r.get("skipped") or r.get("error") or ""
            if "occupied_slots" in r and r["occupied_slots"] < r["columns"]:
                note = f"{r['occupied_slots']} slots occupied (memory > classes)"
            if "time_ms" not in r:
                lines.append(f"| {group} | {label(r)} | {r['num_classes']:.0e} | {r['columns']:.0e} | {r['batch']} "
                             f"| - | - | - | - | - | {note} |")
                continue
            ratio = ""
            if r["head"] == "prototype_memory" and group == "pfc_vs_pm":
                pfc = find(results, head="partial_fc", num_classes=r["num_classes"], columns=r["columns"], batch=r["batch"])
                if pfc:
                    ratio = f"{r['time_ms'] / pfc['time_ms']:.3f}"
            lines.append(
                f"| {group} | {label(r)} | {r['num_classes']:.0e} | {r['columns']:.0e} | {r['batch']} | "
                f"{r['time_ms']:.1f} | {r['peak_mb']:.0f} | {r['step_peak_mb']:.0f} | {r['state_mb']:.0f} | {ratio} | {note} |")
    lines += ["", "| target | value | met |", "|---|---:|---|"]
    verdict = {True: "yes", False: "no", None: "not measured (see the rows above)"}
    lines += [f"| {t['target']} | {t['value'] if t['value'] is not None else '-'} | {verdict[t['met']]} |"
              for t in report["targets"]]
    p = report.get("precision")
    if p and "float16" in p:
        lines += ["", f"Storage precision, {p['steps']} steps, {p['num_classes']} classes, memory {p['memory_size']}, "
                  f"B={p['batch']}, mean float32 loss {p['loss_float32_mean']:.3f}, memory fill {p['memory_fill']:.2f}:",
                  "", "| memory_dtype | max abs loss diff | mean abs loss diff | max rel diff |", "|---|---:|---:|---:|"]
        for d in ("float16", "bfloat16"):
            lines.append(f"| {d} | {p[d]['max_abs_diff']:.2e} | {p[d]['mean_abs_diff']:.2e} | {p[d]['max_rel_diff']:.2e} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if "time_ms" in r]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for name, match in (("Partial FC 1.0", dict(head="partial_fc", rate=1.0)), ("Partial FC 0.1", dict(head="partial_fc", rate=0.1)),
                        ("PM M=N", dict(head="prototype_memory", rate=1.0)), ("PM M=0.1N", dict(head="prototype_memory", rate=0.1))):
        pts = sorted((r["num_classes"], r["time_ms"]) for r in results if "pfc_vs_pm" in r["groups"]
                     and r["head"] == match["head"] and abs(r["columns"] / r["num_classes"] - match["rate"]) < 1e-9)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="num_classes", ylabel="head step time (ms)", title="Partial FC vs PM")
    ax.legend()
    ax = axes[1]
    for n in sorted({r["num_classes"] for r in results if "pm_memory_size" in r["groups"]}):
        pts = sorted((r["columns"], r["peak_mb"]) for r in results if "pm_memory_size" in r["groups"] and r["num_classes"] == n)
        ax.plot(*zip(*pts), marker="o", label=f"{n:.0e} classes")
    ax.set(xscale="log", yscale="log", xlabel="memory_size", ylabel="peak memory (MB)", title="PM cost vs num_classes")
    ax.legend()
    ax = axes[2]
    chunk = [r for r in results if "chunked" in r["groups"]]
    names = [f"B={r['batch']}\nM={r['columns']:.0e}\n{'chunk' if r['logits_chunk'] else 'plain'}" for r in chunk]
    ax.bar(range(len(chunk)), [r["step_peak_mb"] for r in chunk],
           color=["tab:green" if r["logits_chunk"] else "tab:gray" for r in chunk])
    ax.set_xticks(range(len(chunk)), names, fontsize=7)
    ax.set(yscale="log", ylabel="step peak memory (MB)", title="chunked vs plain logits")
    fig.suptitle(f"{report['machine']['cpu']} / {report['machine']['device']}, torch {report['machine']['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small grid (a few minutes)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--min-iters", type=int, default=2)
    parser.add_argument("--max-iters", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed steps per configuration")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration process")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--precision-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(run_config(job["config"], job["device"], *job["iters"])))
        return {}
    if args.precision_worker:
        print(json.dumps(precision_sequence(**json.loads(args.precision_worker))))
        return {}

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
               "memory_gib": round(meminfo_kb("MemTotal") / 2**20, 1)}
    started = time.time()
    results = run_grid(grid(args.quick), args.device, args.timeout,
                       (args.warmup, args.min_iters, args.max_iters, args.budget))
    precision_job = {"steps": 30 if args.quick else 100, "num_classes": 5000, "memory_size": 2000, "batch": BATCH}
    precision = spawn(["--precision-worker", json.dumps(precision_job)], args.timeout)
    report = {"machine": machine, "command": "python tools/bench/heads.py" + (" --quick" if args.quick else "")
              + (f" --device {args.device}" if args.device != "cpu" else ""),
              "wall_s": round(time.time() - started, 1), "results": results, "precision": precision,
              "targets": targets(results, args.quick)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heads.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out / "heads.md").write_text(table)
    plot(report, args.out / "heads.png")
    print(table)
    return report


if __name__ == "__main__":
    main()
