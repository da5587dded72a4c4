"""Data layer: mxnet-free RecordIO, identity-grouped sampling, DALI and PyTorch loaders,
validation .bin sets and the synthetic identity dataset."""

from .binsets import UnsafePickleError, load_bin, write_bin
from .loader import TrainLoader, build_train_loader
from .recordio import IndexedRecordIO, InsightFaceRec, IRHeader, RecordIOError, RecordIOWriter, pack_record, unpack_record
from .sampler import GroupedBatchSampler
from .synthetic import SyntheticFaces, make_synthetic_dataset

__all__ = [
    "IRHeader",
    "pack_record",
    "unpack_record",
    "RecordIOError",
    "RecordIOWriter",
    "IndexedRecordIO",
    "InsightFaceRec",
    "GroupedBatchSampler",
    "TrainLoader",
    "build_train_loader",
    "UnsafePickleError",
    "load_bin",
    "write_bin",
    "SyntheticFaces",
    "make_synthetic_dataset",
]
