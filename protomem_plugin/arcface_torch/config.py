"""The job config under the hook: found where the user means it, loaded as arcface_torch would, checked strictly.

arcface_torch's ``get_config`` only takes ``configs/<name>.py`` inside the checkout (it asserts the
prefix and imports ``configs.base`` and ``configs.<name>`` as modules). The hook loads the file
itself: a path that exists from the current directory (relative or absolute) wins, then one
relative to the checkout. ``base.py`` comes from the job file's folder when it has one, else from
the checkout's ``configs/``; the job's ``config`` updates it, and an unset ``output`` becomes
``work_dirs/<job name>`` as in arcface_torch. Relative ``rec`` and ``output`` paths therefore mean
what they mean to every other command: relative to the directory the command runs in.
"""
from __future__ import annotations

import os
from pathlib import Path

from easydict import EasyDict as edict

from ..registry import get_head_class, get_margin_class, margin_name
from ..train.config import (
    ARCFACE_TORCH_KEYS,
    PLUGIN_DEFAULTS,
    ConfigError,
    check_head_keys,
    check_known_keys,
    check_margin_keys,
    check_values,
    default_samples_per_class,
    known_keys,
    load_config_file,
)

__all__ = ["HOOK_KEYS", "TRAIN_V2_KEYS", "head_needs_groups", "load_hook_config", "resolve_config_path", "unused_keys"]

#: Keys train_v2.py reads from the config (a job without one of them fails inside train_v2).
TRAIN_V2_KEYS = (
    "margin_list", "network", "resume", "save_all_states", "output", "embedding_size", "sample_rate",
    "interclass_filtering_threshold", "fp16", "batch_size", "optimizer", "lr", "weight_decay", "verbose",
    "frequent", "dali", "dali_aug", "gradient_acc", "seed", "num_workers", "rec", "num_classes",
    "num_image", "num_epoch", "warmup_epoch", "val_targets", "using_wandb",
)

#: Our keys the hook itself uses (besides the options of the chosen head).
HOOK_KEYS = ("head", "head_options", "samples_per_class", "image_size")


def resolve_config_path(checkout: Path, config: str, cwd: Path | None = None) -> Path:
    """The job file ``config`` names: from ``cwd`` (or absolute) first, then inside ``checkout``."""
    cwd = Path.cwd() if cwd is None else cwd
    candidates = [Path(config)] if os.path.isabs(config) else [cwd / config, checkout / config]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"config file {config!r} not found (looked for {', '.join(str(c) for c in candidates)})")


def head_needs_groups(cfg: edict) -> bool:
    """Whether the head ``cfg.head`` names learns only from identity-grouped batches."""
    head = cfg.get("head")
    return bool(head) and bool(getattr(get_head_class(head), "needs_identity_groups", False))


def unused_keys(cfg: edict) -> list[str]:
    """Keys of protomem-train present in ``cfg`` that arcface_torch's train_v2 does not read."""
    used = set(HOOK_KEYS)
    if cfg.get("head"):
        used |= set(get_head_class(cfg.head).options) | {"margin"}
        if margin_name(cfg) != "combined":  # built by the hook from the registry, with margin_scale
            used |= set(getattr(get_margin_class(margin_name(cfg)), "options", {})) | {"margin_scale"}
    return sorted(k for k in cfg if k in PLUGIN_DEFAULTS and k not in used)


def load_hook_config(checkout: Path, config_path: Path) -> edict:
    """Base config updated by the job file, checked as strictly as protomem-train checks it.

    Unknown keys are refused with the closest known ones; so are a missing key train_v2 reads, an
    unknown head or head option, and values that cannot run. ``doppelganger_mining`` needs
    protomem-train's loop (the neighbour table is refreshed from the head every step) and is
    refused here.
    """
    source = str(config_path)
    local_base = config_path.parent / "base.py"
    base = local_base if local_base.is_file() else checkout / "configs" / "base.py"
    cfg = load_config_file(base) if base.is_file() and base.resolve() != config_path.resolve() else edict()
    cfg.update(load_config_file(config_path))
    if cfg.get("output") is None:
        cfg.output = os.path.join("work_dirs", config_path.stem)
    check_known_keys(cfg, known_keys() | ARCFACE_TORCH_KEYS, source)
    missing = [k for k in TRAIN_V2_KEYS if k not in cfg]
    if missing:
        raise ConfigError(f"config key(s) {missing} missing in {source} (and in {base}); arcface_torch's train_v2 reads them")
    if cfg.get("head"):
        check_head_keys(cfg, source)
    check_margin_keys(cfg, source)
    if margin_name(cfg) != "combined" and not cfg.get("head"):
        raise ConfigError(f"config key 'margin' = {cfg.margin!r} in {source} needs config key 'head': arcface_torch's "
                          "own PartialFC_V2 calls its margin without the embedding norms this margin reads")
    if cfg.get("doppelganger_mining"):
        raise ConfigError(f"config key 'doppelganger_mining' in {source} needs protomem-train: train_v2 cannot refresh "
                          "the neighbour table from the head; run `protomem-train` with this config instead")
    if cfg.get("resume") not in (True, False, None, 0, 1):
        raise ConfigError(f"config key 'resume' = {cfg.resume!r} in {source}: arcface_torch's train_v2 takes True or "
                          "False ('auto' is protomem-train's: run `protomem-train` with this config for it)")
    if head_needs_groups(cfg):
        if cfg.get("samples_per_class") is None:
            cfg.samples_per_class = default_samples_per_class(cfg.head)
    check_values(cfg, source)
    return cfg
