"""Run an unmodified arcface_torch checkout with the head that ``config.head`` names.

    python -m protomem_plugin.arcface_torch /path/to/arcface_torch my_job.py [--resume]
    torchrun --nproc_per_node=8 -m protomem_plugin.arcface_torch /path/to/arcface_torch my_job.py

Before the checkout's ``train_v2.py`` runs (as ``__main__``, from the current directory), the hook

1. loads the job config itself (:mod:`.config`: a path from the current directory or the checkout,
   checked strictly) and makes the checkout's ``get_config`` return it;
2. makes train_v2's ``PartialFC_V2`` build ``config.head`` while staying a class (:mod:`.head`);
   a config without ``head`` trains with arcface_torch's own ``PartialFC_V2``;
3. replaces ``get_dataloader`` with our identity-grouped loader when the head needs groups
   (PM, QAPM), and with our plain shuffling loader (``samples_per_class = 1``) when arcface_torch's
   own cannot run here (mxnet or torchvision missing, or no CUDA) (:mod:`.loaders`);
4. substitutes mxnet-free ``dataset`` / ``eval.verification`` modules where mxnet is missing
   (:mod:`.substitutes`), and applies the run-time compatibility fixes of :mod:`.compat`.

Every replacement is announced with one ``protomem:`` line. Users who prefer editing ``train_v2.py``
replace the ``PartialFC_V2(...)`` call with
``module_partial_fc = protomem_plugin.registry.build_head(cfg, margin_loss)``.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Any

from ..cli_errors import add_cli_arguments, is_user_error, report_error
from .compat import apply_cpu_fallback, fix_scheduler_verbose, note, set_single_process_env
from .config import head_needs_groups, load_hook_config, resolve_config_path, unused_keys
from .head import install_head
from .loaders import make_get_dataloader
from .substitutes import dataset_module, import_or_none, verification_module

__all__ = ["TRAIN_SCRIPT", "install", "main"]

TRAIN_SCRIPT = "train_v2.py"


def _install_loader(cfg: Any, cpu_fallback: bool) -> None:
    real, missing = import_or_none("dataset")
    grouped = head_needs_groups(cfg)
    if grouped:
        reason, k = f"head {cfg.head!r} needs identity groups", int(cfg.samples_per_class)
    elif missing:
        reason, k = f"arcface_torch's dataset.py needs {missing}, which is not installed", 1
    elif cpu_fallback:
        reason, k = "arcface_torch's DataLoaderX needs CUDA streams", 1
    else:
        return
    fallback = real.get_dataloader if real is not None else None
    get_dataloader = make_get_dataloader(cfg, k, fallback, reason)
    if real is None:
        dataset_module(get_dataloader)
    else:
        real.get_dataloader = get_dataloader


def install(checkout: str | Path, config: str, cwd: Path | None = None) -> Any:
    """Prepare the interpreter for the checkout's train_v2.py; return the loaded config."""
    checkout = Path(checkout).resolve()
    if not (checkout / TRAIN_SCRIPT).is_file():
        raise FileNotFoundError(f"{checkout} is not an arcface_torch checkout: {TRAIN_SCRIPT} is missing")
    config_path = resolve_config_path(checkout, config, cwd)
    cfg = load_hook_config(checkout, config_path)
    sys.path.insert(0, str(checkout))
    set_single_process_env()
    fix_scheduler_verbose()
    cpu_fallback = apply_cpu_fallback()

    utils_config = __import__("utils.utils_config", fromlist=["get_config"])
    utils_config.get_config = lambda config_file: cfg
    install_head(cfg)
    _install_loader(cfg, cpu_fallback)
    _, missing = import_or_none("eval.verification")
    if missing:
        verification_module()
        note(f"eval.verification -> protomem's .bin verification (arcface_torch's needs {missing}, not installed)")
    head = cfg.get("head")
    note(f"config {config_path}: " + (f"PartialFC_V2 builds protomem head {head!r}" if head
                                       else "no 'head' key: arcface_torch's own PartialFC_V2 is kept"))
    ignored = unused_keys(cfg)
    if ignored:
        note(f"keys of protomem-train that train_v2 does not read: {', '.join(ignored)}")
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m protomem_plugin.arcface_torch",
                                     description="Run arcface_torch's train_v2.py with the head from config.head")
    parser.add_argument("checkout", help="path to recognition/arcface_torch")
    parser.add_argument("config", help="job config: a path from the current directory (or absolute), "
                                       "or relative to the checkout (configs/x.py)")
    parser.add_argument("--resume", action="store_true",
                        help="set config.resume = True: continue from output/checkpoint_gpu_{rank}.pt (epoch boundary)")
    args, rest = add_cli_arguments(parser).parse_known_args(argv)
    try:
        cfg = install(args.checkout, args.config)
    except Exception as exc:  # noqa: BLE001 - bad input before train_v2 runs is one line (cli_errors' rule)
        if not is_user_error(exc):
            raise
        raise SystemExit(report_error(parser.prog, exc, args.verbose)) from None
    if args.resume:
        cfg.resume = True
    script = str(Path(args.checkout).resolve() / TRAIN_SCRIPT)
    sys.argv = [script, args.config, *rest]  # train_v2 parses it; its get_config now returns cfg
    runpy.run_path(script, run_name="__main__")
