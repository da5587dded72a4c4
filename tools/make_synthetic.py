"""Generate the built-in synthetic face dataset (InsightFace layout + quality.npy + val.bin).

    python tools/make_synthetic.py OUT_DIR --identities 1000 --images-per-identity 20
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from protomem_plugin.cli_errors import add_cli_arguments, cli_entry  # noqa: E402
from protomem_plugin.data.synthetic import make_synthetic_dataset  # noqa: E402


@cli_entry("make_synthetic.py")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_synthetic.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--identities", type=int, default=1000, help="training identities")
    parser.add_argument("--images-per-identity", type=int, default=20, help="images per identity (mean if --long-tail)")
    parser.add_argument("--val-identities", type=int, default=100, help="held-out identities for val.bin")
    parser.add_argument("--val-pairs", type=int, default=600, help="val.bin pairs (half genuine)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--degraded-fraction", type=float, default=0.2, help="share of heavily degraded images")
    parser.add_argument("--long-tail", action="store_true", help="long-tailed images per identity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-folders", action="store_true", help="also write images/<identity>/<n>.jpg")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT_DIR")
    parser.add_argument("--workers", type=int, default=None, help="rendering processes (default: CPU count)")
    args = add_cli_arguments(parser).parse_args(argv)
    out = make_synthetic_dataset(
        args.out_dir,
        args.identities,
        args.images_per_identity,
        val_identities=args.val_identities,
        val_pairs=args.val_pairs,
        image_size=args.image_size,
        degraded_fraction=args.degraded_fraction,
        long_tail=args.long_tail,
        seed=args.seed,
        write_folders=args.write_folders,
        overwrite=args.overwrite,
        num_workers=args.workers,
    )
    print(f"synthetic dataset in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
