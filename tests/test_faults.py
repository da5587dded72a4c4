"""Faults during training: a rank killed under torchrun --max-restarts (resume="auto"), a checkpoint
write that fails for lack of space, SIGTERM from a scheduler, and the refusal to start over on top of
existing checkpoints. The faults are injected by the tests (wrapper scripts, resource limits, signals)."""
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_utils import run_distributed
from protomem_plugin.train.checkpoint import load_training_checkpoint, save_training_checkpoint
from protomem_plugin.train.config import ConfigError, get_config
from protomem_plugin.train.resume import complete_checkpoint, resume_decision
from protomem_plugin.train.runtime import Runtime
from protomem_plugin.train.schedule import build_lr_scheduler
from protomem_plugin.train.trainer import train
from train_helpers import REPO, read_losses, write_config

CPU = torch.device("cpu")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
# 2 ranks x 8 = global batch 16: 22 steps per epoch of tiny_rec; 30 steps cross an epoch end
JOB = dict(head="prototype_memory", memory_size=64, batch_size=8, max_steps=30, save_every_steps=4, val_targets=[],
           resume="auto")

# torchrun runs this instead of protomem-train: rank FAULT_RANK SIGKILLs itself after step FAULT_STEP, in the
# first attempt only (torchrun counts restarts in TORCHELASTIC_RESTART_COUNT)
FAULTY_ENTRY = """
import os, signal, sys
from protomem_plugin.train import callbacks
from protomem_plugin.train.cli import main

step = callbacks.TrainingLogger.step

def step_then_die(self, global_step, *args, **kwargs):
    step(self, global_step, *args, **kwargs)
    if (os.environ["RANK"] == os.environ["FAULT_RANK"] and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
            and global_step == int(os.environ["FAULT_STEP"])):
        os.kill(os.getpid(), signal.SIGKILL)

callbacks.TrainingLogger.step = step_then_die
sys.exit(main(sys.argv[1:]))
"""


def torchrun(*args, env=None, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for_step(output, step, proc, timeout=120):
    """Poll ``train_log.jsonl`` until it holds ``step``."""
    log = output / "train_log.jsonl"
    start = time.time()
    while time.time() - start < timeout:
        if log.is_file() and any(json.loads(line)["step"] >= step for line in log.read_text().splitlines()):
            return
        assert proc.poll() is None, f"training exited early ({proc.returncode}): {proc.communicate()[0][-3000:]}"
        time.sleep(0.05)
    raise AssertionError("training too slow")


def assert_same_losses(output, reference, from_step):
    losses = read_losses(output)
    assert sorted(losses) == sorted(reference)
    for step in range(from_step, max(reference) + 1):
        assert losses[step] == pytest.approx(reference[step], abs=1e-6), step


def no_temporaries(output):
    return [p.name for p in output.iterdir() if p.name.endswith(".tmp")] == []


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory, tiny_rec):
    """Losses of the 2-rank torchrun job, uninterrupted (resume="auto" on an empty folder starts)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp, "job", rec=str(tiny_rec), output=str(tmp / "out"), **JOB)
    code, out = finish(torchrun("-m", "protomem_plugin.train.cli", str(cfg)))
    assert code == 0, out[-3000:]
    losses = read_losses(tmp / "out")
    assert sorted(losses) == list(range(1, 31))
    return losses


def test_a_rank_killed_under_torchrun_max_restarts_resumes_from_the_last_complete_checkpoint(
        tmp_path, tiny_rec, two_rank_reference):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, "job", rec=str(tiny_rec), output=str(out), **JOB)
    entry = tmp_path / "faulty_entry.py"
    entry.write_text(FAULTY_ENTRY)
    code, log = finish(torchrun("--max-restarts=1", str(entry), str(cfg), env={"FAULT_RANK": "1", "FAULT_STEP": "14"}))
    assert code == 0, log[-3000:]
    assert re.search(r"Signals.SIGKILL|exitcode\s*:\s*-9", log), "rank 1 did die"
    text = (out / "training.log").read_text()
    assert "resume='auto': resumed from the complete checkpoint of global step 12" in text  # after the restart
    assert_same_losses(out, two_rank_reference, from_step=13)
    states = [load_training_checkpoint(out / f"checkpoint_gpu_{r}.pt") for r in range(2)]
    assert [s["global_step"] for s in states] == [30, 30] and no_temporaries(out)


def test_sigterm_under_torchrun_checkpoints_every_rank_and_resumes_like_one_run(tmp_path, tiny_rec, two_rank_reference):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, "job", rec=str(tiny_rec), output=str(out), **{**JOB, "save_every_steps": 0})
    proc = torchrun("-m", "protomem_plugin.train.cli", str(cfg))
    wait_for_step(out, 7, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
    _, log = finish(proc)
    stopped = re.search(r"stopped by SIGTERM after global step (\d+) of 30", (out / "training.log").read_text())
    assert stopped, log[-3000:]
    step = int(stopped.group(1))
    assert 7 <= step < 30
    assert [load_training_checkpoint(out / f"checkpoint_gpu_{r}.pt")["global_step"] for r in range(2)] == [step, step]
    code, log = finish(torchrun("-m", "protomem_plugin.train.cli", str(cfg)))
    assert code == 0, log[-3000:]
    assert_same_losses(out, two_rank_reference, from_step=step + 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_like_one_run(tmp_path, tiny_rec, workers):
    """With DataLoader workers the signal goes to the whole process group, as torchrun and Slurm send it."""
    options = dict(rec=str(tiny_rec), head="prototype_memory", memory_size=40, max_steps=12, val_targets=[],
                   frequent=1, num_workers=workers)
    train(get_config(write_config(tmp_path / "a", "job", output=str(tmp_path / "one"), **options)), Runtime(0, 1, 0, CPU))
    reference = read_losses(tmp_path / "one")
    out = tmp_path / "two"
    cfg = write_config(tmp_path / "b", "job", output=str(out), **options)
    # as many threads as this process (the reference and the resume): the same float reductions
    proc = subprocess.Popen([sys.executable, "-m", "protomem_plugin.train.cli", str(cfg)],
                            env={**ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_step(out, 4, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    code, log = finish(proc)
    assert code == 0, log[-3000:]
    stopped = re.search(r"stopped by SIGTERM after global step (\d+) of 12", (out / "training.log").read_text())
    assert stopped, log[-3000:]
    step = int(stopped.group(1))
    assert load_training_checkpoint(out / "checkpoint_gpu_0.pt")["global_step"] == step < 12
    assert max(read_losses(out)) == step
    cfg_auto = get_config(cfg)
    cfg_auto.resume = "auto"
    train(cfg_auto, Runtime(0, 1, 0, CPU))
    assert_same_losses(out, reference, from_step=step + 1)


def limited_cli(config, limit, *sets):
    """protomem-train in a process whose files may not grow beyond ``limit`` bytes (write fails with EFBIG)."""
    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([sys.executable, "-m", "protomem_plugin.train.cli", str(config), "--set", *sets], env=ENV,
                          capture_output=True, text=True, preexec_fn=limit_files, timeout=120)


def test_a_checkpoint_write_that_fails_for_lack_of_space_keeps_the_previous_one_and_stops_clearly(tmp_path, tiny_rec):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, "job", rec=str(tiny_rec), output=str(out), head="prototype_memory", memory_size=40,
                       max_steps=12, save_every_steps=4, val_targets=[])
    done = subprocess.run([sys.executable, "-m", "protomem_plugin.train.cli", str(cfg), "--set", "stop_at_step=4"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    path = out / "checkpoint_gpu_0.pt"
    before = path.read_bytes()
    failed = limited_cli(cfg, len(before) // 2, "resume=True")  # the logs stay far below the limit
    assert failed.returncode == 2, failed.stderr[-3000:]
    lines = [line for line in failed.stderr.strip().splitlines() if line.startswith("protomem-train:")]
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr  # one line, no traceback
    assert re.search(rf"cannot write {re.escape(str(path))}: File too large", lines[0]), failed.stderr
    assert path.read_bytes() == before and load_training_checkpoint(path)["global_step"] == 4
    assert no_temporaries(out)
    assert max(read_losses(out)) == 8  # it trained on to the next checkpoint


def full_disk_worker(rank, world_size, config_path, full_rank, dump):
    """Train to the checkpoint of step 4; then resume with the files of ``full_rank`` limited below its
    checkpoint's size, and keep the error each rank stops with."""
    cfg = get_config(config_path)
    train(cfg, Runtime(rank, world_size, 0, CPU))
    before = (Path(cfg.output) / f"checkpoint_gpu_{rank}.pt").read_bytes()
    torch.distributed.barrier()
    if rank == full_rank:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    cfg.update(resume=True, stop_at_step=None)
    try:
        train(cfg, Runtime(rank, world_size, 0, CPU))
    except Exception as err:  # noqa: BLE001 - the test reads it
        Path(dump, f"error_{rank}.txt").write_text(f"{type(err).__name__}: {err}")
    Path(dump, f"before_{rank}.pt").write_bytes(before) if rank != full_rank else None


def test_one_rank_out_of_space_leaves_every_rank_its_previous_checkpoint(tmp_path, tiny_rec):
    out, dump = tmp_path / "out", tmp_path / "dump"
    dump.mkdir()
    cfg = write_config(tmp_path, "job", rec=str(tiny_rec), output=str(out), head="prototype_memory", memory_size=64,
                       batch_size=8, max_steps=12, save_every_steps=4, stop_at_step=4, val_targets=[])
    run_distributed(full_disk_worker, 2, str(cfg), 1, str(dump), timeout_s=60)
    errors = [(dump / f"error_{r}.txt").read_text() for r in range(2)]
    assert re.fullmatch(rf"CheckpointWriteError: cannot write {re.escape(str(out))}/checkpoint_gpu_1.pt: File too large.*",
                        errors[1]), errors
    assert re.fullmatch(r"CheckpointWriteError: cannot write .*checkpoint_gpu_0.pt: another rank could not write.*",
                        errors[0]), errors
    assert (out / "checkpoint_gpu_0.pt").read_bytes() == (dump / "before_0.pt").read_bytes()  # not moved on alone
    assert complete_checkpoint(out) == (4, 2) and no_temporaries(out)


def small_checkpoint(output, rank, step, world_size):
    net = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    save_training_checkpoint(output, rank, epoch=0, global_step=step, backbone=net, head=nn.Identity(),
                             optimizer=optimizer, lr_scheduler=build_lr_scheduler(optimizer, 0, 10),
                             extra={"protomem": {"world_size": world_size}})


def test_resume_false_refuses_a_folder_with_checkpoints_and_auto_needs_a_complete_set(tmp_path):
    out = tmp_path / "out"
    assert resume_decision(False, out) is None and resume_decision("auto", out) is None  # nothing there: start
    small_checkpoint(out, 0, 8, 2)
    listing = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    with pytest.raises(ConfigError, match=rf"'resume' is False but {re.escape(str(out))} already holds checkpoints.*"
                                          r"resume=True or resume='auto'.*another 'output' folder"):
        resume_decision(False, out)
    for mode in (True, "auto"):
        with pytest.raises(ConfigError, match=r"'resume'.*not a complete set: the run had 2 ranks but checkpoint_gpu_1"):
            resume_decision(mode, out)
    small_checkpoint(out, 1, 4, 2)
    with pytest.raises(ConfigError, match=r"different steps \(rank 0: 8, rank 1: 4\)"):
        resume_decision("auto", out)
    (out / "checkpoint_gpu_1.pt").write_bytes(b"half a file")
    with pytest.raises(ConfigError, match="checkpoint_gpu_1.pt cannot be read"):
        resume_decision("auto", out)
    small_checkpoint(out, 1, 8, 2)
    small_checkpoint(out, 2, 3, 3)  # left by an earlier run on 3 ranks: not part of the set
    assert resume_decision("auto", out) == resume_decision(True, out) == 8
    assert sorted(p.name for p in out.iterdir()) == sorted([*(n for n, _ in listing), "checkpoint_gpu_1.pt",
                                                             "checkpoint_gpu_2.pt"])


def test_the_resume_key_takes_false_true_or_auto(tmp_path, tiny_rec):
    for value in (False, True, "auto"):
        assert get_config(write_config(tmp_path, "ok", rec=str(tiny_rec), resume=value)).resume == value
    with pytest.raises(ConfigError, match=r"'resume' .* must be False, True or 'auto', got 'yes'"):
        get_config(write_config(tmp_path, "bad", rec=str(tiny_rec), resume="yes"))
