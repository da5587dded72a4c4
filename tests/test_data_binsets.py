"""Validation .bin sets: round trip, arcface/py2 variants, and the restricted unpickler."""

import pickle
import struct

import cv2
import numpy as np
import pytest

from protomem_plugin.data.binsets import UnsafePickleError, load_bin, load_bin_encoded, write_bin


def encoded_images(n, size=20):
    rng = np.random.default_rng(1)
    images = [cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (5, 5), 0) for _ in range(n)]
    return images, [cv2.imencode(".png", im)[1].tobytes() for im in images]  # lossless: exact comparison


def test_write_then_load_round_trip(tmp_path):
    images, data = encoded_images(6)
    write_bin(str(tmp_path / "v.bin"), data, [True, False, True])
    decoded, issame = load_bin(str(tmp_path / "v.bin"), image_size=(20, 20))
    assert decoded.shape == (6, 20, 20, 3) and decoded.dtype == np.uint8
    for got, bgr in zip(decoded, images):
        np.testing.assert_array_equal(got, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    np.testing.assert_array_equal(issame, [True, False, True])
    assert issame.dtype == bool
    resized, _ = load_bin(str(tmp_path / "v.bin"), image_size=(12, 16))
    assert resized.shape == (6, 12, 16, 3)


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_uint8_bins_and_numpy_bools_as_in_arcface_files(tmp_path, protocol):
    _, data = encoded_images(4)
    bins = [np.frombuffer(d, dtype=np.uint8).copy() for d in data]
    issame = [np.bool_(True), np.bool_(False)]
    (tmp_path / "a.bin").write_bytes(pickle.dumps((bins, issame), protocol=protocol))
    encoded, flags = load_bin_encoded(str(tmp_path / "a.bin"))
    assert encoded == data
    np.testing.assert_array_equal(flags, [True, False])


def py2_str(data: bytes) -> bytes:
    """Python 2 ``str`` opcode (SHORT_BINSTRING / BINSTRING)."""
    return (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data


def test_python2_pickle_needing_encoding_bytes(tmp_path):
    _, data = encoded_images(4)
    stream = b"\x80\x02]q\x00(" + b"".join(py2_str(d) for d in data) + b"e]q\x01(\x88\x89e\x86q\x02."
    (tmp_path / "py2.bin").write_bytes(stream)
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(stream)  # the default (ASCII) decoding cannot read it
    encoded, flags = load_bin_encoded(str(tmp_path / "py2.bin"))
    assert encoded == data
    np.testing.assert_array_equal(flags, [True, False])


def test_foreign_global_is_refused_before_it_runs(tmp_path):
    target = tmp_path / "created_by_pickle"
    path_op = b"X" + struct.pack("<I", len(str(target))) + str(target).encode()
    stream = b"\x80\x02cos\nmakedirs\n" + path_op + b"\x85R."
    (tmp_path / "evil.bin").write_bytes(stream)
    with pytest.raises(UnsafePickleError, match=r"evil\.bin.*os\.makedirs"):
        load_bin(str(tmp_path / "evil.bin"))
    assert not target.exists()


def test_other_objects_are_refused(tmp_path):
    from collections import OrderedDict

    (tmp_path / "od.bin").write_bytes(pickle.dumps((OrderedDict(a=1), [True]), protocol=4))
    with pytest.raises(UnsafePickleError, match=r"od\.bin.*collections\.OrderedDict"):
        load_bin(str(tmp_path / "od.bin"))


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"bins": []}, "expected a pickled"),
        (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
        (([b"a", b"b"], ["yes"]), r"issame_list\[0\]"),
        (([b"a", 5], [True]), "image 1 is a int"),
        ((b"ab", [True]), "bins must be a list"),
    ],
)
def test_wrong_structure_is_a_clear_error(tmp_path, payload, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(ValueError, match=rf"bad\.bin.*{message}"):
        load_bin(str(path))


def test_undecodable_image_names_index(tmp_path):
    _, data = encoded_images(2)
    write_bin(str(tmp_path / "u.bin"), [data[0], b"garbage"], [True])
    with pytest.raises(ValueError, match=r"u\.bin: image 1"):
        load_bin(str(tmp_path / "u.bin"))
    (tmp_path / "trunc.bin").write_bytes(pickle.dumps(([data[0]], []), protocol=4)[:-5])
    with pytest.raises(ValueError, match=r"trunc\.bin"):
        load_bin(str(tmp_path / "trunc.bin"))
