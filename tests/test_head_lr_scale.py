"""Config key ``head_lr_scale``: validated at load, kept by resume, a different value on resume refused."""
import pytest
import torch

from protomem_plugin.train.checkpoint import load_training_checkpoint
from protomem_plugin.train.config import ConfigError, get_config
from protomem_plugin.train.runtime import Runtime
from protomem_plugin.train.trainer import train
from train_helpers import write_config

CPU = torch.device("cpu")


@pytest.mark.parametrize("scale", [0, "a"])
def test_bad_head_lr_scale_in_a_job_file_names_key_and_file(tmp_path, scale):
    path = write_config(tmp_path, "job", rec=str(tmp_path / "rec"), head_lr_scale=scale)
    with pytest.raises(ConfigError, match=r"'head_lr_scale' in .*job\.py"):
        get_config(path)


def run(path, **overrides) -> None:
    cfg = get_config(path)
    cfg.update(overrides)
    train(cfg, Runtime(0, 1, 0, CPU))


def saved_lrs(output, key: str) -> list[float]:
    groups = load_training_checkpoint(output / "checkpoint_gpu_0.pt")["state_optimizer"]["param_groups"]
    return [g[key] for g in groups]


def test_resume_keeps_head_lr_scale_and_refuses_another(tmp_path, tiny_rec):
    out = tmp_path / "out"
    path = write_config(tmp_path, "job", head="partial_fc", rec=str(tiny_rec), output=str(out), head_lr_scale=10,
                        max_steps=10, stop_at_step=3, save_every_steps=3, val_targets=[])
    run(path)
    run(path, resume=True, stop_at_step=6)
    assert load_training_checkpoint(out / "checkpoint_gpu_0.pt")["global_step"] == 6
    initial, lrs = saved_lrs(out, "initial_lr"), saved_lrs(out, "lr")
    assert initial[1] / initial[0] == pytest.approx(10, rel=1e-9) and initial[0] == pytest.approx(0.05)
    assert lrs[0] > 0 and lrs[1] / lrs[0] == pytest.approx(10, rel=1e-9)

    with pytest.raises(ConfigError, match=r"'head_lr_scale' = 1.0 .* 10\.0.*new output folder"):
        run(path, resume=True, head_lr_scale=1.0)
    with pytest.raises(ConfigError, match=r"'lr' = 0.1 .* 0\.05"):
        run(path, resume=True, lr=0.1)
