"""Run an unmodified arcface_torch checkout with the head that ``config.head`` names.

    python -m protomem_plugin.arcface_torch /path/to/arcface_torch configs/x.py [train_v2 args]
    torchrun --nproc_per_node=8 -m protomem_plugin.arcface_torch /path/to/arcface_torch configs/x.py

The checkout's ``train_v2.py`` builds ``PartialFC_V2(margin_loss, embedding_size, num_classes,
sample_rate, fp16)``. Before it runs, the hook replaces ``partial_fc_v2.PartialFC_V2`` with a factory
that loads the same config (through the checkout's own ``get_config``) and builds the head from our
registry; a config without ``head`` keeps arcface_torch's own ``PartialFC_V2``. The config file path
is relative to the checkout, as arcface_torch expects (``configs/...``).

Users who prefer editing ``train_v2.py`` replace the ``PartialFC_V2(...)`` call with one line:
``module_partial_fc = protomem_plugin.registry.build_head(cfg, margin_loss)``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import runpy
import sys
from pathlib import Path
from typing import Any, Callable

from .registry import build_head

TRAIN_SCRIPT = "train_v2.py"


def make_head_factory(cfg: Any, original: Callable) -> Callable:
    """A drop-in for ``PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate, fp16)``."""

    def factory(margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False, *args, **kwargs):
        if not cfg.get("head"):
            return original(margin_loss, embedding_size, num_classes, sample_rate, fp16, *args, **kwargs)
        merged = dict(cfg)
        merged.update(embedding_size=embedding_size, num_classes=num_classes, sample_rate=sample_rate, fp16=fp16)
        return build_head(merged, margin_loss)

    return factory


def install(checkout: str | os.PathLike, config_file: str) -> Any:
    """Put the checkout on ``sys.path``, load its config and patch ``partial_fc_v2.PartialFC_V2``."""
    checkout = Path(checkout).resolve()
    if not (checkout / TRAIN_SCRIPT).is_file():
        raise FileNotFoundError(f"{checkout} is not an arcface_torch checkout: {TRAIN_SCRIPT} is missing")
    sys.path.insert(0, str(checkout))
    os.chdir(checkout)
    get_config = importlib.import_module("utils.utils_config").get_config
    cfg = get_config(config_file)
    partial_fc_v2 = importlib.import_module("partial_fc_v2")
    partial_fc_v2.PartialFC_V2 = make_head_factory(cfg, partial_fc_v2.PartialFC_V2)
    return cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m protomem_plugin.arcface_torch",
                                     description="Run arcface_torch's train_v2.py with the head from config.head")
    parser.add_argument("checkout", help="path to recognition/arcface_torch")
    parser.add_argument("config", help="config file relative to the checkout, e.g. configs/ms1mv3_r50.py")
    args, rest = parser.parse_known_args(argv)
    install(args.checkout, args.config)
    sys.argv = [TRAIN_SCRIPT, args.config, *rest]
    runpy.run_path(TRAIN_SCRIPT, run_name="__main__")


if __name__ == "__main__":
    main()
