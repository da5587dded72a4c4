#!/usr/bin/env python
"""Host-device synchronisations per training step, per head and for the trainer, counted on CPU.

Counts the operations of :mod:`protomem_plugin.host_syncs` (``.item()``, ``nonzero``, ``unique``,
boolean-mask indexing, device-to-host copies, ...) that would stall a GPU run.

* Heads: one process, the head alone (forward + backward on a leaf embedding batch, K = 2 images
  per class), counted over steps taken after the memory is full.
* Trainer: ``train()`` on a tiny synthetic dataset, run for two step counts; the difference of
  the two totals divided by the difference of steps is the per-step count (set-up, the first
  step and the end of the run cancel out). No logging, verification or checkpoint step falls in
  between. ``trainer only`` is that figure minus the head's.

Writes tools/bench/results/host_syncs.json and host_syncs.md (``--tag`` names the column, e.g.
``before`` for a run on older code) and prints the table.

    python tools/bench/host_syncs.py
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from protomem_plugin.host_syncs import HostSyncCounter  # noqa: E402
from protomem_plugin.losses import CombinedMarginLoss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, EMBEDDING, K, CLASSES, SLOTS = 64, 32, 2, 4096, 256

# name -> (registry head name, options, fp16)
HEADS: dict[str, tuple[str, dict, bool]] = {
    "pm": ("prototype_memory", {}, False),
    "pm chunked": ("prototype_memory", {"logits_chunk": 64}, False),
    "pm fp16 storage, fp16": ("prototype_memory", {"memory_dtype": "float16"}, True),
    "qapm norm": ("qapm", {"quality_source": "norm"}, False),
    "qapm recognizability_soft": ("qapm", {"quality_source": "recognizability_soft"}, False),
    "qapm external": ("qapm", {"quality_source": "external"}, False),
    "qapm norm chunked": ("qapm", {"quality_source": "norm", "logits_chunk": 64}, False),
    "partial_fc 1.0": ("partial_fc", {}, False),
    "partial_fc 0.1": ("partial_fc", {"sample_rate": 0.1}, False),
}


def build_head(name: str):
    from protomem_plugin.registry import get_head_class

    head_name, options, fp16 = HEADS[name]
    options = dict(options)
    sample_rate = options.pop("sample_rate", 1.0)
    cls = get_head_class(head_name)
    margin = CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    if head_name == "partial_fc":
        return cls(margin, EMBEDDING, CLASSES, sample_rate=sample_rate, fp16=fp16, **options)
    return cls(margin, EMBEDDING, CLASSES, fp16=fp16, memory_size=SLOTS, **options)


def head_step(head, step: int) -> None:
    """One forward + backward of ``head`` on a fresh batch of BATCH // K classes (K images each)."""
    generator = torch.Generator().manual_seed(step)
    classes = torch.randperm(CLASSES, generator=generator)[: BATCH // K]
    labels = classes.repeat_interleave(K)
    embeddings = torch.randn(BATCH, EMBEDDING, generator=generator).requires_grad_(True)
    extras = {"quality": torch.rand(BATCH, generator=generator)} if getattr(head, "quality_source", "") == "external" else {}
    head(embeddings, labels, **extras).backward()


def head_syncs_per_step(name: str, steps: int = 4) -> dict:
    """Syncs per step of the head ``name`` once its memory is full (counts by op and by site)."""
    torch.manual_seed(0)
    head = build_head(name)
    warmup = 2 * SLOTS * K // BATCH + 2  # fills the memory
    for step in range(warmup):
        head_step(head, step)
    with HostSyncCounter(where=True) as counter:
        for step in range(warmup, warmup + steps):
            head_step(head, step)
    return {"per_step": counter.total / steps, "by_op": {k: v / steps for k, v in sorted(counter.counts.items())},
            "by_site": {k: v / steps for k, v in sorted(counter.sites.items())}}


def _train_config(directory: Path, rec: Path, steps: int, head: str):
    from protomem_plugin.train.config import get_config

    configs = directory / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / "base.py").write_text((ROOT / "configs" / "base.py").read_text())
    values = dict(network="tiny", embedding_size=32, image_size=32, batch_size=16, samples_per_class=2, lr=0.05,
                  num_epoch=1, warmup_epoch=0, num_classes=200, margin_list=(1.0, 0.0, 0.35), margin_scale=16.0,
                  frequent=10_000, verbose=0, num_workers=1, progress=False, val_targets=[], rec=str(rec),
                  output=str(directory / "out"), head=head, max_steps=steps, sample_rate=1.0)
    if head != "partial_fc":
        values["memory_size"] = 32  # full after 4 steps of 8 classes: the counted steps evict
    lines = ["from easydict import EasyDict as edict", "config = edict()"]
    lines += [f"config.{k} = {v!r}" for k, v in values.items()]
    job = configs / "job.py"
    job.write_text("\n".join(lines) + "\n")
    return get_config(job)


def trainer_syncs_per_step(head: str = "prototype_memory", short: int = 4, long: int = 12) -> dict:
    """Per-step syncs of ``train()`` (head included), from two run lengths."""
    from protomem_plugin.data.synthetic import make_synthetic_dataset
    from protomem_plugin.train.runtime import init_runtime
    from protomem_plugin.train.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "rec"
        make_synthetic_dataset(str(rec), 200, 2, val_identities=0, val_pairs=0, image_size=32, progress=False, num_workers=1)
        totals = {}
        for steps in (short, long):
            cfg = _train_config(Path(tmp) / f"run{steps}", rec, steps, head)
            with HostSyncCounter(where=True) as counter:
                train(cfg, init_runtime())
            totals[steps] = counter
    span = long - short
    by_op = {k: (totals[long].counts[k] - totals[short].counts[k]) / span
             for k in sorted(set(totals[long].counts) | set(totals[short].counts))}
    by_site = {k: (totals[long].sites[k] - totals[short].sites[k]) / span
               for k in sorted(set(totals[long].sites) | set(totals[short].sites))}
    return {"per_step": (totals[long].total - totals[short].total) / span,
            "by_op": {k: v for k, v in by_op.items() if v}, "by_site": {k: v for k, v in by_site.items() if v}}


def measure() -> dict:
    results = {"heads": {name: head_syncs_per_step(name) for name in HEADS}}
    for head in ("prototype_memory", "partial_fc"):
        total = trainer_syncs_per_step(head)
        total["trainer_only"] = total["per_step"] - results["heads"]["pm" if head == "prototype_memory" else "partial_fc 1.0"]["per_step"]
        results[f"trainer ({head})"] = total
    return results


def write_table(all_results: dict) -> str:
    tags = list(all_results)
    lines = ["| per training step | " + " | ".join(tags) + " |", "|---|" + "---:|" * len(tags)]
    rows = list(HEADS) + ["trainer (prototype_memory)", "trainer (partial_fc)"]
    for row in rows:
        cells = []
        for tag in tags:
            result = all_results[tag]
            entry = result["heads"].get(row) if row in HEADS else result.get(row)
            if entry is None:
                cells.append("-")
            elif row in HEADS:
                cells.append(f"{entry['per_step']:g}")
            else:
                cells.append(f"{entry['per_step']:g} (trainer alone {entry['trainer_only']:g})")
        label = f"head {row}" if row in HEADS else f"{row}, head included"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="after", help="column name of this run (e.g. before / after)")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "host_syncs.json"
    all_results = json.loads(path.read_text()) if path.is_file() else {}
    all_results[args.tag] = measure()
    path.write_text(json.dumps(all_results, indent=1) + "\n")
    table = write_table(all_results)
    (RESULTS / "host_syncs.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
