"""The training recipe: main job, resume after SIGKILL, bad configs (one process)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from protomem_plugin.backbones import get_model
from protomem_plugin.train.checkpoint import load_model_pt
from protomem_plugin.train.cli import main as train_main
from protomem_plugin.train.config import ConfigError, get_config
from train_helpers import REPO, read_losses, write_config


def run_cli(config, *sets):
    return train_main([str(config), "--set", *sets])


def test_short_main_job_learns_and_writes_arcface_outputs(tmp_path, tiny_rec):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, "pm", head="prototype_memory", memory_size=40, rec=str(tiny_rec),
                       output=str(out), num_epoch=4)
    assert run_cli(cfg) == 0
    losses = read_losses(out)
    assert len(losses) == 4 * (60 * 3 // 8)  # 3 groups of 2 per identity, 8 groups per batch
    model = get_model("tiny", num_features=32)
    model.load_state_dict(load_model_pt(out / "model.pt"), strict=True)
    log = (out / "training.log").read_text()
    accuracy = float(log.rsplit("Accuracy-Flip: ", 1)[1].split("+-")[0])
    assert accuracy > 0.65, f"held-out verification accuracy {accuracy} is not clearly above chance"
    assert list((out / "tensorboard").iterdir()), "TensorBoard event files"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("loss", "learning_rate", "samples_per_sec", "head/memory_fill", "head/slot_age_mean", "verification/val"):
        assert tag in tags, tag


def _wait_for_steps(path, steps, proc, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        if path.is_file() and len(path.read_text().splitlines()) >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError("training too slow")


@pytest.mark.parametrize("head", ["prototype_memory", "partial_fc"])
def test_sigkill_then_resume_gives_the_same_losses(tmp_path, tiny_rec, head):
    options = dict(head=head, rec=str(tiny_rec), num_epoch=2, save_every_steps=1)
    options.update(memory_size=30) if head == "prototype_memory" else options.update(sample_rate=0.5)
    full_cfg = write_config(tmp_path / "a", "job", output=str(tmp_path / "full"), **options)
    assert run_cli(full_cfg) == 0
    reference = read_losses(tmp_path / "full")

    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "b", "job", output=str(out), **options)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "protomem_plugin.train.cli", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_at = int(torch.randint(3, len(reference) - 3, (1,)))
    _wait_for_steps(out / "train_log.jsonl", kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = read_losses(out)
    assert len(done) < len(reference)
    assert run_cli(cfg, "resume=True") == 0
    resumed = read_losses(out)
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-6), f"step {step} (killed after {len(done)})"


def test_bad_configs_stop_at_start_and_touch_nothing(tmp_path, tiny_rec, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pt").write_bytes(b"previous model")
    cases = {
        "unknown config key 'lerning_rate'.*did you mean": dict(lerning_rate=0.1),
        "'network' = 'r51'.*valid": dict(network="r51"),
        "'head' = 'pm'.*valid": dict(head="pm"),
        "'num_classes' = 10 is smaller than the dataset's labels": dict(num_classes=10),
        "'rec' = .*does not exist": dict(rec=str(tmp_path / "nowhere")),
        "'resume' is set but .*checkpoint_gpu_0.pt does not exist": dict(resume=True),
    }
    for i, (message, override) in enumerate(cases.items()):
        options = {"rec": str(tiny_rec), "output": str(out), **override}
        cfg = write_config(tmp_path / f"c{i}", "job", **options)
        assert train_main([str(cfg)]) == 2
        err = capsys.readouterr().err
        assert pytest.importorskip("re").search(message, err), (message, err)
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]
    assert (out / "model.pt").read_bytes() == b"previous model"
    cfg = write_config(tmp_path / "missing", "job", output=str(out))
    del_rec = cfg.read_text().replace("config.rec", "# config.rec")
    cfg.write_text(del_rec)
    with pytest.raises(ConfigError, match="'rec' is missing"):
        get_config(cfg)


def test_non_finite_losses_are_skipped_then_stop_training(tmp_path, tiny_rec):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, "job", head="prototype_memory", memory_size=40, rec=str(tiny_rec), output=str(out),
                       lr=1e6, max_nonfinite_steps=3, clip_grad_norm=1e30, save_every_steps=1)
    from protomem_plugin.train.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses"):
        run_cli(cfg)
    rows = read_losses(out)
    skipped = [s for s, loss in rows.items() if loss != loss]
    assert len(skipped) == 3
    assert skipped == sorted(skipped) and skipped[-1] == max(rows), "three in a row at the end"
    state = torch.load(out / "checkpoint_gpu_0.pt", weights_only=True)
    assert state["global_step"] == max(rows) - 1
    for name, tensor in [*state["state_dict_backbone"].items(), *state["state_dict_softmax_fc"].items()]:
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), f"non-finite {name} was kept"


def test_quality_file_feeds_qapm_the_quality_of_each_batch_image(tmp_path, tiny_rec):
    import numpy as np

    from protomem_plugin.train.runtime import Runtime
    from protomem_plugin.train.trainer import build_setup, load_quality

    quality = np.load(tiny_rec / "quality.npy")
    cfg = get_config(write_config(tmp_path, "job", head="qapm", quality_source="external", memory_size=40,
                                  rec=str(tiny_rec), output=str(tmp_path / "out"), max_steps=3,
                                  quality_file=str(tiny_rec / "quality.npy")))
    setup = build_setup(cfg, Runtime(0, 1, 0, torch.device("cpu")))
    setup.loader.set_epoch(0)
    images, labels = next(iter(setup.loader))
    positions = setup.loader.current_positions
    assert np.array_equal(setup.loader.labels[positions], labels.numpy())
    assert np.array_equal(setup.quality[torch.as_tensor(positions)].numpy(), quality[positions])
    assert run_cli(write_config(tmp_path / "run", "job", head="qapm", quality_source="external", memory_size=40,
                                rec=str(tiny_rec), output=str(tmp_path / "out"), max_steps=3,
                                quality_file=str(tiny_rec / "quality.npy"))) == 0
    bad = tmp_path / "short.npy"
    np.save(bad, quality[:-1])
    cfg.quality_file = str(bad)
    with pytest.raises(ConfigError, match="quality_file.*images"):
        load_quality(cfg, setup.loader)


def test_stop_at_step_then_resume_equals_one_run(tmp_path, tiny_rec):
    options = dict(head="prototype_memory", memory_size=40, rec=str(tiny_rec), max_steps=10, val_targets=[])
    assert run_cli(write_config(tmp_path / "a", "job", output=str(tmp_path / "one"), **options)) == 0
    staged = write_config(tmp_path / "b", "job", output=str(tmp_path / "two"), stop_at_step=4, save_every_steps=4,
                          **options)
    assert run_cli(staged) == 0
    assert max(read_losses(tmp_path / "two")) == 4
    assert run_cli(staged, "resume=True", "stop_at_step=None") == 0
    one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert sorted(two) == sorted(one) == list(range(1, 11))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-6), step
