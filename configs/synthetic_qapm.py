"""Quality-Aware Prototype Memory on the built-in synthetic identities: synthetic_pm.py with quality weights."""
import runpy
from pathlib import Path

config = runpy.run_path(str(Path(__file__).with_name("synthetic_pm.py")))["config"]
config.head = "qapm"
config.quality_source = "recognizability_soft"  # the learning benchmark's best learned source (README "Recommended settings")
config.output = "work_dirs/synthetic_qapm"
