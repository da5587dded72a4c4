"""Resume on another world size from memory-mapped checkpoints: the same state as whole files, bounded memory.

The references are computed here from the old files read whole: Partial FC's centres (and their
momentum buffers) concatenated in rank order and sliced, the memory heads' slots gathered from all
shards and chosen and ordered as the merge rule says (newest first, then (write step, class)).
"""
import ctypes
import gc
import json
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from protomem_plugin.distributed import contiguous_shard
from protomem_plugin.train.checkpoint import CHECKPOINT_KEYS, CheckpointError, load_training_checkpoint
from protomem_plugin.train.config import get_config
from protomem_plugin.train.resume import _old_world_size, load_resume_state
from protomem_plugin.train.runtime import Runtime
from protomem_plugin.train.trainer import build_setup, train
from train_helpers import write_config

CPU = torch.device("cpu")
# memory_size 40 < 60 classes: slots are evicted, and a 1 -> 2 resume must drop the oldest of a shard's classes
HEADS = {"partial_fc": dict(head="partial_fc", sample_rate=1.0),
         "prototype_memory": dict(head="prototype_memory", memory_size=40)}
MiB = 2**20


def job(tmp_path, name, rec, head, batch_size, output, **kw):
    options = dict(rec=str(rec), batch_size=batch_size, output=str(output), val_targets=[], max_steps=6,
                   save_every_steps=6, **HEADS[head])
    return write_config(tmp_path / name, "job", **{**options, **kw})


def train_worker(rank, world_size, config_path):
    train(get_config(config_path), Runtime(rank, world_size, 0, CPU))


def mapped_files(directory) -> list[str]:
    """Lines of /proc/self/maps naming a file of ``directory``: memory-mapped files still alive."""
    gc.collect()
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(directory) in line]


def resume(config_path, output, rank, world_size, mmap=True):
    cfg = get_config(config_path)
    cfg.update(output=str(output), resume=True)
    setup = build_setup(cfg, Runtime(rank, world_size, 0, CPU))
    extra = load_resume_state(str(output), setup.runtime, setup.backbone, setup.head, setup.optimizer,
                              setup.scheduler, setup.loader, mmap=mmap)
    return setup, extra


def resumed_state(setup) -> dict:
    return {"head": setup.head.state_dict(), "backbone": setup.backbone.state_dict(),
            "optimizer": setup.optimizer.state_dict()}


def resume_worker(rank, world_size, config_path, output, dump):
    setup, extra = resume(config_path, output, rank, world_size)
    torch.save({**resumed_state(setup), "mapped": mapped_files(output), "global_step": extra["global_step"]},
               f"{dump}/rank{rank}.pt")


def read_whole(output, world_size):
    return [torch.load(Path(output) / f"checkpoint_gpu_{r}.pt", weights_only=True) for r in range(world_size)]


def reference(head, old, rank, world_size) -> dict:
    """This rank's head state and head-parameter optimizer state, from the old files read whole."""
    heads = [s["state_dict_softmax_fc"] for s in old]
    if head == "partial_fc":
        start, count = contiguous_shard(int(sum(h["weight"].shape[0] for h in heads)), rank, world_size)
        rows = slice(start, start + count)
        momentum = [s["state_optimizer"]["state"][s["state_optimizer"]["param_groups"][1]["params"][0]] for s in old]
        return {"head": {"weight": torch.cat([h["weight"] for h in heads])[rows],
                         "last_update_step": torch.cat([h["last_update_step"] for h in heads])[rows],
                         "step": heads[0]["step"]},
                "head_momentum": torch.cat([m["momentum_buffer"] for m in momentum])[rows]}
    slots = heads[0]["memory"].shape[0] * len(heads) // world_size
    stored = [(int(h["slot_step"][i]), int(c), h["memory"][i]) for h in heads
              for i, c in enumerate(h["slot_class"].tolist()) if c >= 0 and c % world_size == rank]
    kept = sorted(sorted(stored, key=lambda t: (-t[0], t[1]))[:slots], key=lambda t: (t[0], t[1]))
    memory = torch.zeros(slots, heads[0]["memory"].shape[1], dtype=heads[0]["memory"].dtype)
    memory[: len(kept)] = torch.stack([m for _, _, m in kept])
    pad = [-1] * (slots - len(kept))
    return {"head": {"memory": memory, "slot_class": torch.tensor([c for _, c, _ in kept] + pad),
                     "slot_step": torch.tensor([s for s, _, _ in kept] + pad), "step": heads[0]["step"]}}


def assert_resumed_like_reference(got, head, old, rank, world_size):
    ref = reference(head, old, rank, world_size)
    for key, value in ref["head"].items():
        assert torch.equal(got["head"][key], value), key
    source = old[min(rank, len(old) - 1)]
    for key, value in source["state_dict_backbone"].items():
        assert torch.equal(got["backbone"][key], value), key
    saved, loaded = source["state_optimizer"], got["optimizer"]
    assert loaded["param_groups"] == saved["param_groups"]
    head_params = set(saved["param_groups"][1]["params"])
    assert set(loaded["state"]) == set(saved["state"])
    for pid, entry in loaded["state"].items():
        if pid in head_params:
            assert torch.equal(entry["momentum_buffer"], ref["head_momentum"])
        else:
            assert torch.equal(entry["momentum_buffer"], saved["state"][pid]["momentum_buffer"]), pid
    assert bool(head_params) == (head == "partial_fc")


@pytest.mark.parametrize("head", list(HEADS))
def test_two_ranks_resumed_on_one_from_mapped_files(tmp_path, tiny_rec, head):
    output = tmp_path / "out"
    run_distributed(train_worker, 2, str(job(tmp_path, "c2", tiny_rec, head, 8, output)))
    old = read_whole(output, 2)
    assert old[0]["protomem"]["world_size"] == 2
    config = job(tmp_path, "c1", tiny_rec, head, 16, output)
    setup, extra = resume(config, output, 0, 1)
    assert mapped_files(output) == []  # nothing loaded keeps a file mapped, the returned state included
    assert extra["global_step"] == 6 and extra["world_size"] == 2
    got = resumed_state(setup)
    assert_resumed_like_reference(got, head, old, 0, 1)
    whole, _ = resume(config, output, 0, 1, mmap=False)
    for part, values in resumed_state(whole).items():
        torch.testing.assert_close(got[part], values, rtol=0, atol=0)


@pytest.mark.parametrize("head", list(HEADS))
def test_one_rank_resumed_on_two_from_mapped_files(tmp_path, tiny_rec, head):
    output = tmp_path / "out"
    train(get_config(job(tmp_path, "c1", tiny_rec, head, 16, output)), Runtime(0, 1, 0, CPU))
    old = read_whole(output, 1)
    dump = tmp_path / "dump"
    dump.mkdir()
    run_distributed(resume_worker, 2, str(job(tmp_path, "c2", tiny_rec, head, 8, output)), str(output), str(dump))
    for rank in range(2):
        got = torch.load(dump / f"rank{rank}.pt", weights_only=True)
        assert got["mapped"] == [] and got["global_step"] == 6
        assert_resumed_like_reference(got, head, old, rank, 2)


def test_mapped_load_reads_legacy_files_and_names_corrupt_ones(tmp_path):
    state = {**{k: 0 for k in CHECKPOINT_KEYS}, "state_dict_softmax_fc": {"weight": torch.arange(6.0).view(3, 2)}}
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # cannot be mapped: read whole
    loaded = load_training_checkpoint(tmp_path / "legacy.pt", mmap=True)
    assert torch.equal(loaded["state_dict_softmax_fc"]["weight"], state["state_dict_softmax_fc"]["weight"])
    torch.save(state, tmp_path / "checkpoint_gpu_0.pt")
    data = (tmp_path / "checkpoint_gpu_0.pt").read_bytes()
    for broken in (data[: len(data) // 2], b"PK\x03\x04 and nothing else", b"not a checkpoint"):
        (tmp_path / "checkpoint_gpu_0.pt").write_bytes(broken)
        with pytest.raises(CheckpointError, match="checkpoint_gpu_0.pt"):
            load_training_checkpoint(tmp_path / "checkpoint_gpu_0.pt", mmap=True)


def test_old_world_size_from_the_metadata_or_for_arcface_torch_files_their_count(tmp_path):
    plain = {k: 0 for k in CHECKPOINT_KEYS}  # arcface_torch's own checkpoints have no protomem entry
    for rank in range(3):
        torch.save(plain, tmp_path / f"checkpoint_gpu_{rank}.pt")
    assert _old_world_size(tmp_path) == 3
    torch.save({**plain, "protomem": {"world_size": 2}}, tmp_path / "checkpoint_gpu_0.pt")  # a stale third file
    assert _old_world_size(tmp_path) == 2
    assert mapped_files(tmp_path) == []


# ----------------------------------------------------------------------------- peak host memory
# Partial FC with 1M classes x 48: 183 MiB of centres and as much of momentum buffers in the old files
BIG = dict(num_classes=1_000_000, embedding_size=48, sample_rate=0.1, max_steps=1, save_every_steps=1,
           deterministic=False)


def peak_rise_mib(fn) -> float:
    """How far the peak resident set (VmHWM) rose above the resident set while ``fn`` ran."""
    def status(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages leave the resident set
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    fn()
    return (status("VmHWM") - before) / 1024


def kept_mib(setup) -> float:
    """The rank's resumed state that comes from the files: head, optimizer and backbone tensors."""
    tensors = [*setup.head.state_dict().values(), *setup.backbone.state_dict().values(),
               *(v for s in setup.optimizer.state.values() for v in s.values())]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) / MiB


def measure_worker(rank, world_size, config_path, output, dump):
    cfg = get_config(config_path)
    cfg.update(output=str(output), resume=True)
    row = {"world_size_read": peak_rise_mib(lambda: _old_world_size(Path(output)))}
    for mmap in (False, True):
        setup = build_setup(cfg, Runtime(rank, world_size, 0, CPU))
        row[f"mmap={mmap}"] = peak_rise_mib(lambda: load_resume_state(
            str(output), setup.runtime, setup.backbone, setup.head, setup.optimizer, setup.scheduler, setup.loader,
            mmap=mmap))
        row["kept"] = kept_mib(setup)
        del setup
    Path(dump, f"rank{rank}.json").write_text(json.dumps(row))


def assert_bounded(rows, files_mib):
    for row in rows:
        assert row["world_size_read"] < 8, row  # the metadata of a file of about 190 MiB or more
        whole, mapped = row["mmap=False"], row["mmap=True"]
        # whole files cost at least the files read; mapped, about the state the rank keeps
        assert whole > files_mib, row
        assert mapped < 1.1 * row["kept"] + 16, row


def test_peak_memory_of_a_two_to_one_resume_is_what_the_rank_keeps(tmp_path, tiny_rec):
    output = tmp_path / "out"
    run_distributed(train_worker, 2, str(job(tmp_path, "c2", tiny_rec, "partial_fc", 8, output, **BIG)))
    files_mib = sum(f.stat().st_size for f in output.glob("checkpoint_gpu_*.pt")) / MiB
    dump = tmp_path / "dump"
    dump.mkdir()
    # a fresh process: in this one, memory freed by earlier tests could serve the loads without a rise
    run_distributed(measure_worker, 1, str(job(tmp_path, "c1", tiny_rec, "partial_fc", 16, output, **BIG)),
                    str(output), str(dump))
    row = json.loads((dump / "rank0.json").read_text())
    assert row["kept"] > 350  # centres and momentum of all classes
    assert_bounded([row], files_mib)
    assert row["mmap=True"] < 0.75 * row["mmap=False"], row


def test_peak_memory_of_a_one_to_two_resume_is_each_ranks_half(tmp_path, tiny_rec):
    output = tmp_path / "out"
    train(get_config(job(tmp_path, "c1", tiny_rec, "partial_fc", 16, output, **BIG)), Runtime(0, 1, 0, CPU))
    files_mib = (output / "checkpoint_gpu_0.pt").stat().st_size / MiB
    dump = tmp_path / "dump"
    dump.mkdir()
    run_distributed(measure_worker, 2, str(job(tmp_path, "c2", tiny_rec, "partial_fc", 8, output, **BIG)),
                    str(output), str(dump))
    rows = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(175 < row["kept"] < 0.6 * files_mib for row in rows), rows
    assert_bounded(rows, files_mib)
    assert all(row["mmap=True"] < 0.5 * row["mmap=False"] for row in rows), rows
