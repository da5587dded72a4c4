#!/usr/bin/env python
"""Compare our backbones with an arcface_torch checkout's: strict state_dict load and output parity.

    python tools/check_backbone_parity.py /path/to/recognition/arcface_torch [names...]

Imports the checkout's ``backbones`` package, builds each name both ways (one model pair at a time,
one copy of the weights in memory), loads arcface_torch's state_dict into ours with ``strict=True``
and prints max abs differences of eval-mode outputs on the same random input and, for models up to
``--train-max-params`` parameters, of training-mode outputs and gradients under the same seed.

arcface_torch's ``vit.py`` imports ``DropPath``, ``to_2tuple`` and ``trunc_normal_`` from
``timm.models.layers``; if timm cannot be imported (it needs torchvision), a module of that name
providing the three is registered, from timm's own source files when installed, else minimal
stand-ins. Those names only act in training mode (and at initialisation, which the loaded
state_dict overrides). See ``protomem_plugin.backbones.parity``.
"""
import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from protomem_plugin.backbones import BACKBONE_NAMES, get_model  # noqa: E402
from protomem_plugin.backbones.parity import (  # noqa: E402
    compare_backbone, format_table, load_peer_backbones, provide_timm_layers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="arcface_torch folder of an insightface checkout (holds backbones/)")
    parser.add_argument("names", nargs="*", help="backbone names (default: every arcface_torch name we have)")
    parser.add_argument("--batch", type=int, default=2, help="images in the compared batch (default 2)")
    parser.add_argument("--train-max-params", type=float, default=3e8,
                        help="compare training mode only for models up to this many parameters (default 3e8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = args.names or [n for n in BACKBONE_NAMES if n != "tiny"]
    unknown = [n for n in names if n not in BACKBONE_NAMES]
    if unknown:
        parser.error(f"unknown backbone(s) {unknown}; valid names: {', '.join(BACKBONE_NAMES)}")
    print(f"timm.models.layers: {provide_timm_layers()}")
    peers = load_peer_backbones(args.root)
    results = []
    for name in names:
        start = time.perf_counter()
        with torch.device("meta"):
            params = sum(p.numel() for p in get_model(name).parameters())
        train = params <= args.train_max_params
        results.append(compare_backbone(peers, name, batch=args.batch, seed=args.seed, train=train))
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print(format_table(results))
    return 0 if all(r.strict_load and not r.error for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
