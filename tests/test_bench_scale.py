"""tools/bench/scale.py: the vectorised index-only dataset writer, and the benchmark's --quick mode."""
import importlib
import json
import sys
from pathlib import Path

import numpy as np

from protomem_plugin.data.recordio import (IRHeader, InsightFaceRec, RecordIOWriter, pack_record,
                                           write_property)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "bench"))
scale = importlib.import_module("scale")


def write_reference(root: Path, counts: np.ndarray) -> None:
    """The same dataset written record by record through RecordIOWriter (as packing.py lays it out)."""
    root.mkdir(parents=True)
    images, identities = int(counts.sum()), len(counts)
    starts = np.concatenate([[1], 1 + np.cumsum(counts)])
    first, end = images + 1, images + 1 + identities
    with RecordIOWriter(str(root / "train.rec"), str(root / "train.idx")) as writer:
        writer.write(0, pack_record(IRHeader(2, np.array([first, end], np.float32), 0, 0), b""))
        key = 1
        for label, count in enumerate(counts):
            for _ in range(count):
                writer.write(key, pack_record(IRHeader(0, float(label), key, 0), scale.PAYLOAD))
                key += 1
        for c in range(identities):
            rng = np.array([starts[c], starts[c + 1]], dtype=np.float32)
            writer.write(first + c, pack_record(IRHeader(2, rng, 0, 0), b""))
    write_property(str(root / "property"), identities, 112, 112)


def test_vectorised_writer_matches_recordio_writer_and_opens(tmp_path):
    counts = np.array([3, 1, 5, 2, 0, 4, 10, 1, 7], dtype=np.int64)
    fast, ref = tmp_path / "fast", tmp_path / "ref"
    info = scale.write_index_only_dataset(fast, counts, chunk=4)  # several chunks, boundaries inside identities
    write_reference(ref, counts)
    for name in ("train.rec", "train.idx", "property"):
        assert (fast / name).read_bytes() == (ref / name).read_bytes(), name
    assert info["header_exact"] and info["images"] == counts.sum()
    assert info["rec_bytes"] + info["idx_bytes"] <= scale.dataset_files_bytes(counts)

    rec = InsightFaceRec(str(fast))
    assert rec.has_header and rec.label_source == "identity records"
    assert rec.num_classes == len(counts) and len(rec) == counts.sum()
    np.testing.assert_array_equal(rec.labels, np.repeat(np.arange(len(counts)), counts))
    starts = np.concatenate([[1], 1 + np.cumsum(counts)])
    np.testing.assert_array_equal(rec.identity_ranges, np.stack([starts[:-1], starts[1:]], axis=1))
    assert rec.read_image_bytes(5) == scale.PAYLOAD
    rec.close()


def test_index_lines_formats_like_python():
    keys = np.array([0, 7, 10, 99, 100, 123456789, 10**10], dtype=np.int64)
    offsets = np.array([0, 1, 9, 10, 36, 4, 5 * 10**11], dtype=np.int64)
    expected = "".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist())).encode()
    assert scale.index_lines(keys, offsets) == expected


def test_identity_counts_and_largest_header_exact():
    counts = scale.identity_counts(10**8 - 1)
    assert len(counts) == 10**7 and counts[-1] == 9 and counts.sum() == 10**8 - 1
    images, identities = 10**8 - 1, 10**7
    for key in (images + 1, images + 1 + identities):  # the full run's largest dataset keeps an exact header
        assert float(np.float32(key)) == key
    assert float(np.float32(scale.FLOAT32_EXACT + 3)) != scale.FLOAT32_EXACT + 3  # the probe's is rounded


def test_quick_run_writes_every_component(tmp_path):
    out = tmp_path / "out"
    report = scale.main(["--quick", "--out", str(out), "--data-dir", str(tmp_path / "data")])
    for name in ("scale.json", "scale.png", "scale.md"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "scale.json").read_text())
    assert saved["command"].endswith("--quick --out " + str(out) + " --data-dir " + str(tmp_path / "data"))
    rows = saved["results"]
    assert not [r for r in rows if r.get("error")], [r["error"] for r in rows if r.get("error")]
    components = {r["component"] for r in rows}
    assert components == {"sampler", "perm", "open", "head", "pfc"}
    heads = {r["approach"] for r in rows if r["component"] == "head"}
    assert any(h.startswith("PM") for h in heads) and any(h.startswith("QAPM") for h in heads)
    for r in rows:
        if not r.get("extrapolated"):
            assert r["peak_mb"] >= 0 and r["time_s"] >= 0, r
    opens = [r for r in rows if r["component"] == "open"]
    assert {r["approach"] for r in opens} == {"InsightFaceRec, open #1 (ours)", "InsightFaceRec, open #2 (ours)"}
    assert [r["images"] for r in opens if r.get("extrapolated")] == [10**5, 10**5]
    assert all(r["label_source"] == "identity records" for r in opens)
    sampler = [r for r in rows if r["component"] == "sampler"]
    assert all(r["met"] for r in sampler) and all(r["batch_size"] == scale.BATCH for r in sampler)
    assert report["targets"] and not list((tmp_path / "data").glob("images_*"))  # datasets removed
    md = (out / "scale.md").read_text()
    assert "extrapolated" in md and "python tools/bench/scale.py --quick" in md
