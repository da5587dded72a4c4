"""IJB results as a markdown table and a ROC plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import IdentificationResult, VerificationResult


def _pct(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100.0 * value:.2f}"


def markdown_table(
    name: str,
    target: str,
    verification: VerificationResult | None,
    identification: dict[str, IdentificationResult] | None,
) -> str:
    """Markdown tables: TAR (%) at each FAR (nearest and interpolated), then 1:N per gallery."""
    lines: list[str] = []
    if verification is not None:
        fars = verification.far_targets
        lines.append(f"**{target} 1:1 verification**, TAR (%) at FAR "
                     f"({verification.num_genuine} genuine / {verification.num_impostor} impostor pairs)")
        lines.append("")
        lines.append("| Model | TAR reading | " + " | ".join(f"{f:.0e}" for f in fars) + " |")
        lines.append("|---|---|" + "---:|" * len(fars))
        for label, values in (("nearest ROC point", verification.tar_nearest),
                              ("interpolated", verification.tar_interpolated)):
            cells = [_pct(values[f]) + ("" if verification.measurable[f] else "*") for f in fars]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
        if not all(verification.measurable.values()):
            lines.append("")
            lines.append("\\* FAR below 1 / number of impostor pairs: read at the ROC's FPR = 0 end.")
        lines.append("")
    if identification:
        first = next(iter(identification.values()))
        ranks = list(first.rank_accuracy)
        fpirs = list(first.tpir)
        lines.append(f"**{target} 1:N identification** (%), probe_mixed against each gallery")
        lines.append("")
        header = ["Model", "Gallery", "mated / non-mated"] + [f"Rank-{k}" for k in ranks]
        header += [f"TPIR@FPIR={f:.0e}" for f in fpirs]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|---|---|---:|" + "---:|" * (len(ranks) + len(fpirs)))
        for gallery, res in identification.items():
            cells = [name, gallery, f"{res.num_mated} / {res.num_non_mated}"]
            cells += [_pct(res.rank_accuracy[k]) for k in ranks]
            cells += [_pct(res.tpir[f]) for f in fpirs]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_roc(curves: dict[str, VerificationResult], path: str | Path, title: str = "ROC") -> Path:
    """Save ROC curves (log FAR axis) as a PNG with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    lowest = 1.0
    for name, res in curves.items():
        keep = res.fpr > 0
        lowest = min(lowest, float(res.fpr[keep].min()) if keep.any() else 1.0)
        ax.plot(res.fpr[keep], res.tpr[keep], lw=1.2, label=f"{name} (AUC {100 * res.auc:.2f}%)")
        fars = [f for f in res.far_targets if res.measurable[f]]
        ax.scatter(fars, [res.tar_nearest[f] for f in fars], s=12)
    ax.set_xscale("log")
    ax.set_xlim(max(min(lowest, 1e-6), 1e-8), 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", linestyle="--", linewidth=0.5)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
