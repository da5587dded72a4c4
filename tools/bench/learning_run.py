"""Learning benchmark: data (training sets, validation and test trees) and one run, end to end.

A run trains with ``protomem-train`` in segments (``stop_at_step`` then ``--resume``, step-exact),
and after each segment embeds the aligned crops of the validation and the test tree and reads
TAR at FAR off the IJB 1:1 protocol (library: ``embed_with_flip``, ``fuse_image_features``,
``verification_from_features``). Training cost comes from the kernel's accounting of each
training process (``os.wait4``): CPU seconds, wall seconds and peak RSS.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from learning_grid import FAR_TARGETS, HEADS, MARGINS, QUICK_TEST_TREE, QUICK_VAL_TREE, TEST_TREE, TRAINING, VAL_TREE, Regime, RunSpec

REPO = Path(__file__).resolve().parents[2]
AGE_BINS = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 1 << 62])


class DataError(RuntimeError):
    """Training and evaluation identities overlap, or a data file is not what the benchmark wrote."""


# --- data -----------------------------------------------------------------------------------
def dataset_dir(root: Path, regime: Regime) -> Path:
    tail = "_lt" if regime.long_tail else ""
    return root / f"train_n{regime.num_identities}x{regime.images_per_identity}{tail}_d{regime.degraded_fraction:g}"


def prepare_dataset(root: Path, regime: Regime) -> Path:
    """The training .rec of ``regime`` (identities 0..N-1 of generator seed 0), made once."""
    from protomem_plugin.data.synthetic import make_synthetic_dataset

    path = dataset_dir(root, regime)
    make_synthetic_dataset(str(path), regime.num_identities, regime.images_per_identity, val_identities=2,
                           val_pairs=2, image_size=TRAINING["image_size"], degraded_fraction=regime.degraded_fraction,
                           long_tail=regime.long_tail, seed=0, progress=False)
    return path


def tree_dir(root: Path, role: str, quick: bool) -> Path:
    spec = tree_spec(role, quick)
    return root / f"{role}_tree_from{spec['first_identity']}_n{spec['num_identities']}" / "IJBC"


def tree_spec(role: str, quick: bool) -> dict:
    return {("val", False): VAL_TREE, ("test", False): TEST_TREE,
            ("val", True): QUICK_VAL_TREE, ("test", True): QUICK_TEST_TREE}[(role, quick)]


def prepare_tree(root: Path, role: str, quick: bool) -> Path:
    """The validation or test tree (IJB layout) and its aligned crops at the training size, made once."""
    from protomem_plugin.eval.synthetic_ijb import make_synthetic_ijb

    path = tree_dir(root, role, quick)
    aligned = path / f"aligned_{TRAINING['image_size']}.npz"
    if aligned.is_file():
        return path
    if path.exists():
        shutil.rmtree(path)
    make_synthetic_ijb(path, "IJBC", seed=0, **tree_spec(role, quick))
    write_aligned(path, aligned)
    return path


def write_aligned(tree: Path, out: Path) -> None:
    """Align every loose crop (``norm_crop``), resize to the training size, save with the protocol."""
    import cv2

    from protomem_plugin.eval.extract import load_aligned
    from protomem_plugin.eval.ijb_meta import IJBLayout, read_image_list, read_template_pairs

    layout = IJBLayout.of(tree, "IJBC")
    images = read_image_list(layout)
    t1, t2, labels = read_template_pairs(layout.template_pair_label, np.unique(images.templates))
    size = TRAINING["image_size"]
    crops = np.stack([cv2.resize(load_aligned(layout.image_dir / name, marks), (size, size), interpolation=cv2.INTER_AREA)
                      for name, marks in zip(images.names, images.landmarks)])
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, crops=crops, scores=images.scores, templates=images.templates, medias=images.medias,
             t1=t1, t2=t2, labels=labels)
    os.replace(tmp, out)


def tree_identities(tree: Path) -> set[int]:
    """Identities (generator indices) a synthetic tree shows, from the file the generator wrote."""
    info = json.loads((tree / "synthetic_ijb.json").read_text())
    return {int(identity) for _, identity, _ in info["images"]}


def training_identities(rec_dir: Path) -> set[int]:
    """Identities of a synthetic training set, from the labels of its .rec (label = generator index)."""
    from protomem_plugin.data.recordio import InsightFaceRec

    return {int(v) for v in np.unique(InsightFaceRec(str(rec_dir)).labels)}


def check_disjoint(train: set[int], val: set[int], test: set[int]) -> None:
    """Raise :class:`DataError` if two of the identity sets share an identity or one is empty."""
    sets = {"training": train, "validation": val, "test": test}
    for name, values in sets.items():
        if not values:
            raise DataError(f"the {name} identity set is empty")
    for a, b in (("training", "validation"), ("training", "test"), ("validation", "test")):
        common = sets[a] & sets[b]
        if common:
            raise DataError(f"{a} and {b} identities overlap ({len(common)} shared, e.g. {min(common)})")


# --- one run --------------------------------------------------------------------------------
def job_config(path: Path, spec: RunSpec, rec: Path, output: Path, stop: int) -> Path:
    """An arcface_torch job file (``configs/base.py`` copied beside it) for one segment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "configs" / "base.py", path.parent / "base.py")
    regime, setting = spec.regime, spec.setting
    classes = regime.num_identities
    values = dict(TRAINING, samples_per_class=setting.samples_per_class, lr=setting.lr,
                  head_lr_scale=setting.head_lr_scale, num_epoch=spec.epochs, num_classes=classes, rec=str(rec),
                  output=str(output), seed=spec.seed, frequent=10, verbose=0, val_targets=[], num_workers=0,
                  progress=False, save_every_steps=0, save_all_states=True, stop_at_step=stop)
    values.update(MARGINS[setting.margin])
    for key, value in HEADS[spec.head].items():
        values[key] = str(rec / "quality.npy") if value == "QUALITY" else value
    if values["head"] != "partial_fc":
        values["memory_size"] = max(TRAINING["batch_size"], round(setting.memory_factor * classes / 10))
        values["prototype_grad"] = setting.prototype_grad
    path.write_text("from easydict import EasyDict as edict\nconfig = edict()\n"
                    + "".join(f"config.{k} = {v!r}\n" for k, v in values.items()))
    return path


def head_state_mb(spec: RunSpec) -> float:
    """The head's training state in MB: parameters, buffers and the SGD momentum of its trainable
    parameters, from the run's job built on the meta device (no data, no memory)."""
    import tempfile

    from protomem_plugin.train.config import get_config
    from protomem_plugin.train.dry_run import dry_run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = job_config(Path(tmp) / "job.py", spec, Path(tmp) / "rec", Path(tmp) / "out", stop=0)
        job = get_config(cfg)
        job.num_image = job.get("num_image") or 1  # read from the .rec in training; no part of the head's state
        summary = dry_run(job)
    return (summary["head_state_bytes"] + summary["head_trainable_bytes"]) / 2**20


def steps_per_epoch(rec: Path, spec: RunSpec) -> int:
    """Global batches per epoch of the identity-grouped sampler (as the loader counts them)."""
    from protomem_plugin.data.recordio import InsightFaceRec
    from protomem_plugin.data.sampler import GroupedBatchSampler

    labels = InsightFaceRec(str(rec)).labels
    return len(GroupedBatchSampler(labels, batch_size=TRAINING["batch_size"],
                                   samples_per_class=spec.setting.samples_per_class, seed=spec.seed))


def train_segment(cfg: Path, resume: bool, log: Path) -> dict:
    """Run ``protomem-train`` once; returns its cost (or status 'diverged' on a non-finite stop)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "protomem_plugin.train.cli", str(cfg)] + (["--resume"] if resume else [])
    started = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    cost = {"cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": time.perf_counter() - started,
            "peak_rss_mb": usage.ru_maxrss / 1024}
    if process.returncode:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        if "NonFiniteLossError" in tail or "NonFiniteEmbeddingError" in tail or "non-finite" in tail:
            return {**cost, "status": "diverged"}
        raise RuntimeError(f"{cfg}: protomem-train failed (exit {process.returncode}):\n{tail}")
    return {**cost, "status": "ok"}


def loop_seconds_per_step(training_log: Path) -> float:
    """Median seconds per step of the training loop, from the ``Speed ... samples/sec`` report lines
    (no process start, data open or evaluation in it)."""
    speeds = [float(line.split("Speed ", 1)[1].split()[0]) for line in
              training_log.read_text(encoding="utf-8").splitlines() if " Speed " in line]
    return TRAINING["batch_size"] / float(np.median(speeds)) if speeds else float("nan")


def evaluate(model_path: Path, trees: dict[str, Path]) -> dict[str, dict[str, float]]:
    """TAR at each FAR target of ``model.pt`` on each tree (IJB 1:1, nearest ROC point)."""
    import torch

    from protomem_plugin.eval.embedders import TorchEmbedder, load_backbone

    model = load_backbone(TRAINING["network"], model_path, num_features=TRAINING["embedding_size"])
    embedder = TorchEmbedder(model, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per run, like its training; restored for the caller
    try:
        out = _evaluate_trees(embedder, trees)
    finally:
        torch.set_num_threads(threads)
    return out


def _evaluate_trees(embedder, trees: dict[str, Path]) -> dict[str, dict[str, float]]:
    """The 1:1 protocol on each tree's saved aligned crops."""
    from protomem_plugin.eval.extract import embed_with_flip
    from protomem_plugin.eval.ijb import verification_from_features
    from protomem_plugin.eval.templates import fuse_image_features

    out = {}
    for role, tree in trees.items():
        data = np.load(tree / f"aligned_{TRAINING['image_size']}.npz")
        crops = data["crops"]
        features = np.concatenate([embed_with_flip(embedder, crops[i:i + 512]) for i in range(0, len(crops), 512)])
        fused = fuse_image_features(features, data["scores"], use_flip=True)
        result, _ = verification_from_features(fused, data["templates"], data["medias"], data["t1"], data["t2"],
                                               data["labels"], far_targets=FAR_TARGETS)
        out[role] = {f"tar@{far:g}": float(result.tar_nearest[far]) for far in FAR_TARGETS}
        out[role]["auc"] = float(result.auc)
        out[role]["genuine_pairs"] = int(result.num_genuine)
    return out


def age_histogram(output: Path) -> dict:
    """Ages (steps since written or updated) of the class weights at the end, binned by powers of 2."""
    import torch

    state = torch.load(output / "checkpoint_gpu_0.pt", weights_only=True, map_location="cpu")
    head = state["state_dict_softmax_fc"]
    step = int(state["global_step"])
    if "slot_step" in head:
        ages = (step - 1 - head["slot_step"][head["slot_step"] >= 0]).clamp_min(0)
    elif "last_update_step" in head:
        ages = (step - head["last_update_step"]).clamp_min(0)
    else:
        return {}
    values = ages.double().numpy()
    counts, _ = np.histogram(values, bins=AGE_BINS)
    return {"mean": float(values.mean()), "p50": float(np.quantile(values, 0.5)),
            "p90": float(np.quantile(values, 0.9)), "max": float(values.max()),
            "bins": AGE_BINS[:-1].tolist(), "counts": counts.tolist()}


def code_revision() -> str:
    """The commit the run's code comes from, ``+modified`` if the library or benchmark differ from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short=7", "HEAD") or "unknown"
    return head + ("+modified" if git("status", "--porcelain", "--", "protomem_plugin", "tools/bench/learning*.py") else "")


def run_one(spec: RunSpec, data_root: Path) -> dict:
    """Train and evaluate ``spec`` (its data must be prepared); returns the result to cache."""
    rec = dataset_dir(data_root, spec.regime)
    trees = {role: tree_dir(data_root, role, spec.quick) for role in ("val", "test")}
    output = data_root / "runs" / spec.key()
    if output.exists():  # an interrupted earlier attempt: start over
        shutil.rmtree(output)
    output.mkdir(parents=True)
    total = steps_per_epoch(rec, spec) * spec.epochs
    stops = sorted({int(round(total * (i + 1) / spec.points)) for i in range(spec.points)})
    curve, cost, status = [], {"cpu_s": 0.0, "wall_s": 0.0, "peak_rss_mb": 0.0}, "ok"
    for i, stop in enumerate(stops):
        cfg = job_config(output / "config" / "job.py", spec, rec, output / "train", stop)
        segment = train_segment(cfg, resume=i > 0, log=output / "train.log")
        cost = {"cpu_s": cost["cpu_s"] + segment["cpu_s"], "wall_s": cost["wall_s"] + segment["wall_s"],
                "peak_rss_mb": max(cost["peak_rss_mb"], segment["peak_rss_mb"])}
        if segment["status"] != "ok":
            status = segment["status"]
            break
        curve.append({"step": stop, **evaluate(output / "train" / "model.pt", trees),
                      "cpu_s": cost["cpu_s"], "wall_s": cost["wall_s"]})
    done_steps = curve[-1]["step"] if curve else 0
    if status == "ok":
        logged = [json.loads(line)["step"] for line in (output / "train" / "train_log.jsonl").read_text().splitlines()]
        if logged[-1] != total:
            raise RuntimeError(f"{spec.label()}: expected {total} steps, the training log ends at {logged[-1]}")
    result = {
        "key": spec.key(), "spec": spec.config(), "label": spec.label(), "status": status, "steps": total,
        "revision": code_revision(),
        "curve": curve, "final": curve[-1] if status == "ok" else None,
        "cost": {**cost, "cpu_s_per_step": cost["cpu_s"] / max(done_steps, 1),
                 "wall_s_per_step": cost["wall_s"] / max(done_steps, 1),
                 "loop_s_per_step": loop_seconds_per_step(output / "train" / "training.log") if curve else float("nan")},
        "ages": age_histogram(output / "train") if status == "ok" else {},
    }
    shutil.rmtree(output, ignore_errors=True)  # checkpoints are large; the result holds what we report
    return result
