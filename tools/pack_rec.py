"""Pack face images into an InsightFace-layout dataset (train.rec, train.idx, property).

    python tools/pack_rec.py IMAGE_DIR OUT_DIR           # IMAGE_DIR/<identity>/<image>.jpg
    python tools/pack_rec.py LIST.lst OUT_DIR --root DIR # im2rec list: index<TAB>label<TAB>path
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from protomem_plugin.cli_errors import add_cli_arguments, cli_entry  # noqa: E402
from protomem_plugin.data.packing import pack_images  # noqa: E402


@cli_entry("pack_rec.py")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pack_rec.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder with one sub-folder per identity, or an im2rec .lst file")
    parser.add_argument("out_dir", help="output folder; must not already hold a dataset")
    parser.add_argument("--root", default=None, help="folder the list file's paths are relative to")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = add_cli_arguments(parser).parse_args(argv)
    count = pack_images(args.source, args.out_dir, root=args.root, progress=not args.quiet)
    print(f"packed {count} images into {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
