#!/usr/bin/env python
"""How the per-rank cost of the training pipeline grows with the number of identities (1e5 .. 1e8).

Side by side in one run, for our code and for arcface_torch's approach where it fits in memory:

* sampler: ``GroupedBatchSampler`` over ``IdentityLayout.from_counts`` (10 images per identity,
  batch 128, K=2, rank 0 of 8): build time, first batch, mean of the next 100 batches;
* arcface_torch's ``DistributedSampler`` (the real class with ``--arcface-torch``, else the same
  ``torch.randperm(n).tolist()`` construct), per rank per epoch, skipped where its predicted memory
  exceeds 0.6 x MemAvailable;
* dataset open: ``InsightFaceRec`` on an index-only InsightFace-layout dataset (tiny payloads,
  written by a vectorised generator), twice (the first open of a dataset above 2**24 keys builds
  the label cache, the second reads it); 1e9 images extrapolated linearly from the two largest;
* heads: PM and QAPM (``memory_size`` 1e6, float16 storage, embedding 512, batch 128, K=2) and
  Partial FC 0.1 (arcface_torch's ``PartialFC_V2`` with ``--arcface-torch``, else ours).

Every measurement runs in a fresh process and reports time and the peak resident set (``VmHWM``,
reset through ``/proc/self/clear_refs``) over the freshly imported process. Heads run as one
process (world size 1). Writes tools/bench/results/scale.json, scale.png and scale.md, prints the table.

    python tools/bench/scale.py --arcface-torch /path/to/insightface/recognition/arcface_torch
    python tools/bench/scale.py                     # arcface_torch's approach without a checkout
    python tools/bench/scale.py --quick --out /tmp/scale   # tiny sizes, well under a minute
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
RESULTS = BENCH / "results"
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from heads import estimated_bytes, fill_memory, meminfo_kb, reset_peak_rss, status_kb  # noqa: E402
from heads import config as head_config  # noqa: E402
from machine import cpu_name  # noqa: E402

IMAGES_PER_IDENTITY = 10
BATCH, K, WORLD, EMBEDDING = 128, 2, 8, 512
MEMORY_SIZE, QUICK_MEMORY_SIZE = 1_000_000, 4096
NEXT_BATCHES = 100
FIT_FRACTION = 0.6  # of MemAvailable, for the predicted-memory skips
SAMPLER_TARGET_BYTES, SAMPLER_TARGET_S = 10**9, 30.0
HEAD_STATE_TARGET_BYTES, HEAD_TOLERANCE = 2 * 10**9, 0.05
FLOAT32_EXACT = 1 << 24
PERM_BYTES = {"plain": 8 + 40, "arcface": 40 + 16}  # per image; see predicted_perm_bytes

# ----------------------------------------------------------------------------- index-only datasets
MAGIC = 0xCED7230A
PAYLOAD = b"\xff\xd8\xff\xd9"  # JPEG start + end markers: a few bytes, never decoded
IMAGE_RECORD = 36  # framed bytes: magic, lrec, IRHeader (24), payload (4)
IDENTITY_RECORD = 40  # framed bytes: magic, lrec, IRHeader (24), two float32 labels
_IR_BYTES = 24


def identity_counts(num_images: int, per_identity: int = IMAGES_PER_IDENTITY) -> np.ndarray:
    """``per_identity`` images per identity, the last identity takes the remainder."""
    identities = -(-num_images // per_identity)
    counts = np.full(identities, per_identity, dtype=np.int64)
    counts[-1] = num_images - per_identity * (identities - 1)
    return counts


def _digits(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Decimal ASCII digits of non-negative ``values`` right-aligned in ``width`` columns, and the mask
    of the columns that belong to each number."""
    v = values.astype(np.int64, copy=True)
    out = np.empty((len(v), width), dtype=np.uint8)
    for col in range(width - 1, -1, -1):
        v, digit = np.divmod(v, 10)
        out[:, col] = digit + 48
    lengths = np.ones(len(values), dtype=np.int64)
    for p in range(1, width):
        lengths += values >= 10**p
    return out, np.arange(width) >= width - lengths[:, None]


def index_lines(keys: np.ndarray, offsets: np.ndarray) -> bytes:
    """``key<TAB>offset<NEWLINE>`` lines of a ``.idx`` file, formatted without a Python loop over lines."""
    if len(keys) == 0:
        return b""
    kw, ow = len(str(int(keys.max()))), len(str(int(offsets.max())))
    kd, km = _digits(keys, kw)
    od, om = _digits(offsets, ow)
    n = len(keys)
    table = np.empty((n, kw + ow + 2), dtype=np.uint8)
    mask = np.ones((n, kw + ow + 2), dtype=bool)
    table[:, :kw], mask[:, :kw] = kd, km
    table[:, kw] = ord("\t")
    table[:, kw + 1 : kw + 1 + ow], mask[:, kw + 1 : kw + 1 + ow] = od, om
    table[:, -1] = ord("\n")
    return table[mask].tobytes()


def _check_no_magic(words: np.ndarray, first_payload_word: int) -> None:
    if (words[:, first_payload_word:] == MAGIC).any():
        raise ValueError("a record would contain the RecordIO magic word (a split record): not supported here")


def _float_words(values: np.ndarray) -> np.ndarray:
    return values.astype("<f4").view("<u4")


def dataset_files_bytes(counts: np.ndarray) -> int:
    """Predicted size of ``train.rec`` + ``train.idx`` (an upper bound for the index)."""
    images, identities = int(counts.sum()), len(counts)
    rec = IDENTITY_RECORD + IMAGE_RECORD * images + IDENTITY_RECORD * identities
    return rec + (images + identities + 1) * (len(str(images + identities)) + len(str(rec)) + 2)


def write_index_only_dataset(root: str | Path, counts: np.ndarray, *, chunk: int = 1 << 22,
                             progress: bool = False) -> dict:
    """Write an InsightFace-layout dataset (``train.rec``, ``train.idx``, ``property``) whose images are
    ``PAYLOAD`` stand-ins: identity ``c`` holds ``counts[c]`` images, keys 1..I, identity records after
    them, header at key 0, all labels float32 as a RecordIO writer stores them. Byte-for-byte what
    :class:`RecordIOWriter` writes for the same records, vectorised in chunks of ``chunk`` records."""
    from tqdm import tqdm

    from protomem_plugin.data.recordio import write_property

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counts = np.asarray(counts, dtype=np.int64)
    images, identities = int(counts.sum()), len(counts)
    starts = np.empty(identities + 1, dtype=np.int64)  # image key range [starts[c], starts[c+1])
    starts[0] = 1
    np.cumsum(counts, out=starts[1:])
    starts[1:] += 1
    first_identity, end_key = images + 1, images + 1 + identities
    image_base, identity_base = IDENTITY_RECORD, IDENTITY_RECORD + IMAGE_RECORD * images
    payload_word = np.frombuffer(PAYLOAD, dtype="<u4")[0]
    total = 1 + images + identities
    bar = tqdm(total=total, desc=f"writing {images:.0e} images", unit="rec", unit_scale=True, leave=False,
               disable=not progress)
    with open(root / "train.rec", "wb") as rec, open(root / "train.idx", "wb") as idx:
        header = np.array([[MAGIC, 32, 2, 0, 0, 0, 0, 0, 0, 0]], dtype="<u4")
        header[0, 8:] = _float_words(np.array([first_identity, end_key]))
        rec.write(header.tobytes())
        idx.write(index_lines(np.zeros(1, np.int64), np.zeros(1, np.int64)))
        bar.update(1)
        for lo in range(1, images + 1, chunk):
            keys = np.arange(lo, min(images + 1, lo + chunk), dtype=np.int64)
            labels = np.searchsorted(starts, keys, side="right") - 1
            words = np.zeros((len(keys), IMAGE_RECORD // 4), dtype="<u4")
            words[:, 0], words[:, 1] = MAGIC, IMAGE_RECORD - 8  # cflag 0 (whole record), length
            words[:, 3] = _float_words(labels)  # flag 0: the scalar label field
            words[:, 4], words[:, 5] = keys & 0xFFFFFFFF, keys >> 32  # id = key, id2 = 0
            words[:, 8] = payload_word
            _check_no_magic(words, 2)
            rec.write(words.tobytes())
            idx.write(index_lines(keys, image_base + IMAGE_RECORD * (keys - 1)))
            bar.update(len(keys))
        for lo in range(0, identities, chunk):
            ids = np.arange(lo, min(identities, lo + chunk), dtype=np.int64)
            words = np.zeros((len(ids), IDENTITY_RECORD // 4), dtype="<u4")
            words[:, 0], words[:, 1], words[:, 2] = MAGIC, IDENTITY_RECORD - 8, 2  # flag 2: two float labels
            words[:, 8], words[:, 9] = _float_words(starts[ids]), _float_words(starts[ids + 1])
            _check_no_magic(words, 2)
            rec.write(words.tobytes())
            idx.write(index_lines(first_identity + ids, identity_base + IDENTITY_RECORD * ids))
            bar.update(len(ids))
    bar.close()
    write_property(str(root / "property"), identities, 112, 112)
    return {"images": images, "identities": identities, "first_identity_key": first_identity, "end_key": end_key,
            "header_exact": bool(float(np.float32(first_identity)) == first_identity
                                 and float(np.float32(end_key)) == end_key),
            "rec_bytes": (root / "train.rec").stat().st_size, "idx_bytes": (root / "train.idx").stat().st_size}


# ----------------------------------------------------------------------------- measurements (fresh process)
def _arcface_module(path: str, name: str, file: str):
    """Import one file of an arcface_torch checkout under a private module name."""
    spec = importlib.util.spec_from_file_location(name, str(Path(path) / file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_for(job: dict) -> dict:
    """Everything a job imports, before the baseline is taken."""
    import torch  # protomem_plugin imports it anyway

    torch.set_num_threads(job.get("threads", 1))
    mods: dict = {}
    kind = job["kind"]
    if kind == "sampler":
        from protomem_plugin.data.identity_layout import IdentityLayout
        from protomem_plugin.data.sampler import GroupedBatchSampler

        mods.update(IdentityLayout=IdentityLayout, GroupedBatchSampler=GroupedBatchSampler)
    elif kind == "perm":
        mods["torch"] = torch
        if job.get("arcface"):
            mods["sampler"] = _arcface_module(job["arcface"], "arcface_utils_distributed_sampler",
                                              "utils/utils_distributed_sampler.py")
    elif kind == "open":
        from protomem_plugin.data.recordio import InsightFaceRec

        mods["InsightFaceRec"] = InsightFaceRec
    elif kind == "head":
        from protomem_plugin import heads
        from protomem_plugin.losses import CombinedMarginLoss

        mods.update(torch=torch, heads=heads, CombinedMarginLoss=CombinedMarginLoss)
        if job.get("arcface"):
            from protomem_plugin.arcface_torch.compat import apply_cpu_fallback, set_single_process_env

            set_single_process_env()
            apply_cpu_fallback()  # arcface_torch's .cuda() calls do nothing on a machine without CUDA
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group("gloo")  # PartialFC_V2 needs a process group
            mods["pfc"] = _arcface_module(job["arcface"], "arcface_partial_fc_v2", "partial_fc_v2.py")
            mods["losses"] = _arcface_module(job["arcface"], "arcface_losses", "losses.py")
        torch.manual_seed(0)
        torch.ones(8, 8) @ torch.ones(8, 8)  # start the thread pool before the baseline
    return mods


def _measure_sampler(job: dict, mods: dict) -> dict:
    n = job["identities"]
    start = time.perf_counter()
    counts = np.full(n, IMAGES_PER_IDENTITY, np.uint8)
    layout = mods["IdentityLayout"].from_counts(counts)
    sampler = mods["GroupedBatchSampler"](layout, batch_size=BATCH, samples_per_class=K, rank=0, world_size=WORLD,
                                          seed=0)
    built = time.perf_counter()
    first = sampler.batch(epoch=0, index=0)
    first_done = time.perf_counter()
    following = min(NEXT_BATCHES, len(sampler) - 1)
    for b in range(1, following + 1):
        sampler.batch(epoch=0, index=b)
    end = time.perf_counter()
    return {"build_s": built - start, "first_batch_s": first_done - built, "time_s": first_done - start,
            "per_batch_ms": 1e3 * (end - first_done) / max(following, 1), "batches_timed": following,
            "batches_per_epoch": len(sampler), "batch_size": int(first.size), "layout_bytes": layout.nbytes}


def _measure_perm(job: dict, mods: dict) -> dict:
    torch, n = mods["torch"], job["images"]
    start = time.perf_counter()
    if "sampler" in mods:  # arcface_torch's DistributedSampler: the whole permutation as a list, then a slice

        class Images:
            def __len__(self) -> int:
                return n

        sampler = mods["sampler"].DistributedSampler(Images(), num_replicas=WORLD, rank=0, shuffle=True, seed=0)
        sampler.set_epoch(0)
        it = iter(sampler)
        mine = None
    else:
        g = torch.Generator()
        g.manual_seed(0)
        indices = torch.randperm(n, generator=g).tolist()
        mine = indices[0::WORLD]
        it = iter(mine)
    first = [next(it) for _ in range(BATCH)]
    first_done = time.perf_counter()
    done = 0
    for _ in range(NEXT_BATCHES):
        batch = [x for _, x in zip(range(BATCH), it)]
        if len(batch) < BATCH:
            break
        done += 1
    end = time.perf_counter()
    return {"time_s": first_done - start, "per_batch_ms": 1e3 * (end - first_done) / max(done, 1),
            "batches_timed": done, "batch_size": len(first)}


def _measure_open(job: dict, mods: dict) -> dict:
    start = time.perf_counter()
    rec = mods["InsightFaceRec"](job["root"])
    out = {"time_s": time.perf_counter() - start, "label_source": rec.label_source, "num_images": len(rec),
           "num_classes": rec.num_classes}
    out["peak_kb_before_checks"] = status_kb("VmHWM")
    out["rss_split_kb"] = (status_kb("RssAnon"), status_kb("RssFile"))  # anonymous vs mapped .rec pages
    if rec.identity_ranges is not None:  # what the sampler's layout would use, against the labels read
        from_ranges = rec.identity_ranges[:, 1] - rec.identity_ranges[:, 0]
        from_labels = np.bincount(rec.labels, minlength=len(from_ranges))
        out["identities_with_wrong_range_count"] = int((from_ranges != from_labels[: len(from_ranges)]).sum())
    return out


def _measure_head(job: dict, mods: dict) -> dict:
    torch, heads = mods["torch"], mods["heads"]
    n, which = job["identities"], job["head"]
    start = time.perf_counter()
    optimizer = None
    if which in ("pm", "qapm"):
        cls = heads.PrototypeMemory if which == "pm" else heads.QualityAwarePrototypeMemory
        head = cls(mods["CombinedMarginLoss"](64.0, 1.0, 0.5, 0.0), EMBEDDING, n, memory_size=job["memory_size"],
                   memory_dtype="float16")
        fill_memory(head)
    else:
        if "pfc" in mods:
            head = mods["pfc"].PartialFC_V2(mods["losses"].CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), EMBEDDING, n,
                                            0.1, False)
        else:
            head = heads.PartialFC(mods["CombinedMarginLoss"](64.0, 1.0, 0.5, 0.0), EMBEDDING, n, sample_rate=0.1)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    setup = time.perf_counter() - start
    x = torch.randn(BATCH, EMBEDDING, requires_grad=True)
    generator = torch.Generator().manual_seed(1)

    def step() -> tuple[float, float]:
        labels = torch.randint(0, n, (BATCH // K,), generator=generator).repeat_interleave(K)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = head(x, labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        x.grad = None
        return time.perf_counter() - t0, time.process_time() - c0

    step()  # warm-up; also creates the optimizer's momentum (state, not working memory)
    times, cpu = zip(*(step() for _ in range(3)))
    state = sum(t.nbytes for t in head.state_dict().values() if isinstance(t, torch.Tensor))
    if optimizer is not None:
        state += sum(t.nbytes for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    out = {"time_s": setup, "per_batch_ms": 1e3 * statistics.median(times), "cpu_ms": 1e3 * statistics.median(cpu),
           "times_s": list(times), "cpu_times_s": list(cpu), "state_bytes": state}
    if hasattr(head, "slot_class"):
        out["occupied_slots"] = int((head.slot_class >= 0).sum())
    return out


MEASURE = {"sampler": _measure_sampler, "perm": _measure_perm, "open": _measure_open, "head": _measure_head}


def run_one(job: dict) -> dict:
    """Measure one job in this (fresh) process: time and peak RSS over the freshly imported process."""
    started = time.perf_counter()
    mods = _import_for(job)
    base_kb = status_kb("VmRSS")
    base_split = (status_kb("RssAnon"), status_kb("RssFile"))
    maxrss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_reset = reset_peak_rss()
    out = MEASURE[job["kind"]](job, mods)
    split = out.pop("rss_split_kb", None) or (status_kb("RssAnon"), status_kb("RssFile"))
    out["anon_mb_end"], out["file_mb_end"] = ((now - was) / 1024 for now, was in zip(split, base_split))
    peak_kb = out.pop("peak_kb_before_checks", None) or status_kb("VmHWM")
    if not hwm_reset:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_base + base_kb
    out.update(peak_mb=(peak_kb - base_kb) / 1024, memory_measure="VmHWM after clear_refs" if hwm_reset else "ru_maxrss",
               process_s=time.perf_counter() - started, load_average_1min=os.getloadavg()[0])
    return out


# ----------------------------------------------------------------------------- driver
def spawn(job: dict, timeout: float) -> dict:
    """Run one job in a fresh interpreter; its last stdout line is the JSON result."""
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_one", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_bytes() -> int:
    return meminfo_kb("MemAvailable") * 1024


def predicted_perm_bytes(images: int, arcface: bool) -> int:
    """arcface_torch's sampler per rank and epoch: the int64 permutation (8 B) while ``tolist`` makes a Python
    int (28 B, 32 with the allocator's rounding) and a list slot (8 B) per image; the real class then copies
    the list twice (``indices * 1`` then ``[:total_size]``: 16 B) after the permutation is freed."""
    return PERM_BYTES["arcface" if arcface else "plain"] * images


def predicted_pfc_bytes(identities: int) -> int:
    """Partial FC 0.1 (centres, dense gradient, momentum, sampled centres, logits): heads.py's estimate."""
    return estimated_bytes(head_config("scale", "partial_fc", identities, max(1, identities // 10)))


def approach_labels(arcface: bool) -> dict:
    return {
        "sampler": "GroupedBatchSampler (ours)",
        "perm": "DistributedSampler (arcface_torch)" if arcface else "randperm + tolist (as arcface_torch)",
        "open1": "InsightFaceRec, open #1 (ours)",
        "open2": "InsightFaceRec, open #2 (ours)",
        "pm": "PM, M={m}, float16 (ours)",
        "qapm": "QAPM, M={m}, float16 (ours)",
        "pfc": "PartialFC_V2 0.1 (arcface_torch)" if arcface else "Partial FC 0.1 (ours, as arcface_torch)",
    }


def plan(args) -> dict:
    identities = [1000, 10_000] if args.quick else [10**5, 10**6, 10**7, 10**8]
    # 1e8 - 1 images: header keys 1e8 and 1.1e8 are exact in float32 (1e8 + 1 is not; see the probe)
    images = [1000, 10_000] if args.quick else [10**5, 10**6, 10**7, 10**8 - 1]
    probe = [] if args.quick else [FLOAT32_EXACT + 2]  # first identity key 2**24 + 3: rounded in float32
    return {"identities": identities, "open_images": images, "probe_images": probe,
            "memory_size": QUICK_MEMORY_SIZE if args.quick else MEMORY_SIZE}


def run_all(args, p: dict) -> list[dict]:
    from tqdm import tqdm

    arcface = str(args.arcface_torch) if args.arcface_torch else None
    names = approach_labels(bool(arcface))
    m = p["memory_size"]
    comps = set(args.components.split(","))
    jobs: list[tuple[str, dict]] = []
    for n in p["identities"]:
        if "sampler" in comps:
            jobs.append(("sampler", {"kind": "sampler", "identities": n}))
        if "perm" in comps:
            jobs.append(("perm", {"kind": "perm", "identities": n, "images": n * IMAGES_PER_IDENTITY, "arcface": arcface}))
    for which in ("pm", "qapm", "pfc"):
        if "head" in comps or which in comps:
            for n in p["identities"]:
                jobs.append((which, {"kind": "head", "head": which, "identities": n, "memory_size": m,
                                     "arcface": arcface if which == "pfc" else None}))
    if "open" in comps:
        for images in p["open_images"] + p["probe_images"]:
            jobs.append(("open", {"kind": "open", "images": images, "probe": images in p["probe_images"]}))
    results = []
    bar = tqdm(jobs, desc="scale", unit="job")
    for name, job in bar:
        job["threads"] = args.threads
        bar.set_postfix_str(f"{name} {job.get('identities', job.get('images')):.0e}")
        if name == "open":
            results += run_open(job, args, names)
            continue
        row = {"component": "head" if name in ("pm", "qapm") else name,
               "approach": names[name].format(m=f"{m:.0e}"), "identities": job["identities"],
               "images": job["identities"] * IMAGES_PER_IDENTITY}
        need = None
        if name == "perm":
            need = predicted_perm_bytes(job["images"], bool(arcface))
        elif name == "pfc":
            need = predicted_pfc_bytes(job["identities"])
        if need is not None:
            row["predicted_bytes"] = need
            avail = available_bytes()
            if need > FIT_FRACTION * avail:
                row["skipped"] = (f"does not fit (needs ~{need / 1e9:.1f} GB, {FIT_FRACTION} x MemAvailable = "
                                  f"{FIT_FRACTION * avail / 1e9:.1f} GB)")
                results.append(row)
                continue
        if name in ("pm", "qapm"):
            row["memory_size"] = m
        results.append({**row, **spawn(job, args.timeout)})
    return results


def run_open(job: dict, args, names: dict) -> list[dict]:
    """Write one index-only dataset, open it twice in fresh processes, delete it (unless --keep)."""
    images = job["images"]
    counts = identity_counts(images)
    root = Path(args.data_dir) / f"images_{images}"
    base = {"component": "open", "identities": len(counts), "images": images}
    if job["probe"]:
        base["probe"] = "header keys not exact in float32"
    size = dataset_files_bytes(counts)
    root.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root.parent).free
    stamp_path = root / "scale_dataset.json"
    stamp = {"counts_sum": images, "identities": len(counts), "generator": 1}
    if size * 3 > free and not stamp_path.exists():
        return [{**base, "approach": names["open1"], "predicted_bytes": size,
                 "skipped": f"disk: needs 3 x {size / 1e9:.1f} GB, {free / 1e9:.1f} GB free"}]
    info: dict = {}
    if stamp_path.exists() and json.loads(stamp_path.read_text()).get("stamp") == stamp:
        info = json.loads(stamp_path.read_text())["info"]
        info["reused"] = True
    else:
        if root.exists():
            shutil.rmtree(root)
        started = time.perf_counter()
        info = write_index_only_dataset(root, counts, progress=True)
        info["write_s"] = time.perf_counter() - started
        stamp_path.write_text(json.dumps({"stamp": stamp, "info": info}))
    for path in root.glob("train.labels.*"):  # the first open starts without a label cache
        path.unlink()
    rows = []
    try:
        for i, name in enumerate(("open1", "open2")):
            out = spawn({"kind": "open", "root": str(root), "threads": args.threads}, args.timeout)
            out["label_cache_exists"] = any(root.glob("train.labels.npy"))
            rows.append({**base, "approach": names[name], "dataset": info, **out})
            if "error" in out:
                break
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def extrapolate(results: list[dict], target_images: int) -> list[dict]:
    """Open time and peak at ``target_images``, linear through the two largest measured exact-header points."""
    out = []
    for approach in sorted({r["approach"] for r in results if r["component"] == "open"}):
        pts = sorted((r["images"], r) for r in results if r["approach"] == approach and "time_s" in r
                     and not r.get("probe") and not r.get("extrapolated"))
        if len(pts) < 2:
            continue
        (x1, a), (x2, b) = pts[-2], pts[-1]
        if target_images <= x2:
            continue

        def line(key: str) -> float:  # never below the largest measurement (noise can tilt tiny points down)
            return max(b[key], a[key] + (b[key] - a[key]) * (target_images - x1) / (x2 - x1))

        out.append({"component": "open", "approach": approach, "identities": target_images // IMAGES_PER_IDENTITY,
                    "images": target_images, "extrapolated": True, "time_s": line("time_s"),
                    "peak_mb": line("peak_mb"), "from_images": [x1, x2], "label_source": b.get("label_source")})
    return out


def find(results: list[dict], **match) -> dict | None:
    for r in results:
        if all(r.get(k) == v for k, v in match.items()) and "per_batch_ms" in r:
            return r
    return None


def annotate(results: list[dict], p: dict) -> list[dict]:
    """Per-row target checks and the heads' ratios to their smallest and first full-memory rows; the summary."""
    targets = []
    small = p["identities"][0]
    full = next((n for n in p["identities"] if n >= p["memory_size"]), None)
    largest = p["identities"][-1]
    for r in results:
        if r["component"] == "sampler" and "peak_mb" in r:
            r["met"] = bool(r["peak_mb"] * 2**20 <= SAMPLER_TARGET_BYTES and r["time_s"] <= SAMPLER_TARGET_S)
        if r["component"] == "head" and "per_batch_ms" in r:
            for tag, n in (("smallest", small), ("full", full)):
                ref = find(results, approach=r["approach"], identities=n) if n and r["identities"] > n else None
                if ref:
                    r[f"time_ratio_{tag}"] = r["cpu_ms"] / ref["cpu_ms"]
                    r[f"wall_ratio_{tag}"] = r["per_batch_ms"] / ref["per_batch_ms"]
                    r[f"peak_ratio_{tag}"] = r["peak_mb"] / ref["peak_mb"]
            if "time_ratio_smallest" in r:
                r["met"] = bool(r["state_bytes"] < HEAD_STATE_TARGET_BYTES  # CPU time: wall time is too noisy here
                                and abs(r["time_ratio_smallest"] - 1) <= HEAD_TOLERANCE
                                and abs(r["peak_ratio_smallest"] - 1) <= HEAD_TOLERANCE)

    def add(name: str, value, met) -> None:
        targets.append({"target": name, "value": value, "met": met})

    s = next((r for r in results if r["component"] == "sampler" and r["identities"] == largest), None)
    ok = s is not None and "peak_mb" in s
    add(f"sampler peak RSS <= 1 GB at {largest:.0e} identities (MB)", round(s["peak_mb"], 1) if ok else None,
        bool(s["peak_mb"] * 2**20 <= SAMPLER_TARGET_BYTES) if ok else None)
    add(f"sampler build + first batch <= 30 s at {largest:.0e} identities (s)", round(s["time_s"], 2) if ok else None,
        bool(s["time_s"] <= SAMPLER_TARGET_S) if ok else None)
    for head in sorted({r["approach"] for r in results if r["component"] == "head"}):
        r = find(results, approach=head, identities=largest)
        add(f"{head}: state < 2 GB at {largest:.0e} classes (MB)", round(r["state_bytes"] / 2**20, 1) if r else None,
            bool(r["state_bytes"] < HEAD_STATE_TARGET_BYTES) if r else None)
        for what in ("time", "wall", "peak"):
            for tag, n in (("smallest", small), ("full", full)):
                if tag == "full" and (full is None or full >= largest):
                    continue
                value = r.get(f"{what}_ratio_{tag}") if r else None
                label = {"time": "step CPU time", "wall": "step wall time", "peak": "peak memory"}[what]
                extra = " (memory full at both)" if tag == "full" else ""
                add(f"{head}: {label} at {largest:.0e} within 5% of {n:.0e} classes{extra} (ratio)",
                    round(value, 3) if value is not None else None,
                    bool(abs(value - 1) <= HEAD_TOLERANCE) if value is not None else None)
    return targets


# ----------------------------------------------------------------------------- report
def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def note_of(r: dict) -> str:
    notes = []
    for key in ("skipped", "error"):
        if r.get(key):
            notes.append(r[key].replace("|", "/"))
    if r.get("extrapolated"):
        notes.append(f"extrapolated (linear from {r['from_images'][0]:.0e} and {r['from_images'][1]:.0e} images)")
    if r.get("probe"):
        notes.append(r["probe"])
    if r["component"] == "open" and "label_source" in r and not r.get("extrapolated"):
        notes.append(f"labels from {r['label_source']}")
        if "anon_mb_end" in r:
            notes.append(f"after open: {r['anon_mb_end']:.0f} MB anonymous + {r['file_mb_end']:.0f} MB mapped file pages")
        if r.get("label_cache_exists"):
            notes.append("label cache present after this open")
        if r.get("identities_with_wrong_range_count"):
            notes.append(f"{r['identities_with_wrong_range_count']} identities' float32 ranges disagree with their labels")
    if r["component"] == "open" and isinstance(r.get("dataset"), dict) and r["approach"].endswith("#1 (ours)"):
        d = r["dataset"]
        if "write_s" in d:
            notes.append(f"dataset {(d['rec_bytes'] + d['idx_bytes']) / 1e9:.2f} GB written in {d['write_s']:.0f} s")
    if "occupied_slots" in r and r["occupied_slots"] < r.get("memory_size", 0):
        notes.append(f"{r['occupied_slots']} of {r['memory_size']} slots occupied (classes < memory)")
    return "; ".join(notes)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Command: `{report['command']}`", "",
             f"Machine: {m['cpu']} ({m['cores']} cores), {m['memory_gib']} GiB, torch {m['torch']}, numpy {m['numpy']}; "
             f"run took {report['wall_s'] / 60:.1f} min; 1-min load average {report['load_average'][0]:.2f} at the start, "
             f"{report['load_average'][1]:.2f} at the end. Another CPU-heavy job shared the machine, so times are "
             "noisy: compare rows of one run, and read absolute times as indicative only.", "",
             "| component | approach | identities | images | time s | per batch / step ms | step CPU ms | peak MB | "
             "state MB | predicted MB | vs smallest: CPU time / peak | vs first full memory: CPU time / peak | "
             "target met | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    verdict = {True: "yes", False: "no", None: "-"}
    for r in report["results"]:
        ratios = []
        for tag in ("smallest", "full"):
            t, pk = r.get(f"time_ratio_{tag}"), r.get(f"peak_ratio_{tag}")
            ratios.append(f"{t:.3f} / {pk:.3f}" if t is not None else "")
        state = r.get("state_bytes")
        pred = r.get("predicted_bytes")
        lines.append(
            f"| {r['component']} | {r['approach']} | {r['identities']:.0e} | {r['images']:.0e} | "
            f"{_fmt(r.get('time_s'), '.3f')} | {_fmt(r.get('per_batch_ms'), '.2f')} | {_fmt(r.get('cpu_ms'), '.0f', '')} | "
            f"{_fmt(r.get('peak_mb'), '.0f')} | "
            f"{_fmt(state / 2**20 if state else None, '.0f', '')} | {_fmt(pred / 2**20 if pred else None, '.0f', '')} | "
            f"{ratios[0]} | {ratios[1]} | {verdict[r.get('met')]} | {note_of(r)} |")
    lines += ["", "| target | value | met |", "|---|---:|---|"]
    lines += [f"| {t['target']} | {_fmt(t['value'], '')} | {verdict[t['met']] if t['met'] is not None else 'not measured'} |"
              for t in report["targets"]]
    lines += ["", "Columns: *time s* = sampler: build + first batch (time to the first batch of an epoch); "
              "arcface_torch's sampler: time to the first batch of an epoch (permutation, list, rank slice); "
              "open: `InsightFaceRec(root)`; heads: construction (+ filling the memory / initialising the centres). "
              f"*per batch / step ms* = samplers: mean of the next {NEXT_BATCHES} batches; heads: median of 3 steps "
              "(forward + backward, + SGD momentum step for Partial FC) after 1 warm-up; *step CPU ms* the same steps' "
              "process CPU time, which the other job disturbs far less than wall time: the ratios and the targets "
              "use it (the wall-time ratios are in the targets table and the JSON). *peak MB* = VmHWM increase "
              "over the freshly imported process (MiB); for the open it includes the pages of the memory-mapped .rec "
              "that were touched (file-backed, reclaimable), split in the note. *state MB* = tensor bytes of the head's state (PM: memory + "
              "slot tables; Partial FC: centres + momentum). *predicted MB* = the prediction that decides a skip "
              f"(> {FIT_FRACTION} x MemAvailable): arcface_torch's sampler {PERM_BYTES['plain']} B per image "
              f"({PERM_BYTES['arcface']} B for the real class, which copies the list twice after freeing the "
              "tensor), Partial FC heads.py's estimate. Sampler: 10 images per identity, batch 128, K=2, rank 0 of 8. "
              "Heads: one process (world size 1), embedding 512, batch 128, K=2; with 8 ranks each would hold 1/8 of "
              f"the memory or centres. Every process runs torch with {report['settings']['torch_threads']} "
              "thread(s): with the other job on both cores, two OpenMP threads made a head step up to 30x slower. "
              "Open: index-only datasets (tiny payloads), 10 images per identity, just written (page cache "
              "warm); #1 starts without a label cache, #2 follows it."]
    if 10**8 - 1 in report["settings"]["open_images"]:
        lines[-1] += (" The largest dataset has 1e8 - 1 images so that its header keys (1e8, 1.1e8) are exact in "
                      "float32; the probe row (2**24 + 2 images) has a header whose first identity-record key "
                      "(2**24 + 3) float32 rounds.")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    series = []
    for r in rows:
        key = (r["component"], r["approach"])
        if key not in series and not r.get("probe"):
            series.append(key)
    for i, (component, approach) in enumerate(series):
        color = f"C{i % 10}"
        pts = sorted((r for r in rows if r["approach"] == approach and not r.get("probe")), key=lambda r: r["identities"])
        for ax, value in ((axes[0], lambda r: r.get("peak_mb")),
                          (axes[1], lambda r: r["per_batch_ms"] / 1e3 if component == "head" or component == "pfc"
                           else r.get("time_s"))):
            measured = [(r["identities"], value(r)) for r in pts if "peak_mb" in r and not r.get("extrapolated")]
            measured = [(x, y) for x, y in measured if y and y > 0]
            extra = [(r["identities"], value(r)) for r in pts if r.get("extrapolated")]
            if measured:
                ax.plot(*zip(*measured), marker="o", color=color, label=approach)
            if extra and measured:
                ax.plot(*zip(*([measured[-1]] + extra)), ls="--", marker="x", color=color)
            if ax is axes[0]:
                predicted = [(r["identities"], r["predicted_bytes"] / 2**20) for r in pts
                             if r.get("skipped") and r.get("predicted_bytes")]
                if predicted:
                    ax.plot(*zip(*predicted), ls="none", marker="o", mfc="none", color=color)
    axes[0].set(xscale="log", yscale="log", xlabel="identities (open: images / 10)", ylabel="peak RSS increase (MB)",
                title="peak memory per rank (hollow: predicted, does not fit)")
    axes[1].set(xscale="log", yscale="log", xlabel="identities (open: images / 10)",
                ylabel="seconds", title="time: first batch / open (s); heads: step (s); dashed = extrapolated")
    axes[0].legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"{m['cpu']} ({m['cores']} cores), torch {m['torch']}: {report['command']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command_line(argv: list[str]) -> str:
    nice = os.nice(0)
    prefix = f"nice -n {nice} " if nice else ""
    return prefix + "python tools/bench/scale.py" + "".join(" " + shlex.quote(a) for a in argv)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_one"]:
        print(json.dumps(run_one(json.loads(argv[1]))))
        return {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (well under a minute)")
    parser.add_argument("--arcface-torch", type=Path, metavar="PATH",
                        help="recognition/arcface_torch of an insightface checkout: use its DistributedSampler and "
                             "PartialFC_V2")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for scale.json, scale.png, scale.md")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data_cache" / "scale",
                        help="where the index-only datasets are written")
    parser.add_argument("--keep", action="store_true", help="keep the datasets (reused by the next run)")
    parser.add_argument("--components", default="sampler,perm,open,head",
                        help="comma-separated subset of sampler,perm,open,head (pm, qapm, pfc for one head)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement process")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per measurement process (1: another job shares the cores, and two "
                             "OpenMP threads then wait on each other)")
    args = parser.parse_args(argv)
    if args.arcface_torch is not None:
        args.arcface_torch = args.arcface_torch.resolve()
        for file in ("utils/utils_distributed_sampler.py", "partial_fc_v2.py", "losses.py"):
            if not (args.arcface_torch / file).is_file():
                parser.error(f"--arcface-torch: {args.arcface_torch / file} not found")

    import torch

    p = plan(args)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
               "python": sys.version.split()[0], "memory_gib": round(meminfo_kb("MemTotal") / 2**20, 1),
               "mem_available_gib_at_start": round(available_bytes() / 2**30, 1)}
    load_start = os.getloadavg()[0]
    started = time.time()
    results = run_all(args, p)
    biggest = max(p["open_images"])
    results += extrapolate(results, 10 ** math.ceil(math.log10(biggest)) * 10)
    order = {"sampler": 0, "perm": 1, "open": 2, "head": 3, "pfc": 4}
    results.sort(key=lambda r: (order[r["component"]], r["approach"], bool(r.get("probe")), r["identities"]))
    targets = annotate(results, p)
    report = {"machine": machine, "command": command_line(argv), "wall_s": round(time.time() - started, 1),
              "load_average": [load_start, os.getloadavg()[0]],
              "settings": {"images_per_identity": IMAGES_PER_IDENTITY, "batch": BATCH, "samples_per_class": K,
                           "world_size_sampler": WORLD, "embedding": EMBEDDING, "torch_threads": args.threads, **p,
                           "arcface_torch": str(args.arcface_torch) if args.arcface_torch else None},
              "results": results, "targets": targets}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out / "scale.md").write_text(table)
    plot(report, args.out / "scale.png")
    print(table)
    return report


if __name__ == "__main__":
    main()
