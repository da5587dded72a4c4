"""torchrun entry point: ``torchrun --nproc_per_node=8 recipes/train.py configs/x.py``."""
import sys

from protomem_plugin.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
