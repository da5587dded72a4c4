"""Quality-Aware Prototype Memory: ms1mv3_r50_pm.py with quality-weighted prototypes."""
import runpy
from pathlib import Path

config = runpy.run_path(str(Path(__file__).with_name("ms1mv3_r50_pm.py")))["config"]
config.head = "qapm"
config.quality_source = "recognizability_soft"  # the learning benchmark's best learned source (README "Recommended settings")
config.output = "work_dirs/ms1mv3_r50_qapm"
