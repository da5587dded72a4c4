"""Readers for the IJB-B / IJB-C meta files in insightface's evaluation layout.

Layout of one benchmark root (for example ``IJB_release/IJBC``)::

    loose_crop/                         the loose face crops (1.jpg, 2.jpg, ...)
    meta/ijbc_face_tid_mid.txt          "image template_id media_id" per image
    meta/ijbc_name_5pts_score.txt       "image x1 y1 ... x5 y5 detector_score" per image
    meta/ijbc_template_pair_label.txt   "template_1 template_2 label" per 1:1 pair
    meta/ijbc_1N_gallery_G1.csv         1:N gallery 1 (IJB-B: ijbb_1N_gallery_S1.csv)
    meta/ijbc_1N_gallery_G2.csv         1:N gallery 2 (IJB-B: ijbb_1N_gallery_S2.csv)
    meta/ijbc_1N_probe_mixed.csv        1:N probes

The two per-image files list the same images in the same order. The 1:N files are CSV with
one header row and at least the columns TEMPLATE_ID, SUBJECT_ID (one row per image).
Every reader reports bad input as :class:`IJBFormatError` naming the file and the line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

TARGETS = ("IJBB", "IJBC")


class IJBFormatError(ValueError):
    """A meta file of an IJB benchmark is malformed or inconsistent."""

    def __init__(self, path: Path | str, line: int | None, message: str):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = Path(path)
        self.line = line


def normalize_target(target: str) -> str:
    """Return ``"IJBB"`` or ``"IJBC"`` for spellings such as ``ijbc`` or ``IJB-C``."""
    name = target.upper().replace("-", "").replace("_", "")
    if name not in TARGETS:
        raise ValueError(f"unknown IJB target {target!r}; expected one of {TARGETS}")
    return name


@dataclass(frozen=True)
class IJBLayout:
    """Paths of one IJB benchmark (``root`` holds ``meta/`` and ``loose_crop/``)."""

    root: Path
    target: str

    @classmethod
    def of(cls, root: str | Path, target: str) -> "IJBLayout":
        return cls(Path(root), normalize_target(target))

    @property
    def prefix(self) -> str:
        return self.target.lower()

    @property
    def meta_dir(self) -> Path:
        return self.root / "meta"

    @property
    def image_dir(self) -> Path:
        return self.root / "loose_crop"

    @property
    def face_tid_mid(self) -> Path:
        return self.meta_dir / f"{self.prefix}_face_tid_mid.txt"

    @property
    def name_5pts_score(self) -> Path:
        return self.meta_dir / f"{self.prefix}_name_5pts_score.txt"

    @property
    def template_pair_label(self) -> Path:
        return self.meta_dir / f"{self.prefix}_template_pair_label.txt"

    @property
    def gallery_names(self) -> tuple[str, str]:
        return ("S1", "S2") if self.target == "IJBB" else ("G1", "G2")

    @property
    def galleries(self) -> dict[str, Path]:
        return {g: self.meta_dir / f"{self.prefix}_1N_gallery_{g}.csv" for g in self.gallery_names}

    @property
    def probe_mixed(self) -> Path:
        return self.meta_dir / f"{self.prefix}_1N_probe_mixed.csv"


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file not found: {path}")


def _parse_whitespace_rows(
    path: Path, parsers: Sequence[Callable[[str], object]], column_names: Sequence[str]
) -> list[list[object]]:
    """Split every non-empty line on whitespace and convert each column, with line numbers."""
    _require_file(path)
    rows: list[list[object]] = []
    ncols = len(parsers)
    with open(path, "r", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != ncols:
                raise IJBFormatError(path, lineno, f"expected {ncols} columns, got {len(fields)}")
            row = []
            for col, (field, parse) in enumerate(zip(fields, parsers)):
                try:
                    row.append(parse(field))
                except ValueError:
                    kind = "an integer" if parse is int else "a number"
                    raise IJBFormatError(
                        path, lineno, f"column {col + 1} ({column_names[col]}) {field!r} is not {kind}"
                    ) from None
            rows.append(row)
    if not rows:
        raise IJBFormatError(path, None, "file is empty")
    return rows


@dataclass
class ImageList:
    """Per-image meta data, in the order of the meta files."""

    names: list[str]
    templates: np.ndarray  # (N,) int64
    medias: np.ndarray  # (N,) int64
    landmarks: np.ndarray  # (N, 5, 2) float32, loose-crop pixel coordinates
    scores: np.ndarray  # (N,) float32 detector scores

    def __len__(self) -> int:
        return len(self.names)


def read_face_tid_mid(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read ``image template_id media_id`` lines -> (names, templates, medias)."""
    path = Path(path)
    rows = _parse_whitespace_rows(path, (str, int, int), ("image", "template_id", "media_id"))
    names = [r[0] for r in rows]
    templates = np.array([r[1] for r in rows], dtype=np.int64)
    medias = np.array([r[2] for r in rows], dtype=np.int64)
    return names, templates, medias


def read_name_5pts_score(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read ``image x1 y1 .. x5 y5 score`` lines -> (names, landmarks (N,5,2), scores (N,))."""
    path = Path(path)
    columns = ["image"] + [f"{a}{i}" for i in range(1, 6) for a in ("x", "y")] + ["detector_score"]
    rows = _parse_whitespace_rows(path, [str] + [float] * 11, columns)
    names = [r[0] for r in rows]
    values = np.array([r[1:] for r in rows], dtype=np.float64)
    for lineno, row in enumerate(values, start=1):
        if not np.all(np.isfinite(row)):
            raise IJBFormatError(path, lineno, "landmark or score is not finite")
    landmarks = values[:, :10].reshape(-1, 5, 2).astype(np.float32)
    scores = values[:, 10].astype(np.float32)
    return names, landmarks, scores


def read_image_list(layout: IJBLayout) -> ImageList:
    """Read and cross-check the two per-image meta files of ``layout``."""
    names, templates, medias = read_face_tid_mid(layout.face_tid_mid)
    names5, landmarks, scores = read_name_5pts_score(layout.name_5pts_score)
    if len(names5) != len(names):
        raise IJBFormatError(
            layout.name_5pts_score,
            None,
            f"lists {len(names5)} images but {layout.face_tid_mid.name} lists {len(names)}",
        )
    for lineno, (a, b) in enumerate(zip(names, names5), start=1):
        if a != b:
            raise IJBFormatError(
                layout.name_5pts_score, lineno, f"image {b!r} differs from {a!r} in {layout.face_tid_mid.name}"
            )
    return ImageList(names, templates, medias, landmarks, scores)


def check_images_exist(layout: IJBLayout, names: Sequence[str]) -> None:
    """Raise FileNotFoundError naming the first listed image missing from ``loose_crop/``."""
    if not layout.image_dir.is_dir():
        raise FileNotFoundError(f"IJB image folder not found: {layout.image_dir}")
    present = {p.name for p in layout.image_dir.iterdir()}
    for lineno, name in enumerate(names, start=1):
        if (name not in present) and not (layout.image_dir / name).is_file():
            raise FileNotFoundError(
                f"{layout.image_dir / name}: image listed in {layout.name_5pts_score} line {lineno} not found"
            )


def read_template_pairs(
    path: str | Path, known_templates: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read ``t1 t2 label`` lines -> (t1, t2, label); labels must be 0/1.

    Uses numpy's C parser (IJB-C has 15.6 M pairs) and re-scans line by line only to name a
    bad line. ``known_templates`` (sorted unique ids) turns unknown template ids into errors.
    """
    path = Path(path)
    _require_file(path)
    try:
        pairs = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError:
        _parse_whitespace_rows(path, (int, int, int), ("template_1", "template_2", "label"))
        raise  # the scan above raises for every malformed line numpy rejects
    if pairs.size == 0:
        raise IJBFormatError(path, None, "file is empty")
    if pairs.shape[1] != 3:
        raise IJBFormatError(path, 1, f"expected 3 columns, got {pairs.shape[1]}")
    t1, t2, label = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    bad = np.flatnonzero((label != 0) & (label != 1))
    if bad.size:
        raise IJBFormatError(path, _line_of_row(path, bad[0]), f"label {label[bad[0]]} is not 0 or 1")
    if known_templates is not None:
        for column, name in ((t1, "template_1"), (t2, "template_2")):
            unknown = np.flatnonzero(~np.isin(column, known_templates))
            if unknown.size:
                raise IJBFormatError(
                    path,
                    _line_of_row(path, unknown[0]),
                    f"{name} {column[unknown[0]]} is not a template of the image list",
                )
    return t1, t2, label


def _line_of_row(path: Path, row: int) -> int:
    """1-based line number of the ``row``-th non-empty line (numpy skips blank lines)."""
    seen = -1
    with open(path, "r", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                seen += 1
                if seen == row:
                    return lineno
    return row + 1


def read_template_subjects(
    path: str | Path, known_templates: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a 1:N CSV -> (unique template ids, their subject ids), in first-seen order."""
    path = Path(path)
    _require_file(path)
    subject_of: dict[int, int] = {}
    known = None if known_templates is None else set(np.asarray(known_templates).tolist())
    with open(path, "r", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise IJBFormatError(path, None, "file is empty")
        if len(header) < 2:
            raise IJBFormatError(path, 1, f"header needs TEMPLATE_ID,SUBJECT_ID columns, got {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != len(header):
                raise IJBFormatError(path, lineno, f"expected {len(header)} columns, got {len(row)}")
            try:
                template, subject = int(row[0]), int(row[1])
            except ValueError:
                raise IJBFormatError(path, lineno, f"TEMPLATE_ID/SUBJECT_ID {row[:2]} are not integers") from None
            previous = subject_of.setdefault(template, subject)
            if previous != subject:
                raise IJBFormatError(
                    path, lineno, f"template {template} has subject {subject} here but {previous} before"
                )
            if known is not None and template not in known:
                raise IJBFormatError(path, lineno, f"template {template} is not a template of the image list")
    if not subject_of:
        raise IJBFormatError(path, None, "no templates listed")
    templates = np.fromiter(subject_of.keys(), dtype=np.int64, count=len(subject_of))
    subjects = np.fromiter(subject_of.values(), dtype=np.int64, count=len(subject_of))
    return templates, subjects
