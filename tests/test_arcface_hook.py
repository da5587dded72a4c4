"""The arcface_torch hook runs an unmodified train_v2.py-style script with the head from config.head."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).parent / "arcface_standin"


@pytest.fixture()
def checkout(tmp_path):
    target = tmp_path / "arcface_torch"
    shutil.copytree(STANDIN, target)
    return target


def run(cmd, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_hook_trains_with_prototype_memory_from_config(checkout, tmp_path):
    run([sys.executable, "-m", "protomem_plugin.arcface_torch", str(checkout), "configs/mini_pm.py"], cwd=tmp_path)
    report = json.loads((checkout / "work_dirs" / "mini_pm" / "report_0.json").read_text())
    assert report["head"] == "PrototypeMemory"
    assert {"memory", "slot_class", "slot_step", "step"} <= set(report["state_keys"])
    assert all(loss == loss for loss in report["losses"])
    before, after = report["separation"]
    assert after > before + 0.1, report["separation"]  # same-class minus different-class cosine grew


def test_config_without_head_keeps_arcface_torch_partial_fc(checkout, tmp_path):
    run([sys.executable, "-m", "protomem_plugin.arcface_torch", str(checkout), "configs/mini_plain.py"], cwd=tmp_path)
    report = json.loads((checkout / "work_dirs" / "mini_plain" / "report_0.json").read_text())
    assert report["head"] == "PartialFC_V2" and report["state_keys"] == ["weight"]


def test_hook_under_torchrun_two_processes(checkout, tmp_path):
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "protomem_plugin.arcface_torch", str(checkout), "configs/mini_pm.py"], cwd=tmp_path)
    reports = [json.loads((checkout / "work_dirs" / "mini_pm" / f"report_{r}.json").read_text()) for r in range(2)]
    assert all(r["head"] == "PrototypeMemory" and r["world_size"] == 2 for r in reports)
    assert reports[0]["losses"] == reports[1]["losses"], "every rank computes the same global loss"
