#!/usr/bin/env python
"""Render a synthetic IJB-style benchmark in insightface's layout; see --help."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from protomem_plugin.eval.cli import synthetic_ijb_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(synthetic_ijb_main())
