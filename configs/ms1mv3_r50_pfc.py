"""Partial FC baseline (8 GPUs x 128), sample_rate 1.0."""
import runpy
from pathlib import Path

config = runpy.run_path(str(Path(__file__).with_name("ms1mv3_r50_pm.py")))["config"]
config.head = "partial_fc"
config.sample_rate = 1.0
for key in ("memory_size", "samples_per_class"):
    del config[key]
config.output = "work_dirs/ms1mv3_r50_pfc"
