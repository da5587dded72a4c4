"""The arcface_torch hook on a stand-in checkout that keeps the public constructs the hook touches.

See tests/arcface_standin/README.txt for the constructs. Every run goes through
``python -m protomem_plugin.arcface_torch`` (or torchrun) in a fresh process, on the CPU.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protomem_plugin.data import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).parent / "arcface_standin"
K = 4  # samples_per_class of configs/job_pm.py; the dataset has exactly K images per identity


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("hook_data") / "data"
    make_synthetic_dataset(str(root), 24, K, val_identities=8, val_pairs=40, image_size=32, write_folders=True,
                           progress=False, num_workers=1)
    return root


@pytest.fixture()
def workdir(tmp_path, dataset):
    """A directory holding a copy of the stand-in checkout and the dataset as ``data``."""
    shutil.copytree(STANDIN, tmp_path / "arcface_torch")
    os.symlink(dataset, tmp_path / "data")
    return tmp_path


def write_job(path: Path, base: str, **overrides) -> Path:
    """A job file: the stand-in's ``configs/<base>.py`` plus ``overrides``."""
    lines = (STANDIN / "configs" / f"{base}.py").read_text().splitlines()
    lines += [f"config.{key} = {value!r}" for key, value in overrides.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def hook(workdir: Path, config: str, *extra: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "protomem_plugin.arcface_torch", str(workdir / "arcface_torch"), config, *extra]
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def report(workdir: Path, output: str, rank: int = 0) -> dict:
    return json.loads((workdir / output / f"report_{rank}.json").read_text())


def all_batches(rep: dict) -> list[dict]:
    return [b for epoch in sorted(rep["epochs"], key=int) for b in rep["epochs"][epoch]]


def assert_identity_groups(rep: dict, k: int) -> None:
    for batch in all_batches(rep):
        labels = batch["labels"]
        groups = [labels[i:i + k] for i in range(0, len(labels), k)]
        assert all(len(set(g)) == 1 for g in groups), labels


def test_config_without_head_trains_arcface_partial_fc_v2(workdir):
    result = hook(workdir, "configs/job_plain.py")
    rep = report(workdir, "work_dirs/job_plain")
    # super(PartialFC_V2, self) inside the stand-in's class ran, and the name is still a class
    assert rep["head"] == "PartialFC_V2" and rep["is_partial_fc_v2"] and rep["state_keys"] == ["weight"]
    assert "no 'head' key: arcface_torch's own PartialFC_V2 is kept" in result.stdout
    # without mxnet the stand-in's dataset.py cannot import: our plain shuffling loader serves it
    assert "dataset.py needs mxnet" in result.stdout and "samples_per_class=1" in result.stdout
    assert rep["is_dataloader"] and len(rep["epochs"]["0"]) == 96 // 16
    epoch0 = sorted(label for b in rep["epochs"]["0"] for label in b["labels"])
    assert epoch0 == sorted(list(range(24)) * K), "one epoch covers every image once"
    assert all(loss == loss for loss in rep["losses"])
    # the LRScheduler verbose= fix and the CPU fallback announced themselves
    assert "takes no 'verbose' argument" in result.stdout and "CPU fallback" in result.stdout
    # the callback's mxnet-based verification was replaced and ran on data/val.bin
    assert [v["step"] for v in rep["verification"]] == [6, 12]
    assert all(0.0 <= v["acc2"] <= 1.0 and v["xnorm"] > 0 for v in rep["verification"])
    assert (workdir / "work_dirs/job_plain/model.pt").is_file()


def test_prototype_memory_gets_identity_groups_and_stays_a_partial_fc_v2(workdir):
    result = hook(workdir, "configs/job_pm.py")
    rep = report(workdir, "work_dirs/job_pm")
    assert rep["head"] == "PrototypeMemory" and rep["is_partial_fc_v2"]
    assert {"memory", "slot_class", "slot_step", "step"} <= set(rep["state_keys"])
    assert "needs identity groups" in result.stdout and f"samples_per_class={K}" in result.stdout
    assert rep["loader"] == "GroupedLoaderX" and rep["is_dataloader"]
    assert_identity_groups(rep, K)
    batch = rep["epochs"]["0"][0]
    assert batch["shape"] == [16, 3, 32, 32] and batch["device"] == batch["label_device"] == "cpu"
    for epoch in ("0", "1"):  # every identity has K images: one group per identity and epoch
        labels = [label for b in rep["epochs"][epoch] for label in b["labels"][::K]]
        assert sorted(labels) == list(range(24))
    assert rep["epochs"]["0"][0]["labels"] != rep["epochs"]["1"][0]["labels"], "set_epoch changes the order"


def test_torchrun_two_processes_grouped_and_disjoint(workdir):
    hook(workdir, "configs/job_pm.py", nproc=2)
    reps = [report(workdir, "work_dirs/job_pm", r) for r in range(2)]
    assert all(r["head"] == "PrototypeMemory" and r["world_size"] == 2 for r in reps)
    assert reps[0]["losses"] == reps[1]["losses"], "every rank computes the same global loss"
    for rep in reps:
        assert_identity_groups(rep, K)
        assert len(rep["epochs"]["0"]) == 96 // (16 * 2)
    for epoch in ("0", "1"):
        per_rank = [{label for b in rep["epochs"][epoch] for label in b["labels"]} for rep in reps]
        assert not per_rank[0] & per_rank[1], "ranks see disjoint identities"
        assert per_rank[0] | per_rank[1] == set(range(24))


def test_misspelt_key_is_refused_with_a_suggestion(workdir):
    job = write_job(workdir / "jobs" / "typo.py", "job_pm", memroy_size=24)
    result = hook(workdir, str(job), check=False)
    assert result.returncode != 0
    assert "unknown config key 'memroy_size'" in result.stderr and "'memory_size'" in result.stderr
    assert not (workdir / "work_dirs").exists(), "nothing is written before the check"


def test_missing_train_v2_key_and_mining_are_refused(workdir):
    job = workdir / "jobs" / "bare.py"
    job.parent.mkdir()
    job.write_text("from easydict import EasyDict as edict\nconfig = edict()\nconfig.rec = 'data'\n")
    result = hook(workdir, str(job), check=False)
    assert result.returncode != 0 and "num_classes" in result.stderr and "train_v2 reads them" in result.stderr
    mining = write_job(workdir / "jobs" / "mining.py", "job_pm", doppelganger_mining=True)
    result = hook(workdir, str(mining), check=False)
    assert result.returncode != 0 and "needs protomem-train" in result.stderr


def test_config_outside_the_checkout_with_paths_from_the_current_directory(workdir, tmp_path_factory):
    # an absolute job path outside the checkout's configs/ (the stand-in's get_config would assert),
    # rec and output relative to the directory the command runs in, base.py from the checkout
    elsewhere = tmp_path_factory.mktemp("jobs")
    job = write_job(elsewhere / "my_pm.py", "job_pm", rec="data/images", num_epoch=1)
    hook(workdir, str(job))
    rep = report(workdir, "work_dirs/my_pm")  # output unset -> work_dirs/<job name> under the cwd
    assert rep["head"] == "PrototypeMemory"
    assert_identity_groups(rep, K)
    assert sorted(label for b in rep["epochs"]["0"] for label in b["labels"][::K]) == list(range(24))


def test_dali_path_gives_identity_groups(workdir):
    pytest.importorskip("nvidia.dali")
    job = write_job(workdir / "jobs" / "dali_pm.py", "job_pm", dali=True)
    result = hook(workdir, str(job))
    rep = report(workdir, "work_dirs/dali_pm")
    assert "protomem DALI loader" in result.stdout
    assert_identity_groups(rep, K)
    assert rep["epochs"]["0"][0]["labels"] != rep["epochs"]["1"][0]["labels"]


def test_resume_through_the_hook_continues_at_the_epoch_boundary(workdir):
    job = write_job(workdir / "jobs" / "res.py", "job_pm", save_all_states=True, output="work_dirs/res")
    one = write_job(workdir / "jobs" / "res_one.py", "job_pm", save_all_states=True, output="work_dirs/res_one",
                    num_epoch=1)
    hook(workdir, str(job))
    full = report(workdir, "work_dirs/res")
    hook(workdir, str(one))
    shutil.copy(workdir / "work_dirs/res_one/checkpoint_gpu_0.pt", workdir / "ckpt_epoch1.pt")
    # continue the 1-epoch run as the 2-epoch job: same output folder, --resume
    resumed_job = write_job(workdir / "jobs" / "res_two.py", "job_pm", save_all_states=True,
                            output="work_dirs/res_one", num_epoch=2)
    hook(workdir, str(resumed_job), "--resume")
    resumed = report(workdir, "work_dirs/res_one")
    assert resumed["start_epoch"] == 1 and list(resumed["epochs"]) == ["1"]
    assert resumed["global_step"] == full["global_step"] == 12
    assert resumed["epochs"]["1"] == full["epochs"]["1"], "the resumed epoch sees the uninterrupted run's batches"
    import torch

    state = torch.load(workdir / "ckpt_epoch1.pt", weights_only=True)["state_dict_softmax_fc"]
    assert int(state["step"]) == 6, "the memory head's state went through the checkpoint"


def test_importable_dataset_module_gets_its_get_dataloader_replaced(workdir):
    # where mxnet and torchvision are installed, arcface_torch's dataset.py imports: the hook then
    # patches its get_dataloader for grouped heads, and without CUDA also for PartialFC_V2
    source = workdir / "arcface_torch" / "dataset.py"
    source.write_text("\n".join(line for line in source.read_text().splitlines()
                                if not line.startswith(("import mxnet", "from torchvision"))) + "\n")
    result = hook(workdir, "configs/job_pm.py")
    assert "needs identity groups" in result.stdout and "dataset.py needs" not in result.stdout
    assert_identity_groups(report(workdir, "work_dirs/job_pm"), K)
    result = hook(workdir, "configs/job_plain.py")
    assert "DataLoaderX needs CUDA streams" in result.stdout
    assert report(workdir, "work_dirs/job_plain")["head"] == "PartialFC_V2"
