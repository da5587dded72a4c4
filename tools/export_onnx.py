#!/usr/bin/env python
"""Export an arcface_torch backbone to ONNX (same as the ``protomem-export`` command)."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from protomem_plugin.export import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
