"""Checkpoint I/O: arcface_torch format, atomic writes, clear errors."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from protomem_plugin.backbones import get_model
from protomem_plugin.train.checkpoint import (
    CHECKPOINT_KEYS, CheckpointError, atomic_torch_save, load_model_pt, load_training_checkpoint,
    save_model_pt, save_training_checkpoint,
)
from protomem_plugin.train.schedule import build_lr_scheduler

REPO = Path(__file__).resolve().parents[1]


def _training_state(seed=0):
    torch.manual_seed(seed)
    backbone, head = get_model("tiny", num_features=16), nn.Linear(16, 5, bias=False)
    opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}],
                          lr=0.1, momentum=0.9)
    sched = build_lr_scheduler(opt, 2, 10)
    return backbone, head, opt, sched


def _train_steps(backbone, head, opt, sched, n=3):
    torch.manual_seed(1)
    for _ in range(n):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
        nn.functional.cross_entropy(head(backbone(x)), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def _tmp_files(directory):
    return sorted(p.name for p in Path(directory).glob(".*.tmp"))


def test_training_checkpoint_round_trip(tmp_path):
    backbone, head, opt, sched = _training_state()
    _train_steps(backbone, head, opt, sched)
    memory = torch.randn(8, 16)
    path = save_training_checkpoint(tmp_path, 3, epoch=2, global_step=3, backbone=backbone, head=head,
                                    optimizer=opt, lr_scheduler=sched,
                                    extra={"protomem": {"memory": memory, "fill": 5}})
    assert path == tmp_path / "checkpoint_gpu_3.pt"
    assert _tmp_files(tmp_path) == []

    state = load_training_checkpoint(path)
    assert set(state) == set(CHECKPOINT_KEYS) | {"protomem"}
    assert (state["epoch"], state["global_step"]) == (2, 3)
    assert torch.equal(state["protomem"]["memory"], memory) and state["protomem"]["fill"] == 5

    b2, h2, o2, s2 = _training_state(seed=7)
    b2.load_state_dict(state["state_dict_backbone"], strict=True)
    h2.load_state_dict(state["state_dict_softmax_fc"], strict=True)
    o2.load_state_dict(state["state_optimizer"])
    s2.load_state_dict(state["state_lr_scheduler"])
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, b2.state_dict()[k]), k
    assert torch.equal(head.weight, h2.weight)
    assert s2.last_epoch == 3 and s2.get_last_lr() == sched.get_last_lr()
    # the resumed run takes exactly the same next step as the original
    _train_steps(backbone, head, opt, sched, n=1)
    _train_steps(b2, h2, o2, s2, n=1)
    assert torch.allclose(head.weight, h2.weight, atol=0, rtol=0)


def test_extra_keys_must_not_shadow_arcface_keys(tmp_path):
    backbone, head, opt, sched = _training_state()
    with pytest.raises(ValueError, match="state_optimizer"):
        save_training_checkpoint(tmp_path, 0, epoch=0, global_step=0, backbone=backbone, head=head,
                                 optimizer=opt, lr_scheduler=sched, extra={"state_optimizer": {}})
    assert not (tmp_path / "checkpoint_gpu_0.pt").exists()


def test_failed_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"version": 1, "w": torch.ones(10)}, path)

    def broken_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk went away"):
        atomic_torch_save({"version": 2, "w": torch.zeros(10)}, path)
    monkeypatch.undo()
    old = torch.load(path, weights_only=True)
    assert old["version"] == 1 and torch.equal(old["w"], torch.ones(10))
    assert _tmp_files(tmp_path) == []


def test_file_mode_follows_umask_like_plain_open(tmp_path):
    atomic_torch_save({"a": 1}, tmp_path / "a.pt")
    (tmp_path / "b.pt").write_bytes(b"")
    assert (tmp_path / "a.pt").stat().st_mode == (tmp_path / "b.pt").stat().st_mode


_WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from protomem_plugin.train.checkpoint import atomic_torch_save
n = int(sys.argv[3])
atomic_torch_save({"i": 0, "t": torch.zeros(n)}, sys.argv[1])
print("ready", flush=True)
i = 1
while True:
    atomic_torch_save({"i": i, "t": torch.full((n,), float(i))}, sys.argv[1])
    i += 1
"""


def test_sigkill_mid_write_leaves_a_complete_checkpoint(tmp_path):
    """Kill a writer looping over 32 MB saves; the target must always hold one whole save."""
    path = tmp_path / "ckpt.pt"
    killed_mid_write = False
    for attempt in range(10):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(REPO), str(8 << 20)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            deadline = time.time() + 20
            while not _tmp_files(tmp_path) and time.time() < deadline:  # kill while a write is under way
                time.sleep(0.001)
            time.sleep(0.002 * attempt)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
        state = torch.load(path, weights_only=True)
        assert state["t"].numel() == 8 << 20
        assert torch.all(state["t"] == float(state["i"]))
        leftovers = _tmp_files(tmp_path)
        if leftovers:
            killed_mid_write = True  # a partial temp file exists: the kill hit a write
            break
    assert killed_mid_write, "the writer was never killed mid-write"


def test_model_pt_from_ddp_has_no_module_prefix(tmp_path):
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = get_model("tiny", num_features=32)
        ddp = nn.parallel.DistributedDataParallel(model)
        assert all(k.startswith("module.") for k in ddp.state_dict())
        path = save_model_pt(ddp, tmp_path / "out")
    finally:
        if own_group:
            dist.destroy_process_group()
    assert path == tmp_path / "out" / "model.pt"
    raw = torch.load(path, weights_only=True)
    assert list(raw) == list(model.state_dict())
    fresh = get_model("tiny", num_features=32)
    fresh.load_state_dict(raw, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_load_model_pt_strips_a_ddp_prefix(tmp_path):
    sd = {"module.fc.weight": torch.ones(2, 2), "module.fc.bias": torch.zeros(2)}
    torch.save(sd, tmp_path / "model.pt")
    assert sorted(load_model_pt(tmp_path / "model.pt")) == ["fc.bias", "fc.weight"]
    torch.save({"epoch": 3}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_model_pt(tmp_path / "bad.pt")


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint_gpu_0.pt"):
        load_training_checkpoint(tmp_path / "checkpoint_gpu_0.pt")


def test_truncated_checkpoint_names_the_file(tmp_path):
    backbone, head, opt, sched = _training_state()
    path = save_training_checkpoint(tmp_path, 0, epoch=0, global_step=0, backbone=backbone, head=head,
                                    optimizer=opt, lr_scheduler=sched)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checkpoint_gpu_0.pt"):
        load_training_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="checkpoint_gpu_0.pt"):
        load_training_checkpoint(path)


def test_checkpoint_lacking_a_key_names_key_and_file(tmp_path):
    state = {k: 0 for k in CHECKPOINT_KEYS if k != "state_lr_scheduler"}
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"old\.pt.*state_lr_scheduler"):
        load_training_checkpoint(tmp_path / "old.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt.*list"):
        load_training_checkpoint(tmp_path / "list.pt")


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"epoch": nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="pickled.pt"):
        load_training_checkpoint(tmp_path / "pickled.pt")
