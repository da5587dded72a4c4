"""Partial FC baseline on the built-in synthetic identities: synthetic_pm.py with the head swapped."""
import runpy
from pathlib import Path

config = runpy.run_path(str(Path(__file__).with_name("synthetic_pm.py")))["config"]
config.head = "partial_fc"
config.sample_rate = 0.5          # the same number of logit columns as synthetic_pm's memory (256 of 500)
config.samples_per_class = 1      # plain shuffling, as arcface_torch (see README "Recommended settings")
del config["memory_size"]
config.output = "work_dirs/synthetic_pfc"
