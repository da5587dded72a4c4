"""protomem-train --dry-run, and the sample_rate / memory_size defaults arcface_torch jobs rely on."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from easydict import EasyDict as edict

from protomem_plugin.heads import PartialFC
from protomem_plugin.losses import CombinedMarginLoss
from protomem_plugin.registry import build_head, default_memory_size
from protomem_plugin.train.config import get_config
from protomem_plugin.train.dry_run import dry_run

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("job", ["wf42m_r100_pm.py", "glint360k_r100_pfc.py", "ms1mv3_r50_qapm.py"])
def test_large_jobs_build_on_the_meta_device(job):
    summary = dry_run(get_config(REPO / "configs" / job))
    assert summary["backbone_parameters"] > 20e6
    if "memory_slots" in summary:
        assert summary["memory_slots"] == get_config(REPO / "configs" / job).memory_size


def test_dry_run_cli_reports_and_refuses(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "protomem_plugin.train.cli", "configs/synthetic_pm.py", "--dry-run"],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and "head_class=PrototypeMemory" in ok.stdout and "memory_slots=256" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "protomem_plugin.train.cli", "configs/synthetic_pm.py", "--dry-run",
                          "--set", "embedding_size=100", "memory_size=0"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "head does not build" in bad.stderr


def test_sample_rate_zero_is_positives_only_as_in_arcface_torch():
    head = PartialFC(CombinedMarginLoss(64, 1.0, 0.0, 0.4), 4, 50, sample_rate=0.0)
    index, remapped = head.sample(torch.tensor([7, 3, 7, -1]))
    assert index.tolist() == [3, 7] and remapped.tolist() == [1, 0, 1, -1]


def test_default_memory_holds_at_least_one_global_batch():
    assert default_memory_size(edict(num_classes=1000, batch_size=64), 0.1) == 100
    assert default_memory_size(edict(num_classes=1000, batch_size=64), 0.0) == 64
    assert default_memory_size(edict(num_classes=40, batch_size=64), 0.0) == 40
    head = build_head(edict(head="prototype_memory", num_classes=1000, embedding_size=8, batch_size=32,
                            sample_rate=0.0), CombinedMarginLoss(64, 1.0, 0.0, 0.4))
    assert head.memory_size == 32
