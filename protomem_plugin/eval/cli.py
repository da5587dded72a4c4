"""Command-line entry points: ``protomem-eval-ijb`` and the tools/ evaluation scripts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli_errors import add_cli_arguments, cli_entry
from .ijb_meta import IJBLayout  # light; .ijb (torch, insightface, sklearn) is imported after the input checks


def _add_model_arguments(parser: argparse.ArgumentParser, allow_onnx: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--network", help="backbone name for --weights (r18, r34, r50, r100, r200, mbf, tiny)")
    group.add_argument("--weights", help="backbone state_dict, e.g. arcface_torch output/model.pt")
    group.add_argument("--num-features", type=int, default=None,
                       help="embedding size of the backbone (default: read from the weights); must match the weights")
    if allow_onnx:
        group.add_argument("--onnx", help="ONNX recognition model (run through insightface's ArcFaceONNX)")
    group.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1); cuda also for ONNX")


def build_ijb_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protomem-eval-ijb",
        description="IJB-B / IJB-C evaluation: 1:1 TAR@FAR and 1:N identification, insightface's data layout.",
    )
    parser.add_argument("--root", required=True, help="benchmark folder holding meta/ and loose_crop/ (e.g. IJB_release/IJBC)")
    parser.add_argument("--target", default="IJBC", help="IJBC or IJBB (default IJBC)")
    parser.add_argument("--output", required=True, help="folder for features, results.json, results.md, roc.png")
    _add_model_arguments(parser)
    parser.add_argument("--features", help="(N, 2, D) image features .npy: reused if it exists, written otherwise")
    parser.add_argument("--name", default=None, help="model name in the tables (default: weights/ONNX file stem)")
    parser.add_argument("--protocols", default="1:1,1:N", help="comma-separated subset of 1:1,1:N")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (each also flipped)")
    parser.add_argument("--workers", type=int, default=4, help="threads reading and aligning images")
    parser.add_argument("--no-flip", action="store_true", help="use the image embedding only, not image + mirror")
    parser.add_argument("--no-detector-score", action="store_true", help="do not weight images by detector score")
    parser.add_argument("--normalize-images", action="store_true", help="L2-normalise image features before aggregation")
    return add_cli_arguments(parser)


def check_ijb_inputs(layout: IJBLayout, protocols: tuple[str, ...], need_images: bool) -> None:
    """Raise FileNotFoundError/NotADirectoryError naming what is missing from an IJB root."""
    if not layout.root.is_dir():
        kind = "is not a folder" if layout.root.exists() else "not found"
        error = NotADirectoryError if layout.root.exists() else FileNotFoundError
        raise error(f"IJB root {kind}: {layout.root} (expected meta/ and loose_crop/ of {layout.target})")
    needed = [layout.face_tid_mid, layout.name_5pts_score]
    if "1:1" in protocols:
        needed.append(layout.template_pair_label)
    if "1:N" in protocols:
        needed += [layout.probe_mixed, *layout.galleries.values()]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"IJB meta file not found: {missing[0]}{more}; is --target {layout.target} right?")
    if need_images and not layout.image_dir.is_dir():
        raise FileNotFoundError(f"IJB image folder not found: {layout.image_dir}")


def _new_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, innermost first."""
    out = []
    path = path.absolute()
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


@cli_entry("protomem-eval-ijb")
def ijb_main(argv: list[str] | None = None) -> int:
    """``protomem-eval-ijb``: evaluate a backbone or an ONNX model on IJB-B/C.

    The benchmark root and the model files are checked before the model is loaded, and the
    output folder is created only after that (and removed again if the run fails while it is
    still empty).
    """
    parser = build_ijb_parser()
    args = parser.parse_args(argv)
    protocols = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
    features_ready = args.features is not None and Path(args.features).is_file()
    check_ijb_inputs(IJBLayout.of(args.root, args.target), protocols, need_images=not features_ready)
    if not features_ready:
        for flag, path in (("--weights", args.weights), ("--onnx", args.onnx)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{flag} file not found: {path}")
    from .ijb import PROTOCOLS, IJBOptions, evaluate_ijb

    if not protocols or not set(protocols) <= set(PROTOCOLS):
        parser.error(f"--protocols must be a subset of {','.join(PROTOCOLS)}, got {args.protocols}")
    embedder = None
    if not features_ready:
        from .embedders import make_embedder

        embedder = make_embedder(args.network, args.weights, args.onnx, args.num_features, args.device)
    name = args.name or Path(args.onnx or args.weights or args.features).stem
    created = _new_folders(Path(args.output))
    try:
        results = evaluate_ijb(
            args.root,
            args.target,
            args.output,
            embedder=embedder,
            name=name,
            features_path=args.features,
            protocols=protocols,
            options=IJBOptions(
                use_flip=not args.no_flip,
                use_detector_score=not args.no_detector_score,
                normalize_images=args.normalize_images,
            ),
            batch_size=args.batch_size,
            workers=args.workers,
        )
    except BaseException:
        for folder in created:  # innermost first; only folders this run made and left empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    print(results["markdown"])
    print(f"results written to {Path(args.output).resolve()}")
    return 0


@cli_entry("eval_bin.py")
def bin_main(argv: list[str] | None = None) -> int:
    """Verification accuracy of a backbone on .bin sets (lfw.bin, cfp_fp.bin, agedb_30.bin)."""
    parser = argparse.ArgumentParser(prog="eval_bin.py", description="10-fold verification accuracy on .bin sets, with flip.")
    parser.add_argument("bins", nargs="+", help=".bin files")
    _add_model_arguments(parser, allow_onnx=False)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", help="write the results as JSON here")
    args = add_cli_arguments(parser).parse_args(argv)
    if not (args.network and args.weights):
        parser.error("--network and --weights are required")
    missing = [path for path in args.bins if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f".bin set not found: {missing[0]}")
    from .embedders import load_backbone
    from .verification import evaluate_bin

    model = load_backbone(args.network, args.weights, args.num_features).to(args.device)
    results = {}
    for path in args.bins:
        results[Path(path).stem] = evaluate_bin(model, path, args.batch_size, args.device, progress=True)
    print("| set | pairs | accuracy (%) | std | xnorm | threshold |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['num_pairs']} | {100 * r['accuracy']:.2f} | {100 * r['std']:.2f} | "
              f"{r['xnorm']:.3f} | {r['best_threshold']:.3f} |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


@cli_entry("make_synthetic_ijb.py")
def synthetic_ijb_main(argv: list[str] | None = None) -> int:
    """Write a synthetic IJB benchmark in insightface's layout."""
    from .synthetic_ijb import make_synthetic_ijb

    parser = argparse.ArgumentParser(prog="make_synthetic_ijb.py",
                                     description="Render a synthetic IJB-style benchmark (meta/ + loose_crop/).")
    parser.add_argument("--root", required=True, help="output folder, e.g. data/synthetic/IJBC")
    parser.add_argument("--target", default="IJBC", help="IJBC (galleries G1/G2) or IJBB (S1/S2)")
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--templates-per-identity", type=int, default=3)
    parser.add_argument("--max-media", type=int, default=2, help="media per template: 1..this")
    parser.add_argument("--max-images", type=int, default=2, help="images per media: 1..this")
    parser.add_argument("--impostor-pairs", type=int, default=None, help="sample this many impostor pairs (default all)")
    parser.add_argument("--degraded-fraction", type=float, default=0.2, help="share of heavily degraded images")
    parser.add_argument("--seed", type=int, default=0)
    args = add_cli_arguments(parser).parse_args(argv)
    made = make_synthetic_ijb(
        args.root, args.target, args.identities, args.templates_per_identity, args.max_media, args.max_images,
        args.impostor_pairs, args.seed, degraded_fraction=args.degraded_fraction,
    )
    print(f"wrote {len(made.images)} images, {len(made.template_identity)} templates, "
          f"{made.num_genuine} genuine / {made.num_impostor} impostor pairs to {made.layout.root}")
    return 0
