"""Opening a dataset: streaming .idx parse, labels from identity records, the label cache of
headerless datasets."""
import json
import os
import warnings

import numpy as np
import pytest

from protomem_plugin.data import recordio
from protomem_plugin.data.label_cache import label_cache_paths
from protomem_plugin.data.packing import header_label, write_insightface_rec
from protomem_plugin.data.recordio import InsightFaceRec, IRHeader, RecordIOError, RecordIOWriter, pack_record


def reference_index(path):
    """A plain line-by-line parse (what the .idx format means)."""
    keys, offsets = [], []
    for line in open(path, encoding="ascii"):
        if line.strip():
            key, offset = line.split()
            keys.append(int(key))
            offsets.append(int(offset))
    return keys, offsets


def test_streaming_idx_parse_equals_a_line_by_line_parse_across_chunks(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    gaps, ends = ["\t", " ", "  ", "\t "], ["", " ", "\r"]
    lines = [str(k) + gaps[rng.integers(4)] + str(o) + ends[rng.integers(3)]
             for k, o in zip(rng.permutation(5000), np.cumsum(rng.integers(8, 4000, 5000)))]
    for i in rng.choice(len(lines), 50, replace=False):
        lines[i] += "\n"  # blank lines
    path = tmp_path / "a.idx"
    path.write_text("\n".join(lines))  # no newline at the end
    monkeypatch.setattr(recordio, "_IDX_CHUNK", 997)  # many chunks, cut inside lines
    keys, offsets = recordio.read_index(str(path))
    ref_keys, ref_offsets = reference_index(path)
    assert keys.tolist() == ref_keys and offsets.tolist() == ref_offsets
    # a malformed line is named by its number, also far into the file
    text = path.read_text().split("\n")
    text[4321] = "17\t99\t3"
    path.write_text("\n".join(text))
    with pytest.raises(RecordIOError, match=r"a\.idx:4322: expected 'key<TAB>offset', got '17\\t99\\t3'"):
        recordio.read_index(str(path))


def headerless(folder, labels):
    folder.mkdir(parents=True, exist_ok=True)
    with RecordIOWriter(str(folder / "train.rec"), str(folder / "train.idx")) as writer:
        for key, label in enumerate(labels):
            writer.write(key, pack_record(IRHeader(0, float(label), key, 0), b"\xff\xd8\xff" + bytes(8)))
    return folder


def test_headerless_labels_are_read_once_and_cached_until_the_rec_changes(tmp_path):
    labels = np.random.default_rng(1).integers(0, 9, 200)
    folder = headerless(tmp_path / "d", labels)
    npy, meta = label_cache_paths(str(folder), "train")
    first = InsightFaceRec(str(folder))
    assert first.label_source == "image headers" and first.labels.tolist() == labels.tolist()
    assert os.path.isfile(npy) and json.load(open(meta))["images"] == 200
    # the second open takes the cache: prove it by changing what the cache says
    np.save(npy, (labels + 1).astype(np.int32))
    assert InsightFaceRec(str(folder)).labels.tolist() == (labels + 1).tolist()
    # a changed .rec (size and mtime) invalidates it: the headers are read again
    with open(folder / "train.rec", "ab") as f:
        f.write(b"\x00" * 4)
    assert InsightFaceRec(str(folder)).labels.tolist() == labels.tolist()
    assert np.load(npy).tolist() == labels.tolist()


def test_a_cache_that_cannot_be_written_gives_the_labels_and_a_warning(tmp_path):
    folder = headerless(tmp_path / "d", [0, 1, 1, 2])
    npy, _ = label_cache_paths(str(folder), "train")
    os.mkdir(npy)  # a folder where the cache file would go: the rename fails, as on a read-only share
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert InsightFaceRec(str(folder)).labels.tolist() == [0, 1, 1, 2]
    assert any("cannot cache labels" in str(w.message) for w in caught)
    assert sorted(os.listdir(folder)) == ["train.idx", "train.labels.npy", "train.rec"]  # no temporary left


def test_header_datasets_take_their_labels_from_the_identity_records(tmp_path):
    counts = [3, 0, 5, 1, 4]
    samples = [(c, b"\xff\xd8\xff" + bytes([c]) * 9) for c, n in enumerate(counts) for _ in range(n)]
    write_insightface_rec(str(tmp_path), samples, num_classes=5, image_size=(32, 32), progress=False)
    rec = InsightFaceRec(str(tmp_path))
    assert rec.label_source == "identity records"
    assert rec.labels.tolist() == [c for c, _ in samples]  # what every image header says
    _, from_headers = rec.record_io.read_headers(rec.image_keys)
    assert rec.labels.tolist() == from_headers.astype(int).tolist()
    assert rec.identity_ranges.tolist() == [[1, 4], [4, 4], [4, 9], [9, 10], [10, 14]]
    assert not os.path.exists(label_cache_paths(str(tmp_path), "train")[0])  # nothing to cache


def test_header_keys_beyond_float32_precision_are_resolved_exactly(tmp_path):
    """2**24 + 2 images: the header's first identity-record key (2**24 + 3) is rounded by float32, and so
    are the identity records' key ranges; the open finds the exact keys and ranges all the same."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
    from scale import write_index_only_dataset

    from protomem_plugin.data.loader import sampler_layout

    counts = np.array([5, (1 << 23) - 4, 7, (1 << 23) - 6, 2], dtype=np.int64)  # 2**24 + 4 images
    info = write_index_only_dataset(tmp_path / "big", counts)
    assert not info["header_exact"] and float(np.float32(info["first_identity_key"])) != info["first_identity_key"]
    rec = InsightFaceRec(str(tmp_path / "big"))
    assert len(rec) == counts.sum() and rec.label_source == "image headers"
    ends = np.cumsum(counts) + 1
    np.testing.assert_array_equal(rec.identity_ranges, np.stack([np.r_[1, ends[:-1]], ends], axis=1))
    np.testing.assert_array_equal(np.bincount(rec.labels), counts)
    layout = sampler_layout(rec)
    np.testing.assert_array_equal(layout.counts[: len(counts)], counts)
    # the packer writes this header too (rounded, with a warning) instead of failing at the end of a pack
    with pytest.warns(UserWarning, match="MXFaceDataset reads the rounded"):
        packed = header_label(info["first_identity_key"], info["end_key"], "big")
    header, _ = rec.record_io._unpack(0)
    np.testing.assert_array_equal(packed, header.label)


def test_header_keys_within_float32_precision_are_written_exactly_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        label = header_label((1 << 24) - 9, 1 << 24, "small")
    assert label.dtype == np.float32 and label.tolist() == [(1 << 24) - 9, 1 << 24]
