"""Partial FC baseline (32 GPUs x 128), sample_rate 0.2."""
import runpy
from pathlib import Path

config = runpy.run_path(str(Path(__file__).with_name("wf42m_r100_pm.py")))["config"]
config.head = "partial_fc"
config.sample_rate = 0.2
for key in ("memory_size", "samples_per_class"):
    del config[key]
config.output = "work_dirs/wf42m_r100_pfc"
