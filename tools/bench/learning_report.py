"""Learning benchmark: tables, JSON and plots from the cached runs (whatever part of the grid is done)."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

import learning_grid as grid
from learning_run import head_state_mb
from machine import cpu_name

METRICS = ("tar@0.0001", "tar@0.001")


def _pct(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float) * 100
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def _cell(mean: float, std: float) -> str:
    return f"{mean:.1f}" if np.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def setting_text(s: grid.Setting | dict) -> str:
    s = s if isinstance(s, dict) else s.__dict__
    text = f"lr {s['lr']:g}"
    if s["head_lr_scale"] != 1.0:
        text += f", centres x{s['head_lr_scale']:g}"
    if s["samples_per_class"] != 2:
        text += f", K={s['samples_per_class']}"
    if s["memory_factor"] != 1.0:
        text += f", memory x{s['memory_factor']:g}"
    if not s["prototype_grad"]:
        text += ", no prototype grad"
    return text


def seed_stats(results: list[dict]) -> dict | None:
    """Test and validation figures (mean, std over seeds) and cost of finished runs."""
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return None
    out = {"seeds": len(ok), "diverged": len(results) - len(ok)}
    for role in ("test", "val"):
        for metric in METRICS:
            out[f"{role} {metric}"] = _pct([r["final"][role][metric] for r in ok])
    out["train_cpu_s"] = float(np.mean([r["curve"][-1]["cpu_s"] for r in ok]))
    out["curve_cpu_s"] = np.mean([[p["cpu_s"] for p in r["curve"]] for r in ok], axis=0).tolist()
    out["curve_test"] = (np.mean([[p["test"]["tar@0.001"] for p in r["curve"]] for r in ok], axis=0) * 100).tolist()
    out["loop_s_per_step"] = float(np.mean([r["cost"]["loop_s_per_step"] for r in ok]))
    out["cpu_s_per_step"] = float(np.mean([r["cost"]["cpu_s_per_step"] for r in ok]))
    out["peak_rss_mb"] = float(np.max([r["cost"]["peak_rss_mb"] for r in ok]))
    return out


def verdict(a: dict, b: dict, key: str = "test tar@0.001") -> str:
    """'tie' when the difference of means is within the sum of the seeds' standard deviations."""
    (ma, sa), (mb, sb) = a[key], b[key]
    if a["seeds"] < 2 or b["seeds"] < 2:
        return "n/a (one seed)"
    diff = ma - mb
    return "tie" if abs(diff) <= sa + sb else ("better" if diff > 0 else "worse")


def collect(planner: grid.Planner) -> dict:
    """Every table of the report as plain data."""
    report: dict = {"grid": [], "chosen": {}, "main": [], "schedule": [], "sweep": [], "knobs": [], "adaface": []}
    heads_all = grid.CORE_HEADS + grid.OTHER_HEADS + grid.ADAFACE_HEADS
    for regime_name in planner.regimes:
        for head in heads_all:
            todo, chosen, points = planner.tuning(regime_name, head)
            for r in sorted(points, key=lambda r: (r["spec"]["setting"]["head_lr_scale"],
                                                   r["spec"]["setting"]["samples_per_class"], r["spec"]["setting"]["lr"])):
                report["grid"].append({
                    "regime": regime_name, "head": head, "setting": r["spec"]["setting"], "status": r["status"],
                    "val tar@0.001": grid.score(r) * 100,
                    "test tar@0.001": (r["final"]["test"]["tar@0.001"] * 100) if r["status"] == "ok" else 0.0,
                    "chosen": chosen is not None and r["spec"]["setting"] == chosen.__dict__})
            if chosen is None:
                continue
            report["chosen"].setdefault(regime_name, {})[head] = chosen.__dict__
            stats = seed_stats([r for s in planner.seeds(regime_name, head) if (r := planner.result(s))])
            if stats:
                report["main"].append({"regime": regime_name, "head": head, "setting": chosen.__dict__, **stats,
                                       "head_state_mb": head_state_mb(planner.seeds(regime_name, head)[0])})
            regime = planner.regimes[regime_name]
            rows = {regime.epochs: stats}
            for spec in planner.schedule_runs(regime_name, head):
                r = planner.result(spec)
                rows[spec.epochs] = seed_stats([r]) if r else None
            if len(rows) > 1 and any(v for e, v in rows.items() if e != regime.epochs):
                report["schedule"].append({"regime": regime_name, "head": head,
                                           "by_epochs": {str(e): v for e, v in sorted(rows.items()) if v}})
    for regime_name in planner.regimes:  # equal wall time: the shortest training of the regime's heads
        rows = [r for r in report["main"] if r["regime"] == regime_name]
        if rows:
            budget = min(r["train_cpu_s"] for r in rows)
            for r in rows:
                r["equal_time_s"] = budget
                r["test tar@0.001 at equal time"] = float(np.interp(budget, [0.0] + r["curve_cpu_s"], [0.0] + r["curve_test"]))
    main = {(r["regime"], r["head"]): r for r in report["main"]}
    for regime_name in planner.regimes:  # AdaFace against CosFace, each head tuned on its own
        for adaface in grid.ADAFACE_HEADS:
            cosface = adaface.removesuffix("_adaface")
            a, c = main.get((regime_name, adaface)), main.get((regime_name, cosface))
            if a and c:
                report["adaface"].append({"regime": regime_name, "head": cosface, "cosface": c["test tar@0.001"],
                                          "adaface": a["test tar@0.001"], "verdict": verdict(a, c)})
    base = planner.regimes.get("obsolescence")
    if base is not None:
        sizes = sorted({base.num_identities, *(grid.QUICK_IDENTITY_SWEEP if planner.quick else grid.IDENTITY_SWEEP)})
        for count in sizes:
            for head in grid.SWEEP_HEADS:
                specs = (planner.seeds("obsolescence", head) if count == base.num_identities else
                         planner.seeds("obsolescence", head, regime=base.with_identities(count)))
                stats = seed_stats([r for s in specs if (r := planner.result(s))])
                if stats:
                    report["sweep"].append({"identities": count, "head": head, **stats,
                                            "head_state_mb": head_state_mb(specs[0])})
        chosen = planner.chosen("obsolescence", "pm")
        if chosen is not None:
            for spec in [planner.seeds("obsolescence", "pm")] + [
                    planner.seeds("obsolescence", "pm", setting=s.setting) for s in planner.knob_runs()[::3]]:
                stats = seed_stats([r for s in spec if (r := planner.result(s))])
                if stats:
                    report["knobs"].append({"setting": spec[0].setting.__dict__, **stats})
    return report


def markdown(report: dict) -> str:
    """README tables of the report."""
    lines = ["#### Test figures at each head's chosen settings (mean ± std over seeds)", "",
             "| regime | head | chosen on validation | test TAR@FAR=1e-4 | test TAR@FAR=1e-3 | vs PM | seeds | "
             "TAR@1e-3 at equal time | s/step | head state MB | peak RSS MB |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    by_regime: dict = {}
    for row in report["main"]:
        by_regime.setdefault(row["regime"], {})[row["head"]] = row
    for regime, rows in by_regime.items():
        pm = rows.get("pm")
        for head, row in rows.items():
            versus = "" if head == "pm" or pm is None else verdict(row, pm)
            lines.append(f"| {regime} | {head} | {setting_text(row['setting'])} | {_cell(*row['test tar@0.0001'])} | "
                         f"{_cell(*row['test tar@0.001'])} | {versus} | {row['seeds']} | "
                         f"{row['test tar@0.001 at equal time']:.1f} ({row['equal_time_s']:.0f} s) | {row['loop_s_per_step']:.3f} | "
                         f"{row['head_state_mb']:.2f} | {row['peak_rss_mb']:.0f} |")
    lines += ["", "#### Learning-rate grid (seed 0; validation chooses, test shown for the plot)", "",
              "| regime | head | setting | validation TAR@1e-3 | test TAR@1e-3 |", "|---|---|---|---:|---:|"]
    for row in report["grid"]:
        mark = " **(chosen)**" if row["chosen"] else ""
        status = "" if row["status"] == "ok" else f" ({row['status']})"
        lines.append(f"| {row['regime']} | {row['head']} | {setting_text(row['setting'])}{mark}{status} | "
                     f"{row['val tar@0.001']:.1f} | {row['test tar@0.001']:.1f} |")
    def section(title: str, header: str, align: str, rows: list[str]) -> list[str]:
        return ["", f"#### {title}", "", header, align, *rows]

    if report["adaface"]:
        lines += section("AdaFace against CosFace, same head, each tuned on validation (test TAR@1e-3)",
                         "| regime | head | CosFace | AdaFace | AdaFace vs CosFace |", "|---|---|---:|---:|---|",
                         [f"| {r['regime']} | {r['head']} | {_cell(*r['cosface'])} | {_cell(*r['adaface'])} | "
                          f"{r['verdict']} |" for r in report["adaface"]])
    if report["schedule"]:
        width = max(len(row["by_epochs"]) for row in report["schedule"])
        rows = []
        for row in report["schedule"]:
            cells = [f"{e}: {_cell(*v['test tar@0.001'])} ({v['val tar@0.001'][0]:.1f})" for e, v in row["by_epochs"].items()]
            rows.append(f"| {row['regime']} | {row['head']} | " + " | ".join(cells + [""] * (width - len(cells))) + " |")
        lines += section("Longer schedules at the chosen settings (test TAR@1e-3; validation in brackets)",
                         "| regime | head | " + " | ".join(["epochs: test (val)"] * width) + " |",
                         "|---|---|" + "---|" * width, rows)
    if report["sweep"]:
        lines += section("Identity count (obsolescence regime, 4 images per identity, same epochs)",
                         "| identities | head | test TAR@1e-3 | seeds | head state MB |", "|---:|---|---:|---:|---:|",
                         [f"| {r['identities']} | {r['head']} | {_cell(*r['test tar@0.001'])} | {r['seeds']} | "
                          f"{r['head_state_mb']:.2f} |" for r in report["sweep"]])
    if report["knobs"]:
        lines += section("PM's knobs (obsolescence regime)", "| setting | test TAR@1e-3 | seeds |", "|---|---:|---:|",
                         [f"| {setting_text(r['setting'])} | {_cell(*r['test tar@0.001'])} | {r['seeds']} |"
                          for r in report["knobs"]])
    return "\n".join(lines) + "\n"


def plot(planner: grid.Planner, report: dict, out: Path, stem: str) -> list[str]:
    """learning_lr.png, learning_steps.png, learning_time.png, learning_identities.png, learning_age.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    regimes = [r for r in planner.regimes if any(g["regime"] == r for g in report["grid"])]
    colours = {h: f"C{i}" for i, h in enumerate(grid.CORE_HEADS + grid.OTHER_HEADS)}  # 9 heads
    colours.update(zip(grid.ADAFACE_HEADS, ("C9", "black", "darkgoldenrod")))

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / f"{stem}_{name}.png", dpi=110)
        plt.close(fig)
        written.append(f"{stem}_{name}.png")

    if regimes:
        fig, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 4.3), squeeze=False)
        for ax, regime in zip(axes[0], regimes):
            for head in colours:
                for scale, style in ((1.0, "-"), (10.0, "--")):
                    rows = sorted([g for g in report["grid"] if g["regime"] == regime and g["head"] == head
                                   and g["setting"]["head_lr_scale"] == scale and g["setting"]["samples_per_class"] == 2],
                                  key=lambda g: g["setting"]["lr"])
                    if rows:
                        label = head + (f" (centres x{scale:g})" if scale != 1.0 else "")
                        ax.plot([g["setting"]["lr"] for g in rows], [g["test tar@0.001"] for g in rows], style,
                                marker="o", color=colours[head], label=label)
            ax.set_xscale("log")
            ax.set_title(f"{regime}: test TAR@FAR=1e-3 vs lr (seed 0)")
            ax.set_xlabel("learning rate (backbone)")
            ax.set_ylabel("TAR (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "lr")

    main_regimes = sorted({row["regime"] for row in report["main"]}, key=list(planner.regimes).index)
    for name, xkey, xlabel in (("steps", "step", "training step"), ("time", "cpu_s", "training CPU seconds (one core)")):
        if not main_regimes:
            break
        fig, axes = plt.subplots(1, len(main_regimes), figsize=(5.5 * len(main_regimes), 4.3), squeeze=False)
        for ax, regime in zip(axes[0], main_regimes):
            for row in [r for r in report["main"] if r["regime"] == regime]:
                runs = [r for s in planner.seeds(regime, row["head"]) if (r := planner.result(s)) and r["status"] == "ok"]
                x = np.mean([[p[xkey] for p in r["curve"]] for r in runs], axis=0)
                y = np.array([[p["test"]["tar@0.001"] for p in r["curve"]] for r in runs]) * 100
                ax.errorbar(x, y.mean(0), yerr=y.std(0), marker="o", ms=3, capsize=2, color=colours[row["head"]],
                            label=row["head"])
                for spec in planner.schedule_runs(regime, row["head"]):
                    r = planner.result(spec)
                    if r and r["status"] == "ok":
                        ax.plot([p[xkey] for p in r["curve"]], [p["test"]["tar@0.001"] * 100 for p in r["curve"]], ":",
                                color=colours[row["head"]], alpha=0.7)
            ax.set_title(f"{regime}: test TAR@FAR=1e-3 (dotted: longer schedules)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("TAR (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, name)

    if report["sweep"]:
        fig, ax = plt.subplots(figsize=(6, 4.3))
        pm = {r["identities"]: r for r in report["sweep"] if r["head"] == "pm"}
        for head in grid.SWEEP_HEADS[1:]:
            rows = [r for r in report["sweep"] if r["head"] == head and r["identities"] in pm]
            if rows:
                gaps = [pm[r["identities"]]["test tar@0.001"][0] - r["test tar@0.001"][0] for r in rows]
                ax.plot([r["identities"] for r in rows], gaps, marker="o", color=colours[head], label=f"PM - {head}")
        ax.set_xscale("log")
        ax.set_xlabel("training identities")
        ax.set_ylabel("test TAR@FAR=1e-3 gap (points)")
        ax.set_title("PM's lead against identities (obsolescence regime)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        save(fig, "identities")

    if main_regimes:
        fig, axes = plt.subplots(1, len(main_regimes), figsize=(5.5 * len(main_regimes), 4.3), squeeze=False)
        for ax, regime in zip(axes[0], main_regimes):
            for row in [r for r in report["main"] if r["regime"] == regime]:
                r = next((r for s in planner.seeds(regime, row["head"]) if (r := planner.result(s)) and r["ages"]), None)
                if r:
                    counts = np.asarray(r["ages"]["counts"], dtype=float)
                    ax.step(np.arange(len(counts)), counts / counts.sum(), where="mid", color=colours[row["head"]],
                            label=f"{row['head']} (mean {r['ages']['mean']:.0f})")
            bins = grid_bins()
            ax.set_xticks(range(len(bins)), [str(b) for b in bins], rotation=60, fontsize=7)
            ax.set_title(f"{regime}: age of the class weights at the end")
            ax.set_xlabel("steps since written / updated (bin start)")
            ax.set_ylabel("share of classes")
            ax.legend(fontsize=7)
        save(fig, "age")
    return written


def grid_bins() -> list[int]:
    from learning_run import AGE_BINS

    return [int(b) for b in AGE_BINS[:-1]]


README_BEGIN = "<!-- learning tables: begin (python tools/bench/learning.py summary --readme README.md) -->"
README_END = "<!-- learning tables: end -->"


def splice_readme(readme: Path, table: str) -> None:
    """Replace the text between README's learning-table markers with ``table``."""
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{readme}: no '{README_BEGIN}' ... '{README_END}' block to replace")
    start = begin + len(README_BEGIN)
    readme.write_text(text[:start] + "\n\n" + table.strip("\n") + "\n\n" + text[end:])


def write_summary(planner: grid.Planner, out: Path, stem: str, readme: Path | None = None) -> dict:
    """``<stem>.json``, ``<stem>.md`` and the PNGs under ``out`` (and the tables into ``readme``)."""
    out.mkdir(parents=True, exist_ok=True)
    report = collect(planner)
    table = markdown(report)
    pending = planner.plan()
    report["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads_per_run": 1}
    report["runs_cached"] = len(planner.cache)
    # runs cached before revisions were recorded came from 4a36f7b
    revisions = Counter(result.get("revision", "4a36f7b") for result in planner.cache.values())
    report["revisions"] = dict(revisions)
    table += (f"\n{len(planner.cache)} runs cached, {len(pending)} ready to run next. Runs by code revision: "
              + ", ".join(f"{k} ({v})" for k, v in sorted(revisions.items())) + "\n")
    report["runs_ready_next"] = len(pending)
    report["plots"] = plot(planner, report, out, stem)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / f"{stem}.md").write_text(table)
    if readme is not None:
        splice_readme(readme, table)
    print(table)
    return report
