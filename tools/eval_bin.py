#!/usr/bin/env python
""".bin verification accuracy (lfw/cfp_fp/agedb_30) of a backbone; see --help."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from protomem_plugin.eval.cli import bin_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(bin_main())
