"""``protomem-train``: the torchrun entry point (also runs as one plain process)."""
from __future__ import annotations

import argparse
import ast
import logging
import sys

from ..cli_errors import add_cli_arguments, cli_entry, report_error
from .config import ConfigError, get_config, validate_config

PROG = "protomem-train"


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


@cli_entry(PROG)
def main(argv: list[str] | None = None) -> int:
    """Train (or ``--dry-run``). A config error is reported as one line with exit code 2, also when
    called with ``argv``; as a program every user error is (see :mod:`protomem_plugin.cli_errors`)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Train a face recognition model "
                                     "with an arcface_torch config (launch with torchrun for several GPUs).")
    parser.add_argument("config", help="config file, e.g. configs/synthetic_pm.py (base.py beside it is loaded first)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--resume", nargs="?", const="true", choices=("true", "auto"), default=None,
                        help="resume from output/checkpoint_gpu_{rank}.pt; '--resume auto': resume if a complete "
                             "checkpoint set is there, else start (for torchrun --max-restarts)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check that the config builds (network and head on the meta device, no data) and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # torch.distributed.launch
    args = add_cli_arguments(parser).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    try:
        cfg = get_config(args.config)
        cfg.update(parse_overrides(args.set))
        if args.resume:
            cfg.resume = True if args.resume == "true" else "auto"
        validate_config(cfg, source=args.config)
    except ConfigError as exc:
        return report_error(PROG, exc, args.verbose)
    if args.dry_run:
        from .dry_run import dry_run

        try:
            summary = dry_run(cfg)
        except ConfigError as exc:
            return report_error(f"{PROG}: {args.config}", exc, args.verbose)
        print("builds: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
        return 0
    from .runtime import leave_process_group
    from .trainer import train

    try:
        summary = train(cfg)
    except ConfigError as exc:
        return report_error(PROG, exc, args.verbose)
    leave_process_group()
    if summary.get("stopped"):
        print(f"stopped by {summary['stopped']} after {summary['global_step']} steps; the checkpoints are in "
              f"{summary['output']}: continue with --resume")
        return 0
    print(f"done: {summary['global_step']} steps, last loss {summary['last_loss']:.4f}, "
          f"verification {summary['verification']}, model at {summary['output']}/model.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
