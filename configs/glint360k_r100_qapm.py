"""Quality-Aware Prototype Memory: glint360k_r100_pm.py with quality-weighted prototypes."""
import runpy
from pathlib import Path

config = runpy.run_path(str(Path(__file__).with_name("glint360k_r100_pm.py")))["config"]
config.head = "qapm"
config.quality_source = "recognizability_soft"  # the learning benchmark's best learned source (README "Recommended settings")
config.output = "work_dirs/glint360k_r100_qapm"
