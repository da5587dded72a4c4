"""Small training configs on a tiny synthetic dataset, written as arcface_torch config files."""
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = dict(
    network="tiny", embedding_size=32, image_size=32, batch_size=16, samples_per_class=2, lr=0.05,
    num_epoch=3, warmup_epoch=0, num_classes=60, margin_list=(1.0, 0.0, 0.35), margin_scale=16.0,
    frequent=5, verbose=0, num_workers=0, progress=False, val_targets=["val"], deterministic=True,
)


def write_config(directory: Path, name: str, **overrides) -> Path:
    """configs/base.py (the project's) plus a job file ``configs/{name}.py`` with TINY + overrides."""
    configs = Path(directory) / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "configs" / "base.py", configs / "base.py")
    values = {**TINY, **overrides}
    lines = ["from easydict import EasyDict as edict", "config = edict()"]
    lines += [f"config.{k} = {v!r}" for k, v in values.items()]
    path = configs / f"{name}.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_losses(output: Path) -> dict[int, float]:
    """step -> loss from ``train_log.jsonl``."""
    out = {}
    for line in (Path(output) / "train_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out
