"""RecordIO reading/writing against hand-packed bytes, InsightFace layouts, packing and bad input."""

import os
import struct

import cv2
import numpy as np
import pytest

from protomem_plugin.data.packing import pack_images, write_insightface_rec
from protomem_plugin.data.recordio import (
    IndexedRecordIO,
    InsightFaceRec,
    IRHeader,
    RecordIOError,
    RecordIOWriter,
    pack_record,
    read_property,
    unpack_record,
)

MAGIC = 0xCED7230A


# ---- independent reference: the format written out with struct -----------------------------
def ref_frame(cflag: int, part: bytes) -> bytes:
    return struct.pack("<II", MAGIC, (cflag << 29) | len(part)) + part + b"\0" * (-len(part) % 4)


def ref_header(label, id1=0, id2=0) -> bytes:
    if np.ndim(label) == 0:
        return struct.pack("<IfQQ", 0, float(label), id1, id2)
    values = [float(v) for v in label]
    return struct.pack("<IfQQ", len(values), 0.0, id1, id2) + struct.pack(f"<{len(values)}f", *values)


def jpeg(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (3, 3), 0)
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def jpeg_with_magic(seed: int) -> bytes:
    """A JPEG whose comment segment puts the magic word at record offsets 32 and 40 (4-aligned)."""
    body = jpeg(seed)
    comment = b"\0\0" + struct.pack("<I", MAGIC) + b"abcd" + struct.pack("<I", MAGIC) + b"wxyz"
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return body[:2] + segment + body[2:]


def write_ref_rec(folder, records: dict[int, bytes], split_keys=()) -> None:
    """Write .rec/.idx by hand; records under split_keys are split at their aligned magic words."""
    rec = bytearray()
    idx_lines = []
    for key, record in records.items():
        idx_lines.append(f"{key}\t{len(rec)}\n")
        if key in split_keys:
            magic = struct.pack("<I", MAGIC)
            pieces = []
            start = 0
            for pos in range(0, len(record) - 3, 4):
                if record[pos : pos + 4] == magic:
                    pieces.append(record[start:pos])
                    start = pos + 4
            pieces.append(record[start:])
            assert len(pieces) == 3, "test record must contain the magic twice"
            rec += ref_frame(1, pieces[0]) + ref_frame(2, pieces[1]) + ref_frame(3, pieces[2])
        else:
            rec += ref_frame(0, record)
    (folder / "train.rec").write_bytes(bytes(rec))
    (folder / "train.idx").write_text("".join(idx_lines))


def decode_rgb(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture
def insightface_dir(tmp_path):
    """Hand-packed InsightFace layout: 3 identities with 2, 1, 2 images; key 3 split by the magic."""
    labels = [0, 0, 1, 2, 2]
    images = {k: (jpeg_with_magic(k) if k == 3 else jpeg(k)) for k in range(1, 6)}
    records = {0: ref_header([6, 9])}
    for k in range(1, 6):
        records[k] = ref_header(labels[k - 1], k, 0) + images[k]
    for c, (start, end) in enumerate([(1, 3), (3, 4), (4, 6)]):
        records[6 + c] = ref_header([start, end])
    write_ref_rec(tmp_path, records, split_keys={3})
    (tmp_path / "property").write_text("3,16,16")
    return tmp_path, labels, images


def test_irheader_pack_matches_struct_layout():
    assert pack_record(IRHeader(0, 7.0, 3, 4), b"xy") == struct.pack("<IfQQ", 0, 7.0, 3, 4) + b"xy"
    packed = pack_record(IRHeader(0, [1.5, 2.0, 3.0], 5, 6), b"img")
    assert packed == struct.pack("<IfQQ", 3, 0.0, 5, 6) + struct.pack("<3f", 1.5, 2.0, 3.0) + b"img"
    header, payload = unpack_record(packed)
    assert header.flag == 3 and header.id == 5 and header.id2 == 6 and payload == b"img"
    np.testing.assert_array_equal(header.label, np.array([1.5, 2.0, 3.0], np.float32))
    header, payload = unpack_record(struct.pack("<IfQQ", 0, 42.0, 1, 2) + b"abc")
    assert header == IRHeader(0, 42.0, 1, 2) and payload == b"abc"


def test_writer_is_bit_exact_with_the_reference_framing(tmp_path):
    records = {0: ref_header(1.0) + b"abc", 1: ref_header(2.0) + jpeg_with_magic(1), 2: ref_header([3.0, 4.0]) + b""}
    with RecordIOWriter(str(tmp_path / "w.rec"), str(tmp_path / "w.idx")) as writer:
        for key, record in records.items():
            writer.write(key, record)
    ref = tmp_path / "ref"
    ref.mkdir()
    write_ref_rec(ref, records, split_keys={1})
    assert (tmp_path / "w.rec").read_bytes() == (ref / "train.rec").read_bytes()
    assert (tmp_path / "w.idx").read_text() == (ref / "train.idx").read_text()
    reader = IndexedRecordIO(str(tmp_path / "w.rec"))
    assert reader.keys == [0, 1, 2]
    for key, record in records.items():
        assert reader.read(key) == record


def test_round_trip_random_payloads_with_magic_words(tmp_path):
    rng = np.random.default_rng(0)
    magic = struct.pack("<I", MAGIC)
    records = {}
    for key in range(40):
        body = bytearray(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes())
        for _ in range(int(rng.integers(0, 3))):
            pos = int(rng.integers(0, len(body) + 1))
            body[pos:pos] = magic  # aligned or not: both must survive
        records[key * 3] = bytes(body)
    with RecordIOWriter(str(tmp_path / "r.rec"), str(tmp_path / "r.idx")) as writer:
        for key, record in records.items():
            writer.write(key, record)
    reader = IndexedRecordIO(str(tmp_path / "r.rec"), str(tmp_path / "r.idx"))
    assert reader.keys == list(records)
    assert all(reader.read(k) == v for k, v in records.items())


def test_insightface_layout_hand_packed(insightface_dir):
    folder, labels, images = insightface_dir
    rec = InsightFaceRec(str(folder))
    assert rec.has_header and rec.num_classes == 3 and rec.image_size == (16, 16)
    np.testing.assert_array_equal(rec.image_keys, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(rec.labels, labels)
    assert rec.labels.dtype == np.int64
    np.testing.assert_array_equal(rec.identity_ranges, [[1, 3], [3, 4], [4, 6]])
    for key in range(1, 6):
        assert rec.read_image_bytes(key) == images[key]
        np.testing.assert_array_equal(rec.read_image(key), decode_rgb(images[key]))
    assert rec.read_record(3)[0].id == 3


def test_headerless_layout_hand_packed(tmp_path):
    images = {k: jpeg(10 + k) for k in range(4)}
    labels = [2.0, 0.0, 1.0, 1.0]
    records = {k: ref_header(labels[k]) + images[k] for k in range(4)}
    records[2] = ref_header([1.0, 7.0]) + images[2]  # a multi-label image record: first label counts
    write_ref_rec(tmp_path, records)
    rec = InsightFaceRec(str(tmp_path))
    assert not rec.has_header and rec.identity_ranges is None and rec.image_size is None
    np.testing.assert_array_equal(rec.image_keys, [0, 1, 2, 3])
    np.testing.assert_array_equal(rec.labels, [2, 0, 1, 1])
    assert rec.num_classes == 3
    np.testing.assert_array_equal(rec.read_image(2), decode_rgb(images[2]))


def test_missing_idx_is_rebuilt_by_scanning_or_refused(insightface_dir):
    folder, labels, images = insightface_dir
    os.remove(folder / "train.idx")
    with pytest.warns(UserWarning, match="rebuilding"):
        reader = IndexedRecordIO(str(folder / "train.rec"))
    assert reader.keys == list(range(9))  # the split record counts once
    assert unpack_record(reader.read(3))[1] == images[3]
    with pytest.raises(FileNotFoundError, match="train.idx"):
        IndexedRecordIO(str(folder / "train.rec"), rebuild_missing_index=False)
    with pytest.warns(UserWarning):
        rec = InsightFaceRec(str(folder))
    np.testing.assert_array_equal(rec.labels, labels)


def test_truncated_rec_names_file_and_key(insightface_dir):
    folder, _, _ = insightface_dir
    data = (folder / "train.rec").read_bytes()
    offsets = [int(line.split("\t")[1]) for line in (folder / "train.idx").read_text().splitlines()]
    (folder / "train.rec").write_bytes(data[: offsets[8] + 12])  # cut inside the last record (key 8)
    with pytest.raises(RecordIOError, match=r"train\.rec.*key 8.*truncated"):
        IndexedRecordIO(str(folder / "train.rec"))


def test_wrong_magic_names_file_and_key(insightface_dir):
    folder, _, _ = insightface_dir
    data = bytearray((folder / "train.rec").read_bytes())
    offset = int((folder / "train.idx").read_text().splitlines()[2].split("\t")[1])
    data[offset : offset + 4] = b"\x01\x02\x03\x04"
    (folder / "train.rec").write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=r"train\.rec.*wrong magic.*key 2"):
        InsightFaceRec(str(folder))


def test_idx_offset_past_end_names_idx_and_key(insightface_dir):
    folder, _, _ = insightface_dir
    lines = (folder / "train.idx").read_text().splitlines()
    lines[4] = "4\t999999"
    (folder / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=r"train\.idx.*key 4.*past the end"):
        InsightFaceRec(str(folder))


def test_malformed_idx_line_names_line(tmp_path, insightface_dir):
    folder, _, _ = insightface_dir
    with open(folder / "train.idx", "a") as f:
        f.write("nine\tten\n")
    with pytest.raises(RecordIOError, match=r"train\.idx:10"):
        IndexedRecordIO(str(folder / "train.rec"))


def test_payload_that_is_not_an_image(tmp_path):
    records = {0: ref_header(0.0) + jpeg(1), 1: ref_header(0.0) + b"certainly not a jpeg"}
    write_ref_rec(tmp_path, records)
    rec = InsightFaceRec(str(tmp_path))
    rec.read_image(0)
    with pytest.raises(RecordIOError, match=r"train\.rec: key 1.*not a decodable image"):
        rec.read_image(1)


def test_label_outside_property_class_count(insightface_dir):
    folder, _, _ = insightface_dir
    (folder / "property").write_text("2,16,16")
    with pytest.raises(RecordIOError, match=r"train\.rec.*key 4.*label 2.*2 classes.*property"):
        InsightFaceRec(str(folder))


def test_bad_property_file(insightface_dir):
    folder, _, _ = insightface_dir
    (folder / "property").write_text("many,112")
    with pytest.raises(RecordIOError, match="property"):
        read_property(str(folder / "property"))


def test_write_insightface_rec_reads_back_with_identity_records(tmp_path):
    samples = [(0, jpeg(1)), (0, jpeg(2)), (2, jpeg(3))]  # class 1 has no image: empty range
    n = write_insightface_rec(str(tmp_path), iter(samples), num_classes=3, image_size=(16, 16), progress=False)
    assert n == 3
    rec = InsightFaceRec(str(tmp_path))
    np.testing.assert_array_equal(rec.labels, [0, 0, 2])
    np.testing.assert_array_equal(rec.identity_ranges, [[1, 3], [3, 3], [3, 4]])
    assert [rec.read_image_bytes(k) for k in (1, 2, 3)] == [s[1] for s in samples]
    # the header record is byte-identical to the reference encoding
    assert rec.record_io.read(0) == ref_header([4, 7])
    assert read_property(str(tmp_path / "property")) == (3, 16, 16)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_insightface_rec(str(tmp_path), iter(samples), num_classes=3, image_size=(16, 16), progress=False)


def test_pack_images_from_folder_and_list(tmp_path):
    src = tmp_path / "faces"
    payloads = {}
    for person, count in (("bob", 2), ("alice", 1), ("carol", 3)):
        (src / person).mkdir(parents=True)
        for i in range(count):
            data = jpeg(len(payloads))
            payloads[(person, i)] = data
            (src / person / f"{i}.jpg").write_bytes(data)
    (src / "bob" / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    assert pack_images(str(src), str(out), progress=False) == 6
    rec = InsightFaceRec(str(out))
    np.testing.assert_array_equal(rec.labels, [0, 1, 1, 2, 2, 2])  # alice, bob, carol
    assert rec.read_image_bytes(1) == payloads[("alice", 0)]
    assert rec.read_image_bytes(6) == payloads[("carol", 2)]
    with pytest.raises(FileExistsError):
        pack_images(str(src), str(out), progress=False)

    lst = tmp_path / "train.lst"
    lst.write_text(f"0\t1\tbob/0.jpg\n1\t0\talice/0.jpg\n2\t1.000000\tbob/1.jpg\n")
    assert pack_images(str(lst), str(tmp_path / "out2"), root=str(src), progress=False) == 3
    rec = InsightFaceRec(str(tmp_path / "out2"))
    np.testing.assert_array_equal(rec.labels, [0, 1, 1])
    assert rec.read_image_bytes(1) == payloads[("alice", 0)]

    bad = tmp_path / "bad.lst"
    bad.write_text("0\tx\tbob/0.jpg\n")
    with pytest.raises(ValueError, match=r"bad\.lst:1"):
        pack_images(str(bad), str(tmp_path / "out3"), root=str(src), progress=False)
    (src / "alice" / "broken.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        pack_images(str(src), str(tmp_path / "out4"), progress=False)
    assert not (tmp_path / "out4" / "train.rec").exists()
