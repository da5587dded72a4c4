#!/usr/bin/env python
"""Which of arcface_torch's job configs build in protomem-train, with and without a memory head.

For every ``configs/*.py`` job of an arcface_torch checkout (base.py and __init__.py aside) the
job is loaded with the checkout's base.py by protomem's ``get_config`` (strict key checks), once as
it is (arcface_torch's default head: our Partial FC) and once with ``head = "prototype_memory"``
appended, and ``protomem-train --dry-run``'s check runs on it: network and head built on the meta
device, data keys checked. Writes tools/bench/results/arcface_configs.json and .md.

    python tools/arcface_configs.py /path/to/insightface/recognition/arcface_torch
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from protomem_plugin.train.config import ConfigError, get_config, load_config_file  # noqa: E402
from protomem_plugin.train.dry_run import dry_run  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "bench" / "results"


def check(job: pathlib.Path, base: pathlib.Path, head: str | None, folder: pathlib.Path) -> dict:
    """dry_run() of ``job`` (plus ``head``) beside ``base``; ``{"ok": False, "error": ...}`` when it fails."""
    shutil.copy(base, folder / "base.py")
    text = job.read_text() + (f'\nconfig.head = "{head}"\n' if head else "")
    target = folder / job.name
    target.write_text(text)
    try:
        return {"ok": True, **dry_run(get_config(target))}
    except ConfigError as exc:
        return {"ok": False, "error": str(exc).replace(str(folder) + "/", "")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", help="recognition/arcface_torch of an insightface checkout")
    args = parser.parse_args(argv)
    checkout = pathlib.Path(args.checkout).resolve()
    jobs = sorted(p for p in (checkout / "configs").glob("*.py") if p.name not in ("base.py", "__init__.py"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        for job in jobs:
            as_is = check(job, checkout / "configs" / "base.py", None, folder)
            pm = check(job, checkout / "configs" / "base.py", "prototype_memory", folder)
            rows.append({"job": job.stem, "network": load_config_file(job).get("network"), "as_is": as_is,
                         "prototype_memory": pm})
            print(f"{job.stem}: {'ok' if as_is['ok'] else as_is['error']} / {'ok' if pm['ok'] else pm['error']}", flush=True)
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "arcface_configs.json").write_text(json.dumps({"arcface_torch_commit": commit or "unknown", "jobs": rows},
                                                             indent=1))
    lines = ["| arcface_torch job | network | backbone params | as is (Partial FC) | + `head = \"prototype_memory\"` | PM slots | classes | images | DALI |",
             "|---|---|---:|---|---|---:|---:|---:|---|"]
    for row in rows:
        a, p = row["as_is"], row["prototype_memory"]
        ref = a if a["ok"] else p
        lines.append(
            f"| {row['job']} | {row['network']} | "
            + (f"{ref['backbone_parameters'] / 1e6:.1f} M" if "backbone_parameters" in ref else "") + " | "
            + ("builds" if a["ok"] else f"fails: {a['error']}") + " | " + ("builds" if p["ok"] else f"fails: {p['error']}")
            + f" | {p.get('memory_slots', '')} | {ref.get('num_classes', '')} | {ref.get('num_image', '')} | "
            + ("yes" if ref.get("dali") else "no") + " |")
    ok = sum(r["as_is"]["ok"] and r["prototype_memory"]["ok"] for r in rows)
    lines.append(f"\n{ok} of {len(rows)} jobs build both ways (arcface_torch {commit[:10] or 'checkout'}).")
    (RESULTS / "arcface_configs.md").write_text("\n".join(lines) + "\n")
    print(lines[-1])
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
