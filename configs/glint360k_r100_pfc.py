"""Partial FC baseline (8 GPUs x 128), sample_rate 0.1."""
import runpy
from pathlib import Path

config = runpy.run_path(str(Path(__file__).with_name("glint360k_r100_pm.py")))["config"]
config.head = "partial_fc"
config.sample_rate = 0.1
for key in ("memory_size", "samples_per_class"):
    del config[key]
config.output = "work_dirs/glint360k_r100_pfc"
