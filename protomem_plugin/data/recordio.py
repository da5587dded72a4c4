"""MXNet RecordIO (.rec/.idx) reading and writing without mxnet.

Record framing (little-endian): ``uint32 magic 0xced7230a``, ``uint32 lrec`` (upper 3 bits:
cflag 0 whole record / 1 first part / 2 middle part / 3 last part; lower 29 bits: part length),
the part bytes, zero padding to a multiple of 4. A writer splits a payload wherever the magic word
occurs at a 4-byte aligned position of the payload; the word itself is dropped and the reader puts
it back between the parts.

Record payload: ``IRHeader`` packed as ``<IfQQ`` (flag, label, id, id2); when ``flag > 0`` the
label is a vector of ``flag`` float32 values that follows the header. Then the encoded image.

The ``.idx`` file holds text lines ``key<TAB>offset``. When it is missing, :class:`IndexedRecordIO`
rebuilds the index by scanning the ``.rec`` (keys are then the record numbers 0, 1, 2, ...,
which is how InsightFace and ``im2rec`` number their records) and warns.

InsightFace layout (``train.rec``/``train.idx``/``property`` in one folder): key 0 is a header
record with ``flag > 0`` whose labels are ``(first identity-record key, end key)``; images are at
keys ``1 .. label[0]-1``; identity records ``label[0] .. label[1]-1`` each hold the image key
range ``[start, end)`` of one identity and an empty payload. Datasets without that header
(flag 0 at key 0) are read as "every key is an image". ``property`` holds
``num_classes,height,width``.
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
from typing import NamedTuple

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)
_FLOAT32_EXACT = 1 << 24  # every integer up to here is exact in float32 (IRHeader labels are float32)

__all__ = [
    "MAGIC",
    "RecordIOError",
    "IRHeader",
    "pack_record",
    "unpack_record",
    "RecordIOWriter",
    "IndexedRecordIO",
    "InsightFaceRec",
    "read_property",
    "write_property",
    "read_index",
    "scan_record_offsets",
    "image_format",
    "check_image_payload",
    "decode_image",
]


class RecordIOError(ValueError):
    """A .rec/.idx/property file is malformed; the message names the file and the key."""


class IRHeader(NamedTuple):
    """Image record header: ``flag`` (0, or number of float labels), ``label``, ``id``, ``id2``."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_record(header: IRHeader, payload: bytes) -> bytes:
    """Pack an :class:`IRHeader` and a payload into record bytes (without RecordIO framing).

    A scalar ``label`` is stored in the header (flag 0); a sequence is stored as ``flag``
    float32 values after the header.
    """
    label = header.label
    if np.ndim(label) == 0:
        head = struct.pack(_IR_FORMAT, 0, float(label), int(header.id), int(header.id2))
        return head + bytes(payload)
    vector = np.asarray(label, dtype="<f4").ravel()
    if vector.size == 0:
        raise ValueError("IRHeader.label must be a number or a non-empty sequence")
    head = struct.pack(_IR_FORMAT, vector.size, 0.0, int(header.id), int(header.id2))
    return head + vector.tobytes() + bytes(payload)


def unpack_record(record: bytes) -> tuple[IRHeader, bytes]:
    """Split record bytes into its :class:`IRHeader` and the remaining payload."""
    if len(record) < _IR_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {_IR_SIZE}-byte IRHeader")
    flag, label, id1, id2 = struct.unpack_from(_IR_FORMAT, record, 0)
    if flag > 0:
        end = _IR_SIZE + 4 * flag
        if len(record) < end:
            raise RecordIOError(f"record declares {flag} float labels but holds only {len(record)} bytes")
        vector = np.frombuffer(record, dtype="<f4", count=flag, offset=_IR_SIZE).astype(np.float32)
        return IRHeader(flag, vector, id1, id2), bytes(record[end:])
    return IRHeader(flag, label, id1, id2), bytes(record[_IR_SIZE:])


def _aligned_magic_positions(data: bytes) -> np.ndarray:
    words = np.frombuffer(data, dtype="<u4", count=len(data) // 4)
    return np.flatnonzero(words == MAGIC) * 4


class RecordIOWriter:
    """Sequential writer of a ``.rec`` file and its ``.idx`` (``key<TAB>offset`` lines).

    Usable as a context manager. Payloads containing the magic word are split into
    cflag 1/2/3 parts exactly as MXNet's writer does.
    """

    def __init__(self, rec_path: str, idx_path: str):
        self.rec_path = str(rec_path)
        self.idx_path = str(idx_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w")
        self._offsets: dict[int, tuple[int, int]] = {}

    @staticmethod
    def frame(record: bytes) -> bytes:
        """Return the framed on-disk bytes of one record (magic, lrec, parts, padding)."""
        record = bytes(record)
        if len(record) > _LEN_MASK:
            raise ValueError(f"record of {len(record)} bytes exceeds the RecordIO limit of {_LEN_MASK}")
        chunks = []
        start = 0
        for pos in _aligned_magic_positions(record):
            cflag = 1 if start == 0 else 2
            chunks.append((cflag, record[start:pos]))
            start = int(pos) + 4
        chunks.append((3 if start > 0 else 0, record[start:]))
        out = bytearray()
        for cflag, part in chunks:
            out += _MAGIC_BYTES + struct.pack("<I", (cflag << 29) | len(part)) + part
            out += b"\x00" * (-len(part) % 4)
        return bytes(out)

    def write(self, key: int, record: bytes) -> None:
        """Append one record under ``key`` (an int) and index it."""
        key = int(key)
        if key in self._offsets:
            raise ValueError(f"{self.rec_path}: key {key} written twice")
        framed = self.frame(record)
        offset = self._rec.tell()
        self._rec.write(framed)
        self._idx.write(f"{key}\t{offset}\n")
        self._offsets[key] = (offset, len(framed))

    def overwrite(self, key: int, record: bytes) -> None:
        """Replace an already written record by one with the same framed length."""
        offset, length = self._offsets[int(key)]
        framed = self.frame(record)
        if len(framed) != length:
            raise ValueError(f"{self.rec_path}: replacement for key {key} has a different length")
        end = self._rec.tell()
        self._rec.seek(offset)
        self._rec.write(framed)
        self._rec.seek(end)

    def close(self) -> None:
        if not self._rec.closed:
            self._rec.close()
            self._idx.close()

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_IDX_CHUNK = 1 << 24  # bytes of .idx text parsed at a time
_IDX_BYTE_CLASS = np.full(256, 3, dtype=np.uint8)  # 0 digit or sign, 1 blank, 2 newline, 3 anything else
_IDX_BYTE_CLASS[np.frombuffer(b"0123456789-", dtype=np.uint8)] = 0
_IDX_BYTE_CLASS[np.frombuffer(b"\t\r ", dtype=np.uint8)] = 1
_IDX_BYTE_CLASS[10] = 2


def _bad_idx_line(chunk: bytes, idx_path: str, first_line: int) -> RecordIOError | None:
    """The error for the first line of ``chunk`` that is not ``key<whitespace>offset`` (None if all are)."""
    kind = _IDX_BYTE_CLASS[np.frombuffer(chunk, dtype=np.uint8)]
    newline = kind == 2
    token = kind == 0
    starts = np.flatnonzero(token & ~np.r_[False, token[:-1]])  # where each number begins
    breaks = np.flatnonzero(newline)
    per_line = np.bincount(np.searchsorted(breaks, starts), minlength=len(breaks) + 1)
    bad = [int(i) for i in (np.flatnonzero((per_line != 0) & (per_line != 2))[:1])]
    other = np.flatnonzero(kind == 3)[:1]
    if other.size:
        bad.append(int(np.searchsorted(breaks, other[0])))
    if not bad:
        return None
    line = min(bad)
    text = chunk.split(b"\n")[line].decode("utf-8", "replace").strip()
    return RecordIOError(f"{idx_path}:{first_line + line}: expected 'key<TAB>offset', got {text!r}")


def read_index(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse an ``.idx`` file into (keys, offsets) int64 arrays, in file order.

    Streams the file in chunks of 16 MiB, parsed by numpy: memory is the two arrays plus one chunk,
    not a Python object per line. A malformed line raises :class:`RecordIOError` naming its number.
    """
    keys, offsets = [], []
    line = 1
    with open(idx_path, "rb") as f:
        tail = b""
        while True:
            block = f.read(_IDX_CHUNK)
            data = tail + block
            cut = len(data) if not block else data.rfind(b"\n") + 1
            chunk, tail = data[:cut], data[cut:]
            if chunk.strip():
                error = _bad_idx_line(chunk, idx_path, line)
                if error is not None:
                    raise error
                values = np.fromstring(chunk.decode("ascii"), dtype=np.int64, sep=" ")
                keys.append(values[0::2])
                offsets.append(values[1::2])
            line += chunk.count(b"\n")
            if not block:
                break
    if not keys:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(keys), np.concatenate(offsets)


def scan_record_offsets(rec_path: str) -> np.ndarray:
    """Offsets of every record start (cflag 0 or 1) in a ``.rec``, found by walking the frames."""
    size = os.path.getsize(rec_path)
    offsets = []
    with open(rec_path, "rb") as f:
        if size == 0:
            return np.zeros(0, dtype=np.int64)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            pos = 0
            while pos < size:
                if pos + 8 > size:
                    raise RecordIOError(f"{rec_path}: truncated frame header at offset {pos}")
                magic, lrec = struct.unpack_from("<II", mm, pos)
                if magic != MAGIC:
                    raise RecordIOError(f"{rec_path}: wrong magic 0x{magic:08x} at offset {pos}")
                cflag, length = lrec >> 29, lrec & _LEN_MASK
                if cflag in (0, 1):
                    offsets.append(pos)
                pos += 8 + length + (-length % 4)
                if pos > size:
                    raise RecordIOError(f"{rec_path}: record at offset {offsets[-1] if offsets else 0} is truncated")
        finally:
            mm.close()
    return np.asarray(offsets, dtype=np.int64)


def _gather(buf: np.ndarray, offsets: np.ndarray, width: int, chunk: int = 1 << 18) -> np.ndarray:
    """(len(offsets), width) uint8 rows ``buf[o:o+width]``, gathered in bounded-memory chunks."""
    out = np.empty((len(offsets), width), dtype=np.uint8)
    span = np.arange(width)
    for start in range(0, len(offsets), chunk):
        out[start : start + chunk] = buf[offsets[start : start + chunk, None] + span]
    return out


class IndexedRecordIO:
    """Random access to the records of a ``.rec`` through its ``.idx`` (the .rec is memory-mapped).

    ``idx_path`` defaults to the ``.rec`` path with an ``.idx`` suffix. A missing index is rebuilt
    in memory by scanning the .rec (keys = record numbers) with a warning, unless
    ``rebuild_missing_index=False``, which raises :class:`FileNotFoundError` instead.
    Offsets, magic words and lengths of all indexed records are checked when opening.
    The object can be pickled (e.g. into DataLoader workers); the map is reopened lazily.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None, *, rebuild_missing_index: bool = True):
        self.rec_path = str(rec_path)
        if not os.path.isfile(self.rec_path):
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        self.idx_path = str(idx_path) if idx_path is not None else os.path.splitext(self.rec_path)[0] + ".idx"
        self._size = os.path.getsize(self.rec_path)
        if os.path.isfile(self.idx_path):
            keys, offsets = read_index(self.idx_path)
            if len(keys) == 0 and self._size > 0:
                raise RecordIOError(
                    f"{self.idx_path} lists no records but {self.rec_path} holds {self._size} bytes: the index is "
                    "empty or truncated (delete it to rebuild it by scanning the .rec)"
                )
        elif rebuild_missing_index:
            warnings.warn(f"{self.idx_path} is missing; rebuilding the index by scanning {self.rec_path}")
            offsets = scan_record_offsets(self.rec_path)
            keys = np.arange(len(offsets), dtype=np.int64)
        else:
            raise FileNotFoundError(f"RecordIO index not found: {self.idx_path} (for {self.rec_path})")
        self._keys = keys
        self._offsets = offsets
        if np.all(keys[1:] > keys[:-1]):  # the usual .idx: keys in increasing order, nothing more to keep
            self._order, self._sorted_keys = None, keys
        else:
            self._order = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[self._order]
            duplicate = np.flatnonzero(np.diff(self._sorted_keys) == 0)
            if duplicate.size:
                raise RecordIOError(f"{self.idx_path}: key {int(self._sorted_keys[duplicate[0]])} appears twice")
        self._mm: mmap.mmap | None = None
        self._file = None
        self._validate()

    # -- mapping -------------------------------------------------------------------------------
    def _map(self) -> mmap.mmap:
        if self._mm is None:
            self._file = open(self.rec_path, "rb")
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self._size else b""
        return self._mm

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mm"] = None
        state["_file"] = None
        return state

    def _validate(self) -> None:
        offsets, keys = self._offsets, self._keys
        if len(offsets) == 0:
            return
        bad = np.flatnonzero((offsets < 0) | (offsets + 8 > self._size))
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(
                f"{self.idx_path}: offset {int(offsets[i])} of key {int(keys[i])} lies past the end of "
                f"{self.rec_path} ({self._size} bytes)"
            )
        buf = np.frombuffer(self._map(), dtype=np.uint8)
        frame = _gather(buf, offsets, 8).view("<u4")
        magic, lrec = frame[:, 0], frame[:, 1]
        bad = np.flatnonzero(magic != MAGIC)
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(
                f"{self.rec_path}: wrong magic 0x{int(magic[i]):08x} at offset {int(offsets[i])} (key {int(keys[i])})"
            )
        lengths = (lrec & _LEN_MASK).astype(np.int64)
        bad = np.flatnonzero(offsets + 8 + lengths > self._size)
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(
                f"{self.rec_path}: record of key {int(keys[i])} at offset {int(offsets[i])} is truncated "
                f"({int(lengths[i])} bytes declared, file has {self._size} bytes)"
            )
        cflags = lrec >> 29
        bad = np.flatnonzero((cflags != 0) & (cflags != 1))
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(
                f"{self.idx_path}: key {int(keys[i])} points into the middle of a split record (cflag {int(cflags[i])})"
            )

    def frames(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(whole, length) of the records at ``rows``: whether each is stored unsplit, and its first
        part's length (read from the .rec, nothing per record is kept in memory)."""
        frame = _gather(np.frombuffer(self._map(), dtype=np.uint8), self._offsets[rows], 8).view("<u4")
        return (frame[:, 1] >> 29) == 0, (frame[:, 1] & _LEN_MASK).astype(np.int64)

    # -- access --------------------------------------------------------------------------------
    @property
    def keys(self) -> list[int]:
        return self._keys.tolist()

    @property
    def key_array(self) -> np.ndarray:
        return self._keys

    @property
    def offset_array(self) -> np.ndarray:
        return self._offsets

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: int) -> bool:
        return self._row(int(key)) is not None

    def _rows(self, keys: np.ndarray) -> np.ndarray:
        """Rows (positions in the .idx) of ``keys``; -1 where a key is absent."""
        keys = np.asarray(keys, dtype=np.int64)
        if len(self._sorted_keys) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        where = np.searchsorted(self._sorted_keys, keys).clip(0, len(self._sorted_keys) - 1)
        rows = where if self._order is None else self._order[where]
        return np.where(self._sorted_keys[where] == keys, rows, -1)

    def _row(self, key: int) -> int | None:
        row = int(self._rows(np.array([key]))[0])
        return None if row < 0 else row

    def read(self, key: int) -> bytes:
        """Record bytes (IRHeader included) stored under ``key``; split records are joined."""
        row = self._row(int(key))
        if row is None:
            raise KeyError(f"{self.rec_path}: no record with key {key}")
        return self._read_at(int(self._offsets[row]), key)

    def _read_at(self, offset: int, key: int) -> bytes:
        mm = self._map()
        parts = []
        pos = offset
        while True:
            if pos + 8 > self._size:
                raise RecordIOError(f"{self.rec_path}: record of key {key} is truncated at offset {pos}")
            magic, lrec = struct.unpack_from("<II", mm, pos)
            if magic != MAGIC:
                raise RecordIOError(f"{self.rec_path}: wrong magic 0x{magic:08x} at offset {pos} (key {key})")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if pos + 8 + length > self._size:
                raise RecordIOError(f"{self.rec_path}: record of key {key} is truncated at offset {pos}")
            expected = (0, 1) if pos == offset else (2, 3)
            if cflag not in expected:
                raise RecordIOError(f"{self.rec_path}: unexpected cflag {cflag} at offset {pos} (key {key})")
            parts.append(mm[pos + 8 : pos + 8 + length])
            if cflag in (0, 3):
                break
            parts.append(_MAGIC_BYTES)
            pos += 8 + length + (-length % 4)
        return b"".join(parts)

    def read_headers(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised (flag, first label) of the records under ``keys`` (int64 / float32 arrays)."""
        keys = np.asarray(keys, dtype=np.int64)
        flags = np.zeros(len(keys), dtype=np.int64)
        labels = np.zeros(len(keys), dtype=np.float32)
        if len(keys) == 0:
            return flags, labels
        rows = self._rows(keys)
        absent = np.flatnonzero(rows < 0)
        if absent.size:
            raise KeyError(f"{self.rec_path}: no record with key {int(keys[absent[0]])}")
        offsets = self._offsets[rows]
        whole, lengths = self.frames(rows)
        fast = whole & (lengths >= _IR_SIZE + 4)
        buf = np.frombuffer(self._map(), dtype=np.uint8)
        if fast.any():
            raw = _gather(buf, offsets[fast] + 8, _IR_SIZE + 4)
            f = raw[:, 0:4].copy().view("<u4")[:, 0].astype(np.int64)
            scalar = raw[:, 4:8].copy().view("<f4")[:, 0]
            first = raw[:, _IR_SIZE : _IR_SIZE + 4].copy().view("<f4")[:, 0]
            flags[fast] = f
            labels[fast] = np.where(f > 0, first, scalar)
        for i in np.flatnonzero(~fast):
            header, _ = self._unpack(int(keys[i]))
            flags[i] = header.flag
            labels[i] = header.label[0] if header.flag > 0 else header.label
        return flags, labels

    def _unpack(self, key: int) -> tuple[IRHeader, bytes]:
        try:
            return unpack_record(self.read(key))
        except RecordIOError as err:
            raise RecordIOError(f"{self.rec_path}: key {key}: {err}") from None

    def close(self) -> None:
        if self._mm is not None and not isinstance(self._mm, bytes):
            self._mm.close()
        if self._file is not None:
            self._file.close()
        self._mm = None
        self._file = None

    def __enter__(self) -> "IndexedRecordIO":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_property(path: str) -> tuple[int, int, int]:
    """Parse an InsightFace ``property`` file: ``num_classes,height,width``."""
    with open(path) as f:
        text = f.read().strip()
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise RecordIOError(f"{path}: expected 'num_classes,height,width', got {text!r}") from None
    if len(values) != 3 or min(values) <= 0:
        raise RecordIOError(f"{path}: expected three positive integers 'num_classes,height,width', got {text!r}")
    return values[0], values[1], values[2]


def write_property(path: str, num_classes: int, height: int, width: int) -> None:
    """Write an InsightFace ``property`` file."""
    with open(path, "w") as f:
        f.write(f"{int(num_classes)},{int(height)},{int(width)}")


class InsightFaceRec:
    """An InsightFace-layout dataset folder: ``train.rec``, ``train.idx`` and optionally ``property``.

    Attributes: ``image_keys`` (int64), ``labels`` (int64, aligned with ``image_keys``),
    ``num_classes`` (from ``property``, else ``max(label)+1``), ``image_size`` ((H, W) from
    ``property`` or None), ``identity_ranges`` ((C, 2) int64 image-key ranges ``[start, end)``
    from the identity records, or None for headerless datasets) and ``has_header``.

    Labels come from the identity records when the dataset has them (no image header is read
    besides a spot check of up to 1,024 evenly spread images), else from every image header, read
    once in blocks and cached beside the ``.rec`` (:mod:`label_cache`); ``label_source`` says which.
    The identity records must tile the image keys in order; labels must fit the class count.
    """

    def __init__(self, root_dir: str, *, rec_name: str = "train"):
        self.root_dir = str(root_dir)
        rec_path = os.path.join(self.root_dir, rec_name + ".rec")
        idx_path = os.path.join(self.root_dir, rec_name + ".idx")
        self.record_io = IndexedRecordIO(rec_path, idx_path)
        self.rec_path = rec_path
        prop_path = os.path.join(self.root_dir, "property")
        self.property_path = prop_path if os.path.isfile(prop_path) else None
        prop = read_property(prop_path) if self.property_path else None
        self.image_size = (prop[1], prop[2]) if prop else None

        self.identity_ranges: np.ndarray | None = None
        self.has_header = False
        if 0 in self.record_io:
            header, _ = self.record_io._unpack(0)
            if header.flag > 0:
                self.has_header = True
                if header.flag < 2:
                    raise RecordIOError(f"{rec_path}: header record (key 0) needs two labels, has {header.flag}")
                first_id, end_id = self._exact_header_keys(float(header.label[0]), float(header.label[1]))
                if not 1 <= first_id <= end_id:
                    raise RecordIOError(f"{rec_path}: header record (key 0) has invalid range {first_id}..{end_id}")
                self.image_keys = np.arange(1, first_id, dtype=np.int64)
                self.identity_ranges = self._read_identity_ranges(first_id, end_id)
        if not self.has_header:
            self.image_keys = np.sort(self.record_io.key_array)
        missing = self.image_keys[self.record_io._rows(self.image_keys) < 0]
        if missing.size:
            raise RecordIOError(f"{idx_path}: image key {int(missing[0])} announced by the header is not indexed")
        if len(self.image_keys) == 0:
            raise RecordIOError(f"{rec_path}: the dataset holds no images ({len(self.record_io)} records indexed in {idx_path})")
        self.label_source = "image headers"
        if self.identity_ranges is not None:
            if int(self.image_keys[-1]) < _FLOAT32_EXACT:
                self._check_identity_tiling()
                self.labels = np.repeat(np.arange(len(self.identity_ranges), dtype=np.int64),
                                        self.identity_ranges[:, 1] - self.identity_ranges[:, 0])
                self.label_source = "identity records"
                self._spot_check_labels()
            else:  # float32 key ranges are rounded beyond 2**24: labels from the images, exact ranges from them
                self.labels = self._labels_from_headers(rec_name)
                self.identity_ranges = self._exact_ranges_from_labels(self.identity_ranges)
        else:
            self.labels = self._labels_from_headers(rec_name)
        labels = self.labels
        if prop:
            self.num_classes = prop[0]
            bad = np.flatnonzero(labels >= self.num_classes)
            if bad.size:
                i = int(bad[0])
                raise RecordIOError(
                    f"{rec_path}: key {int(self.image_keys[i])} has label {int(labels[i])} outside the "
                    f"{self.num_classes} classes declared in {prop_path}"
                )
        else:
            self.num_classes = int(labels.max()) + 1

    def _exact_header_keys(self, first: float, end: float) -> tuple[int, int]:
        """The header's (first identity-record key, end key), exact: float32 rounds keys beyond 2**24,
        so there the first identity record (the one whose range starts at key 1) is looked up around
        the rounded value, and the end is where the indexed keys stop."""
        first_id, end_id = int(first), int(end)
        if end_id < _FLOAT32_EXACT:
            return first_id, end_id
        io = self.record_io
        if first_id >= _FLOAT32_EXACT:
            ulp = int(np.spacing(np.float32(first)))
            around = np.arange(first_id - ulp, first_id + ulp + 1, dtype=np.int64)
            around = around[io._rows(around) >= 0]
            flags, labels = io.read_headers(around)
            hits = around[(flags >= 2) & (labels == 1.0)]
            if hits.size == 0:
                raise RecordIOError(f"{self.rec_path}: header record (key 0) puts the first identity record at key "
                                    f"{first:.0f} (float32), but no record within {ulp} keys of it holds the range "
                                    "starting at key 1")
            first_id = int(hits[0])
        end_id = first_id + len(io._sorted_keys) - int(np.searchsorted(io._sorted_keys, first_id))
        if np.float32(end_id) != np.float32(end):
            raise RecordIOError(f"{self.rec_path}: header record (key 0) says the identity records end at key "
                                f"{end:.0f} (float32), but {io.idx_path} indexes keys up to {end_id - 1}")
        return first_id, end_id

    def _exact_ranges_from_labels(self, rounded: np.ndarray) -> np.ndarray:
        """Exact image-key ranges per identity from the image labels (grouped by identity in key order),
        checked against the identity records' float32 ranges, which must equal them once rounded."""
        labels, first_id = self.labels, int(self.image_keys[-1]) + 1
        bad = np.flatnonzero(labels[1:] < labels[:-1])
        if bad.size:
            i = int(bad[0]) + 1
            raise RecordIOError(f"{self.rec_path}: key {int(self.image_keys[i])} has label {int(labels[i])} after "
                                f"label {int(labels[i - 1])}: with identity records, images must be grouped by identity")
        if len(labels) and labels[-1] >= len(rounded):
            raise RecordIOError(f"{self.rec_path}: label {int(labels[-1])} has no identity record "
                                f"(keys {first_id}..{first_id + len(rounded) - 1} hold {len(rounded)})")
        ends = np.cumsum(np.bincount(labels, minlength=len(rounded))) + 1
        exact = np.stack([np.r_[1, ends[:-1]], ends], axis=1)
        bad = np.flatnonzero((exact.astype(np.float32) != rounded.astype(np.float32)).any(axis=1))
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(
                f"{self.rec_path}: identity record key {first_id + i} holds the range {int(rounded[i, 0])}.."
                f"{int(rounded[i, 1])}, but the labels of the images put identity {i} at keys "
                f"{int(exact[i, 0])}..{int(exact[i, 1])}")
        return exact

    def _read_identity_ranges(self, first_id: int, end_id: int) -> np.ndarray:
        """(C, 2) key ranges of the identity records ``first_id .. end_id - 1``, read vectorised."""
        io = self.record_io
        keys = np.arange(first_id, end_id, dtype=np.int64)
        rows = io._rows(keys)
        absent = np.flatnonzero(rows < 0)
        if absent.size:
            raise RecordIOError(f"{io.idx_path}: identity record key {int(keys[absent[0]])} announced by the header is not indexed")
        ranges = np.zeros((len(keys), 2), dtype=np.int64)
        whole, lengths = io.frames(rows)
        fast = whole & (lengths >= _IR_SIZE + 8)
        if fast.any():
            raw = _gather(np.frombuffer(io._map(), dtype=np.uint8), io._offsets[rows[fast]] + 8, _IR_SIZE + 8)
            flags = raw[:, 0:4].copy().view("<u4")[:, 0]
            bounds = raw[:, _IR_SIZE:_IR_SIZE + 8].copy().view("<f4")
            short = np.flatnonzero(flags < 2)
            if short.size:
                key = int(keys[np.flatnonzero(fast)[short[0]]])
                raise RecordIOError(f"{io.rec_path}: identity record key {key} has no key range label")
            ranges[fast] = bounds.astype(np.int64)
        for row in np.flatnonzero(~fast):
            header, _ = io._unpack(int(keys[row]))
            if header.flag < 2:
                raise RecordIOError(f"{io.rec_path}: identity record key {int(keys[row])} has no key range label")
            ranges[row] = int(header.label[0]), int(header.label[1])
        return ranges

    def _labels_from_headers(self, rec_name: str) -> np.ndarray:
        """Labels read from every image header, cached beside the .rec (see :mod:`label_cache`)."""
        from .label_cache import cached_labels

        return cached_labels(self, rec_name, self._read_header_labels)

    def _read_header_labels(self) -> np.ndarray:
        """Every image's label from its record header, in blocks (bounded temporaries)."""
        labels = np.empty(len(self.image_keys), dtype=np.int64)
        block = 1 << 20
        for lo in range(0, len(labels), block):
            keys = self.image_keys[lo:lo + block]
            _, raw = self.record_io.read_headers(keys)
            values = raw.astype(np.int64)
            bad = np.flatnonzero((values != raw) | (values < 0))
            if bad.size:
                i = int(bad[0])
                raise RecordIOError(f"{self.rec_path}: key {int(keys[i])} has invalid label {float(raw[i])}")
            labels[lo:lo + len(keys)] = values
        return labels

    def _spot_check_labels(self, samples: int = 1024) -> None:
        """Compare the labels of up to ``samples`` evenly spread image headers with the identity ranges."""
        positions = np.unique(np.linspace(0, len(self.image_keys) - 1, min(samples, len(self.image_keys))).astype(np.int64))
        _, raw = self.record_io.read_headers(self.image_keys[positions])
        bad = np.flatnonzero(raw != self.labels[positions])
        if bad.size:
            i = int(positions[bad[0]])
            first_id = int(self.image_keys[-1]) + 1
            raise RecordIOError(
                f"{self.rec_path}: image key {int(self.image_keys[i])} has label {float(raw[bad[0]]):g} but lies in the "
                f"range of identity {int(self.labels[i])} (identity record key {first_id + int(self.labels[i])})"
            )

    def _check_identity_tiling(self) -> None:
        """The identity records tile the image keys ``1..N`` in order (no gap, no overlap, none inverted)."""
        ranges, rec = self.identity_ranges, self.rec_path
        first_id = int(self.image_keys[-1]) + 1
        where = f"{rec}: header record (key 0) says images end at key {first_id - 1}"
        if len(ranges) == 0:
            raise RecordIOError(f"{where} but announces no identity records")
        starts, ends = ranges[:, 0], ranges[:, 1]
        bad = np.flatnonzero(ends < starts)
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(f"{rec}: identity record key {first_id + i} has the inverted range {int(starts[i])}..{int(ends[i])}")
        gaps = np.flatnonzero(starts[1:] != ends[:-1])
        if starts[0] != 1 or ends[-1] != first_id or gaps.size:
            i = int(gaps[0]) + 1 if gaps.size else (0 if starts[0] != 1 else len(ranges) - 1)
            raise RecordIOError(
                f"{where}, but identity record key {first_id + i} holds the range {int(starts[i])}..{int(ends[i])}: "
                "the identity records do not tile keys 1.."
                f"{first_id - 1} in order (is the header's first identity-record key off by one?)"
            )

    def __len__(self) -> int:
        return len(self.image_keys)

    def read_record(self, key: int) -> tuple[IRHeader, bytes]:
        """IRHeader and encoded image bytes of one record."""
        return self.record_io._unpack(int(key))

    def where(self, key: int) -> str:
        """``"<rec path>: key <key>"``, for error messages."""
        return f"{self.rec_path}: key {int(key)}"

    def read_image_bytes(self, key: int) -> bytes:
        """Encoded image bytes stored under ``key``."""
        return self.read_record(key)[1]

    def read_image(self, key: int) -> np.ndarray:
        """Decoded RGB uint8 image (H, W, 3) under ``key``; raises RecordIOError if not an image."""
        return decode_image(self.read_image_bytes(key), f"{self.rec_path}: key {key}")

    def close(self) -> None:
        self.record_io.close()


_IMAGE_SIGNATURES = (
    (0, b"\xff\xd8\xff", "jpeg"),
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"BM", "bmp"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (8, b"WEBP", "webp"),
    (0, b"\x00\x00\x00\x0cjP  ", "jpeg2000"),
    (0, b"\xff\x4f\xff\x51", "jpeg2000"),
)


def image_format(data: bytes) -> str | None:
    """Name of the image format recognised from the leading bytes of ``data``, or None."""
    head = bytes(data[:16])
    for offset, signature, name in _IMAGE_SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return name
    return None


def check_image_payload(data: bytes, where: str) -> bytes:
    """Return ``data`` if it starts like an encoded image, else raise RecordIOError naming ``where``."""
    if image_format(data) is None:
        raise RecordIOError(f"{where}: payload of {len(data)} bytes is not an encoded image (unknown signature {bytes(data[:4])!r})")
    return data


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Decode encoded bytes into RGB uint8 (H, W, 3) with OpenCV; ``where`` names the source in errors."""
    import cv2

    array = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(array, cv2.IMREAD_COLOR) if array.size else None
    if image is None:
        raise RecordIOError(f"{where}: payload of {len(data)} bytes is not a decodable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
