"""Bad input through the library, both loaders, the recipe and every command line.

Every case feeds a concrete broken input and asserts that the error names what it must (the file
and the key, record, line or parameter), comes before any training step or write, and that nothing
that existed before (inputs, output folders, datasets, checkpoints) changed. Library and recipe
cases raise the library's exceptions; command-line cases run the real program as a subprocess and
expect one line on stderr and exit code 2.
"""
from __future__ import annotations

import glob
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from protomem_plugin.cli_errors import is_user_error, run_cli
from protomem_plugin.data.binsets import load_bin_encoded
from protomem_plugin.data.loader import build_train_loader
from protomem_plugin.data.packing import write_insightface_rec
from protomem_plugin.data.recordio import InsightFaceRec, IRHeader, RecordIOError, RecordIOWriter, pack_record
from protomem_plugin.data.synthetic import make_synthetic_dataset
from protomem_plugin.train.config import ConfigError, get_config
from protomem_plugin.train.trainer import train
from train_helpers import write_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
ENTRY_POINTS = {  # the console scripts of pyproject.toml
    "protomem-train": ("protomem_plugin.train.cli", "main"),
    "protomem-eval-ijb": ("protomem_plugin.eval.cli", "ijb_main"),
    "protomem-export": ("protomem_plugin.export", "main"),
}


def run(program: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a tools/ script (``name.py``) or a console command (as ``python -c`` of its entry point)."""
    if program.endswith(".py"):
        cmd = [sys.executable, str(TOOLS / program)]
    else:
        module, func = ENTRY_POINTS[program]
        cmd = [sys.executable, "-c", f"import sys; sys.argv[0] = {program!r}; from {module} import {func}; "
               f"sys.exit({func}())"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


def one_line_error(result: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    """Assert exit code 2 and a single ``prog: message`` line on stderr naming every needle."""
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: "), err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


def snapshot(*roots) -> dict:
    """``{path: (is_dir, size, mtime_ns)}`` of every file and folder under ``roots`` (and the roots)."""
    out = {}
    for root in map(pathlib.Path, roots):
        if not root.exists():
            out[str(root)] = None
            continue
        for path in [root, *root.rglob("*")]:
            st = path.stat()
            out[str(path)] = (path.is_dir(), st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return out


SMALL = dict(val_identities=2, val_pairs=2, image_size=32, progress=False, num_workers=1)


@pytest.fixture(scope="module")
def dataset_template(tmp_path_factory):
    out = tmp_path_factory.mktemp("template") / "syn"
    make_synthetic_dataset(str(out), 3, 2, write_folders=True, **SMALL)
    return out


@pytest.fixture
def dataset(dataset_template, tmp_path):
    out = tmp_path / "syn"
    shutil.copytree(dataset_template, out)
    return out


# -- make_synthetic.py -----------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, needle", [
    ("--identities", "0", "num_identities"),
    ("--images-per-identity", "0", "images_per_identity"),
    ("--degraded-fraction", "1.5", "degraded_fraction"),
    ("--val-pairs", "3", "val_pairs"),
    ("--image-size", "8", "image_size"),
])
def test_make_synthetic_rejects_a_bad_parameter_before_writing(tmp_path, flag, value, needle):
    out = tmp_path / "new"
    result = run("make_synthetic.py", out, "--identities", 2, "--images-per-identity", 2, "--val-identities", 2,
                 "--val-pairs", 2, "--image-size", 32, flag, value)
    one_line_error(result, "make_synthetic.py", needle, value)
    assert sorted(os.listdir(tmp_path)) == [], "nothing written, not even the folder"


def test_overwrite_with_a_bad_parameter_keeps_the_dataset(dataset):
    before = snapshot(dataset.parent)
    result = run("make_synthetic.py", dataset, "--identities", 0, "--overwrite")
    one_line_error(result, "make_synthetic.py", "num_identities")
    assert snapshot(dataset.parent) == before


def test_existing_dataset_without_overwrite(dataset):
    before = snapshot(dataset.parent)
    result = run("make_synthetic.py", dataset, "--identities", 4, "--images-per-identity", 2, "--image-size", 32)
    one_line_error(result, "make_synthetic.py", str(dataset), "overwrite")
    assert snapshot(dataset.parent) == before


def test_interrupted_make_synthetic_leaves_the_old_dataset(dataset, tmp_path):
    (dataset / "notes.txt").write_text("kept")  # a file of the user's beside the dataset
    before = snapshot(dataset)
    cmd = [sys.executable, str(TOOLS / "make_synthetic.py"), str(dataset), "--identities", "20000",
           "--images-per-identity", "10", "--image-size", "32", "--val-pairs", "0", "--val-identities", "0",
           "--workers", "1", "--overwrite"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        partial = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in glob.glob(f"{dataset}.tmp-*/.train.rec.partial") if os.path.getsize(p) > 0]
            if partial:
                break
            time.sleep(0.05)
        assert partial, "the run did not start writing"
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert snapshot(dataset) == before, "the previous dataset changed"
    stage = pathlib.Path(partial[0]).parent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn", stage.name], "a dead run's folder, beside it"

    # the next run replaces the dataset, keeps the user's file and removes the dead run's folder
    result = run("make_synthetic.py", dataset, "--identities", 2, "--images-per-identity", 2, "--val-identities", 2,
                 "--val-pairs", 2, "--image-size", 32, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]
    assert (dataset / "notes.txt").read_text() == "kept" and not (dataset / "images").exists()
    assert '"num_identities": 2' in (dataset / "synthetic.json").read_text()


# -- pack_rec.py -----------------------------------------------------------------------------------

def _faces(root: pathlib.Path, counts: dict[str, int]) -> pathlib.Path:
    for person, count in counts.items():
        (root / person).mkdir(parents=True)
        for i in range(count):
            cv2.imwrite(str(root / person / f"{i}.jpg"), np.full((16, 16, 3), 10 * i, np.uint8))
    return root


def test_pack_rec_identity_folders_without_images(tmp_path):
    src = _faces(tmp_path / "faces", {"alice": 2, "bob": 0, "carol": 1})
    (src / "bob" / "notes.txt").write_text("not an image")
    before = snapshot(src)
    result = run("pack_rec.py", src, tmp_path / "out", "--quiet")
    one_line_error(result, "pack_rec.py", str(src / "bob"), str(src))
    assert snapshot(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces"]


def test_pack_rec_empty_source(tmp_path):
    src = tmp_path / "faces"
    src.mkdir()
    result = run("pack_rec.py", src, tmp_path / "out", "--quiet")
    one_line_error(result, "pack_rec.py", str(src), "no identity sub-folders")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces"]


def test_pack_rec_refuses_an_existing_dataset(dataset, tmp_path):
    before = snapshot(dataset)
    result = run("pack_rec.py", dataset / "images", dataset, "--quiet")
    one_line_error(result, "pack_rec.py", "refusing to overwrite")
    assert snapshot(dataset) == before


def test_pack_rec_list_with_a_missing_image(tmp_path):
    src = _faces(tmp_path / "faces", {"alice": 1})
    lst = tmp_path / "train.lst"
    lst.write_text("0\t0\talice/0.jpg\n1\t0\talice/9.jpg\n")
    result = run("pack_rec.py", lst, tmp_path / "out", "--root", src, "--quiet")
    one_line_error(result, "pack_rec.py", "alice/9.jpg")
    assert not (tmp_path / "out").exists()


# -- protomem-eval-ijb -----------------------------------------------------------------------------

@pytest.fixture
def fake_ijb_root(tmp_path):
    """Meta files present (empty) and loose_crop/: enough to pass the input checks."""
    root = tmp_path / "IJBC"
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    for name in ("face_tid_mid.txt", "name_5pts_score.txt", "template_pair_label.txt", "1N_probe_mixed.csv",
                 "1N_gallery_G1.csv", "1N_gallery_G2.csv"):
        (root / "meta" / f"ijbc_{name}").write_text("")
    return root


@pytest.fixture
def tiny_weights(tmp_path):
    path = tmp_path / "model.pt"
    from protomem_plugin.backbones import get_model

    torch.save(get_model("tiny", num_features=32).state_dict(), path)
    return path


def test_eval_ijb_missing_root_creates_no_output(tmp_path, tiny_weights):
    out = tmp_path / "results" / "run1"
    before = snapshot(tmp_path)
    result = run("protomem-eval-ijb", "--root", tmp_path / "IJBC", "--output", out, "--network", "tiny",
                 "--weights", tiny_weights)
    one_line_error(result, "protomem-eval-ijb", str(tmp_path / "IJBC"))
    assert snapshot(tmp_path) == before


def test_eval_ijb_missing_meta_file_named(fake_ijb_root, tmp_path, tiny_weights):
    (fake_ijb_root / "meta" / "ijbc_name_5pts_score.txt").unlink()
    before = snapshot(tmp_path)
    result = run("protomem-eval-ijb", "--root", fake_ijb_root, "--output", tmp_path / "out", "--network", "tiny",
                 "--weights", tiny_weights)
    one_line_error(result, "protomem-eval-ijb", "ijbc_name_5pts_score.txt")
    assert snapshot(tmp_path) == before


def test_eval_ijb_missing_weights(fake_ijb_root, tmp_path):
    before = snapshot(tmp_path)
    result = run("protomem-eval-ijb", "--root", fake_ijb_root, "--output", tmp_path / "out", "--network", "tiny",
                 "--weights", tmp_path / "nowhere.pt")
    one_line_error(result, "protomem-eval-ijb", str(tmp_path / "nowhere.pt"))
    assert snapshot(tmp_path) == before


def test_eval_ijb_num_features_contradicting_the_weights(fake_ijb_root, tmp_path, tiny_weights):
    before = snapshot(tmp_path)
    result = run("protomem-eval-ijb", "--root", fake_ijb_root, "--output", tmp_path / "out", "--network", "tiny",
                 "--weights", tiny_weights, "--num-features", 512)
    one_line_error(result, "protomem-eval-ijb", "512", "32", str(tiny_weights))
    assert snapshot(tmp_path) == before


# -- protomem-export -------------------------------------------------------------------------------

def test_export_missing_weights(tmp_path):
    result = run("protomem-export", "--network", "tiny", "--weights", tmp_path / "model.pt",
                 "--output", tmp_path / "onnx" / "m.onnx")
    one_line_error(result, "protomem-export", str(tmp_path / "model.pt"))
    assert list(tmp_path.iterdir()) == []


def test_export_tiny_reads_num_features_and_rejects_a_contradiction(tmp_path, tiny_weights):
    before = snapshot(tmp_path)
    result = run("export_onnx.py", "--network", "tiny", "--weights", tiny_weights, "--output", tmp_path / "m.onnx",
                 "--num-features", 64)
    one_line_error(result, "protomem-export", "64", "32")
    assert snapshot(tmp_path) == before
    # the job's own network exports (its 7x7 -> 4x4 adaptive pool is rewritten for ONNX)
    result = run("protomem-export", "--network", "tiny", "--weights", tiny_weights, "--output", tmp_path / "m.onnx")
    assert result.returncode == 0, result.stderr
    diffs = [float(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines() if "max abs difference" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-4 and (tmp_path / "m.onnx").is_file()


def test_export_weights_of_another_network(tmp_path, tiny_weights):
    result = run("protomem-export", "--network", "mbf", "--weights", tiny_weights, "--output", tmp_path / "m.onnx")
    one_line_error(result, "protomem-export", str(tiny_weights), "does not match backbone 'mbf'")
    assert not (tmp_path / "m.onnx").exists()


# -- protomem-train --------------------------------------------------------------------------------

def test_train_unknown_key(tmp_path):
    before = snapshot(REPO / "configs")
    result = run("protomem-train", "configs/synthetic_pm.py", "--set", "lerning_rate=0.1", "--dry-run")
    one_line_error(result, "protomem-train", "lerning_rate")
    assert snapshot(REPO / "configs") == before


def test_train_missing_config(tmp_path):
    result = run("protomem-train", tmp_path / "nope.py")
    one_line_error(result, "protomem-train", str(tmp_path / "nope.py"))
    assert list(tmp_path.iterdir()) == []


def test_verbose_shows_the_traceback(tmp_path):
    result = run("protomem-train", tmp_path / "nope.py", "--verbose")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Traceback") and "ConfigError" in result.stderr
    assert lines[-1].startswith("protomem-train: ") and str(tmp_path / "nope.py") in lines[-1]
    result = run("pack_rec.py", tmp_path / "faces", tmp_path / "out", "--verbose")
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("pack_rec.py: source not found")


# -- the other tools and argparse ------------------------------------------------------------------

def test_other_tools_and_argument_errors(tmp_path):
    one_line_error(run("eval_bin.py", tmp_path / "lfw.bin", "--network", "tiny", "--weights", tmp_path / "m.pt"),
                   "eval_bin.py", "lfw.bin")
    one_line_error(run("make_synthetic_ijb.py", "--root", tmp_path / "IJBC", "--identities", 1),
                   "make_synthetic_ijb.py", "2 identities")
    one_line_error(run("eval_ijb.py", "--root", tmp_path / "IJBC", "--output", tmp_path / "o", "--network", "tiny",
                       "--weights", tmp_path / "m.pt"), "protomem-eval-ijb", "IJBC")
    one_line_error(run("make_synthetic.py", tmp_path / "x", "--identities", "many"), "make_synthetic.py",
                   "--identities", "many")
    assert list(tmp_path.iterdir()) == []


def test_run_cli_sorts_errors(capsys):
    def fails(exc):
        def main(argv):
            raise exc
        return main

    assert run_cli("prog", fails(FileExistsError("out exists\nreally")), []) == 2
    assert capsys.readouterr().err == "prog: out exists really\n"
    assert run_cli("prog", fails(KeyboardInterrupt()), []) == 130
    with pytest.raises(RuntimeError):  # unexpected: traceback, exit 1
        run_cli("prog", fails(RuntimeError("bug")), [])
    from protomem_plugin.heads.base import NonFiniteEmbeddingError

    assert not is_user_error(NonFiniteEmbeddingError("nan"))
    assert is_user_error(FileNotFoundError(2, "No such file or directory", "x"))


def test_unreadable_weights_are_named(tmp_path):
    from protomem_plugin.eval.embedders import load_backbone

    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"model\.pt: not a PyTorch state_dict file") as info:
        load_backbone("tiny", bad)
    assert "\n" not in str(info.value)


def test_dataset_folder_that_cannot_be_renamed_is_replaced_file_by_file(dataset, monkeypatch):
    """A mount point (or a read-only parent): the stage lives inside the folder."""
    from protomem_plugin.data import packing

    monkeypatch.setattr(packing, "_stage_names", lambda target: (target, ".stage-test-"))
    (dataset / "notes.txt").write_text("kept")
    with pytest.raises(ValueError, match="degraded_fraction"):
        make_synthetic_dataset(str(dataset), 3, 2, overwrite=True, degraded_fraction=2.0, **SMALL)
    make_synthetic_dataset(str(dataset), 4, 2, overwrite=True, **SMALL)
    assert sorted(os.listdir(dataset)) == ["notes.txt", "property", "quality.npy", "synthetic.json", "train.idx",
                                           "train.rec", "val.bin"]
    assert '"num_identities": 4' in (dataset / "synthetic.json").read_text()


# ============================================================= library, loaders, recipe
SIZE = 32


def jpeg(seed: int, size: int = SIZE) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", cv2.resize(image[:4, :4], (size, size)))[1].tobytes()


def good_rec(folder: Path, identities: int = 4, per_identity: int = 4, sizes=None) -> Path:
    """A correct InsightFace dataset; ``sizes`` (one per image) overrides the stored image sides."""
    sizes = sizes or [SIZE] * (identities * per_identity)
    samples = [(i // per_identity, jpeg(i, sizes[i])) for i in range(identities * per_identity)]
    write_insightface_rec(str(folder), samples, num_classes=identities, image_size=(SIZE, SIZE), progress=False)
    return folder


def handmade_rec(folder: Path, header: tuple[int, int], images: list[tuple[int, bytes]],
                 ranges: list[tuple[int, int]], classes: int) -> Path:
    """An InsightFace-layout dataset written record by record (header and identity records as given)."""
    folder.mkdir(parents=True, exist_ok=True)
    with RecordIOWriter(str(folder / "train.rec"), str(folder / "train.idx")) as writer:
        writer.write(0, pack_record(IRHeader(2, np.array(header, np.float32), 0, 0), b""))
        for key, (label, data) in enumerate(images, start=1):
            writer.write(key, pack_record(IRHeader(0, float(label), key, 0), data))
        for key, (start, end) in enumerate(ranges, start=len(images) + 1):
            writer.write(key, pack_record(IRHeader(2, np.array([start, end], np.float32), key, 0), b""))
    (folder / "property").write_text(f"{classes},{SIZE},{SIZE}")
    return folder


# ----------------------------------------------------------------------------- datasets
def test_a_header_only_dataset_names_the_rec(tmp_path):
    rec = handmade_rec(tmp_path / "d", (1, 1), [], [], 1)
    with pytest.raises(RecordIOError, match=r"d/train\.rec: the dataset holds no images"):
        InsightFaceRec(str(rec))


def test_empty_rec_and_idx_name_the_rec(tmp_path):
    (tmp_path / "train.rec").write_bytes(b"")
    (tmp_path / "train.idx").write_text("")
    with pytest.raises(RecordIOError, match=r"train\.rec: the dataset holds no images"):
        InsightFaceRec(str(tmp_path))


def test_an_empty_idx_beside_a_full_rec_is_not_read_as_zero_images(tmp_path):
    rec = good_rec(tmp_path / "d")
    (rec / "train.idx").write_text("")
    with pytest.raises(RecordIOError, match=r"train\.idx lists no records but .*train\.rec holds \d+ bytes"):
        InsightFaceRec(str(rec))


def test_a_header_one_key_long_is_refused_at_open(tmp_path):
    images = [(i // 2, jpeg(i)) for i in range(8)]  # keys 1..8, identities 0..3, records at 9..12
    rec = handmade_rec(tmp_path / "d", (10, 13), images, [(1, 3), (3, 5), (5, 7), (7, 9)], 4)
    with pytest.raises(RecordIOError, match=r"train\.rec: header record \(key 0\) says images end at key 9.*off by one"):
        InsightFaceRec(str(rec))


def test_a_header_one_key_short_is_refused_at_open(tmp_path):
    images = [(i // 2, jpeg(i)) for i in range(8)]
    rec = handmade_rec(tmp_path / "d", (8, 13), images, [(1, 3), (3, 5), (5, 7), (7, 9)], 4)
    with pytest.raises(RecordIOError, match=r"train\.rec: .*key 8"):
        InsightFaceRec(str(rec))


def test_identity_ranges_that_disagree_with_the_labels_name_the_image_key(tmp_path):
    images = [(0, jpeg(0)), (0, jpeg(1)), (1, jpeg(2)), (1, jpeg(3))]
    rec = handmade_rec(tmp_path / "d", (5, 7), images, [(1, 2), (2, 5)], 2)  # key 2 is labelled 0, range says 1
    with pytest.raises(RecordIOError, match=r"image key 2 has label 0 but lies in the range of identity 1"):
        InsightFaceRec(str(rec))


def test_ranges_that_leave_a_gap_are_refused(tmp_path):
    images = [(0, jpeg(0)), (0, jpeg(1)), (1, jpeg(2)), (1, jpeg(3))]
    rec = handmade_rec(tmp_path / "d", (5, 7), images, [(1, 3), (4, 5)], 2)
    with pytest.raises(RecordIOError, match=r"identity record key 6 holds the range 4\.\.5"):
        InsightFaceRec(str(rec))


# ----------------------------------------------------------------------------- .bin sets
def test_a_bin_with_zero_pairs_is_refused(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(pickle.dumps(([], [])))
    with pytest.raises(ValueError, match=r"empty\.bin: the set holds no pairs"):
        load_bin_encoded(str(path))


def test_a_bin_of_the_wrong_structure_names_the_file(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps({"bins": []}))
    with pytest.raises(ValueError, match=r"odd\.bin: expected a pickled \(bins, issame_list\) pair"):
        load_bin_encoded(str(path))


# ----------------------------------------------------------------------------- loaders
def test_a_corrupt_jpeg_body_names_the_key_in_both_loaders(tmp_path):
    broken = bytearray(jpeg(99))
    broken[len(broken) // 2:] = b"\x00" * (len(broken) - len(broken) // 2)  # the header stays, the scan is gone
    samples = [(i // 2, jpeg(i)) for i in range(8)]
    samples[5] = (2, bytes(broken[:40]) + b"\xff\xd9")  # key 6: a JPEG header with no image data
    write_insightface_rec(str(tmp_path), samples, num_classes=4, image_size=(SIZE, SIZE), progress=False)
    for use_dali in (True, False):
        loader = build_train_loader(str(tmp_path), 8, image_size=SIZE, use_dali=use_dali, num_workers=0,
                                    random_flip=False)
        with pytest.raises(RecordIOError, match=r"train\.rec: key 6: payload of \d+ bytes is not a decodable image"):
            list(loader)
        if use_dali:  # the loader stays broken with the same message, not "pipeline object is no longer valid"
            with pytest.raises(RecordIOError, match=r"key 6"):
                list(loader)


@pytest.mark.parametrize("sizes", [[SIZE] * 15 + [48], [64] * 16], ids=["one_larger", "all_larger"])
def test_images_of_another_size_than_property_are_resized_alike_by_both_loaders(tmp_path, sizes):
    rec = good_rec(tmp_path / "d", sizes=sizes)
    out = {}
    for use_dali in (True, False):
        loader = build_train_loader(str(rec), 16, samples_per_class=1, image_size=SIZE, use_dali=use_dali,
                                    num_workers=0, random_flip=False, seed=3)
        images, labels = next(iter(loader))
        assert images.shape == (16, 3, SIZE, SIZE)
        out[use_dali] = (images, labels, loader.current_positions.copy())
    assert torch.equal(out[True][1], out[False][1])
    np.testing.assert_array_equal(out[True][2], out[False][2])
    # the two decoders and resizers differ slightly, not by image
    assert (out[True][0] - out[False][0]).abs().mean() < 0.05


# ----------------------------------------------------------------------------- the recipe
@pytest.fixture()
def job(tmp_path, tiny_rec):
    """A tiny job on the session dataset (PM with 32 slots unless ``head`` is given), output under tmp."""
    def make(name="job", **overrides):
        values = dict(rec=str(tiny_rec), output=str(tmp_path / "out"), num_epoch=1, save_every_steps=3, max_steps=6)
        if overrides.get("head", "prototype_memory") == "prototype_memory":
            values.update(head="prototype_memory", memory_size=32)
        values.update(overrides)
        return get_config(write_config(tmp_path, name, **values))
    return make


def test_an_empty_dataset_stops_training_before_the_output_folder_exists(tmp_path, job):
    empty = handmade_rec(tmp_path / "empty", (1, 1), [], [], 1)
    cfg = job(rec=str(empty))
    with pytest.raises(RecordIOError, match=r"empty/train\.rec: the dataset holds no images"):
        train(cfg)
    assert not Path(cfg.output).exists()


@pytest.mark.parametrize("content, message", [
    (pickle.dumps(([], [])), r"bad\.bin: the set holds no pairs"),
    (b"cos\nsystem\n(S'echo hi'\ntR.", r"bad\.bin: refusing to unpickle global"),
    (pickle.dumps([1, 2, 3]), r"bad\.bin: expected a pickled"),
], ids=["zero_pairs", "unsafe", "structure"])
def test_a_broken_validation_set_stops_training_before_any_step(tmp_path, tiny_rec, job, content, message):
    rec = tmp_path / "rec"
    rec.mkdir()
    for name in ("train.rec", "train.idx", "property"):
        os.symlink(Path(tiny_rec) / name, rec / name)
    (rec / "bad.bin").write_bytes(content)
    cfg = job(rec=str(rec), val_targets=["bad"])
    with pytest.raises(ConfigError, match=r"config key 'val_targets' \('bad'\): .*" + message):
        train(cfg)
    assert not Path(cfg.output).exists()


def test_an_output_that_is_a_file_is_refused(tmp_path, job):
    (tmp_path / "out").write_text("precious")
    with pytest.raises(ConfigError, match=r"config key 'output' = .*out' is a file"):
        train(job())
    assert (tmp_path / "out").read_text() == "precious"


@pytest.mark.parametrize("change, message", [
    (dict(network="mbf"), r"config key 'network' = 'mbf' does not match the checkpoint"),
    (dict(embedding_size=16), r"config key 'embedding_size' = 16 but the checkpoint .* was trained with 32"),
    (dict(memory_size=48), r"config key 'memory_size' = 48 but the checkpoint .* holds 32 memory slots"),
    (dict(head="partial_fc"), r"config key 'head' = 'partial_fc' but the checkpoint .* 'prototype_memory'"),
], ids=["network", "embedding_size", "memory_size", "head"])
def test_a_resume_that_does_not_match_the_checkpoint_names_the_key_and_changes_nothing(job, change, message):
    cfg = job(stop_at_step=3)
    train(cfg)
    before = snapshot(Path(cfg.output))
    cfg = job(resume=True, **change)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert snapshot(Path(cfg.output)) == before


def test_a_resume_with_other_classes_names_num_classes(job):
    cfg = job(head="partial_fc", stop_at_step=3)
    train(cfg)
    before = snapshot(Path(cfg.output))
    cfg = job(head="partial_fc", resume=True, num_classes=64)
    with pytest.raises(ConfigError, match=r"config key 'num_classes' = 64 but the checkpoint .* holds 60 class rows"):
        train(cfg)
    assert snapshot(Path(cfg.output)) == before


def test_the_hook_reports_a_bad_job_in_one_line(tmp_path):
    standin = REPO / "tests" / "arcface_standin"
    job = tmp_path / "job.py"
    job.write_text((standin / "configs" / "job_pm.py").read_text() + "config.memory_sise = 64\n")
    result = subprocess.run([sys.executable, "-m", "protomem_plugin.arcface_torch", str(standin), str(job)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
    one_line_error(result, "python -m protomem_plugin.arcface_torch", "'memory_sise'", str(job), "'memory_size'")
