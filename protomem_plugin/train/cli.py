"""``protomem-train``: the torchrun entry point (also runs as one plain process)."""
from __future__ import annotations

import argparse
import ast
import logging
import sys

from .config import ConfigError, get_config, validate_config


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` strings to a dict; values are Python literals, else plain strings."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="protomem-train", description="Train a face recognition model "
                                     "with an arcface_torch config (launch with torchrun for several GPUs).")
    parser.add_argument("config", help="config file, e.g. configs/synthetic_pm.py (base.py beside it is loaded first)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--resume", action="store_true", help="resume from output/checkpoint_gpu_{rank}.pt")
    parser.add_argument("--dry-run", action="store_true",
                        help="check that the config builds (network and head on the meta device, no data) and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # torch.distributed.launch
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    try:
        cfg = get_config(args.config)
        cfg.update(parse_overrides(args.set))
        if args.resume:
            cfg.resume = True
        validate_config(cfg, source=args.config)
    except ConfigError as exc:
        print(f"protomem-train: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        from .dry_run import dry_run

        try:
            summary = dry_run(cfg)
        except ConfigError as exc:
            print(f"protomem-train: {args.config}: {exc}", file=sys.stderr)
            return 2
        print("builds: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
        return 0
    from .trainer import train

    try:
        summary = train(cfg)
    except ConfigError as exc:
        print(f"protomem-train: {exc}", file=sys.stderr)
        return 2
    print(f"done: {summary['global_step']} steps, last loss {summary['last_loss']:.4f}, "
          f"verification {summary['verification']}, model at {summary['output']}/model.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
