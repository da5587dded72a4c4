"""Every shipped config loads and validates; arcface_torch's get_config semantics."""
from pathlib import Path

import pytest

from protomem_plugin.registry import build_head
from protomem_plugin.losses import build_margin_loss
from protomem_plugin.train.config import ConfigError, get_config

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py") if p.name != "base.py")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_validates(path):
    cfg = get_config(path)
    assert cfg.output and cfg.rec and cfg.num_classes > 0
    assert cfg.batch_size % cfg.samples_per_class == 0
    if cfg.head != "partial_fc":
        small = dict(cfg, num_classes=1000, memory_size=64)  # build the head at a toy size
        head = build_head(small, build_margin_loss(cfg))
        assert head.memory_size == 64


def test_job_values_override_base_and_output_defaults_to_work_dirs(tmp_path):
    (tmp_path / "base.py").write_text("from easydict import EasyDict as edict\nconfig = edict()\n"
                                      "config.lr = 0.1\nconfig.output = None\nconfig.network = 'r50'\n")
    (tmp_path / "job.py").write_text("from easydict import EasyDict as edict\nconfig = edict()\nconfig.lr = 0.02\n"
                                     "config.rec = 'x'\nconfig.num_classes = 10\nconfig.batch_size = 4\n"
                                     "config.num_epoch = 1\nconfig.embedding_size = 8\n")
    cfg = get_config(tmp_path / "job.py")
    assert cfg.lr == 0.02 and cfg.network == "r50" and cfg.output.endswith("work_dirs/job")
    assert cfg.head == "partial_fc" and cfg.samples_per_class == 1  # arcface_torch's plain shuffling


@pytest.mark.parametrize("head, written, expected", [
    ("partial_fc", None, 1), ("prototype_memory", None, 2), ("qapm", None, 2),
    ("partial_fc", 2, 2), ("prototype_memory", 4, 4)])
def test_samples_per_class_defaults_by_head_and_a_written_value_wins(tmp_path, head, written, expected):
    lines = ["from easydict import EasyDict as edict", "config = edict()", f"config.head = {head!r}",
             "config.rec = 'x'", "config.num_classes = 100", "config.batch_size = 8", "config.num_epoch = 1",
             "config.embedding_size = 8", "config.lr = 0.1", "config.network = 'tiny'"]
    if head != "partial_fc":
        lines.append("config.memory_size = 16")
    if written is not None:
        lines.append(f"config.samples_per_class = {written}")
    (tmp_path / "job.py").write_text("\n".join(lines) + "\n")
    assert get_config(tmp_path / "job.py").samples_per_class == expected


def test_broken_config_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("config = edict(\n")
    with pytest.raises(ConfigError, match="bad.py failed to load"):
        get_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        get_config(tmp_path / "missing.py")
