#!/usr/bin/env python
"""IJB-B/C evaluation (same as the ``protomem-eval-ijb`` command; see --help)."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from protomem_plugin.eval.cli import ijb_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(ijb_main())
