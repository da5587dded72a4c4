"""arcface_torch-format configs: ``configs/base.py`` updated by a job file, then validated.

``get_config("configs/x.py")`` loads ``base.py`` from the job file's folder (as arcface_torch's
``get_config`` does), updates it with the job's ``config`` and fills our defaults. Every key must be
known (arcface_torch's keys, ours, or an option of a registered head); a misspelt key stops the run
at start-up with an error naming it.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from easydict import EasyDict as edict

# keys of arcface_torch's configs/base.py and job files
ARCFACE_TORCH_KEYS = {
    "margin_list", "network", "resume", "save_all_states", "output", "embedding_size", "sample_rate",
    "interclass_filtering_threshold", "fp16", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
    "verbose", "frequent", "dali", "dali_aug", "gradient_acc", "seed", "num_workers", "rec", "num_classes",
    "num_image", "num_epoch", "warmup_epoch", "val_targets", "dropout",
    # logging extras arcface_torch's base.py carries; accepted and unused here
    "wandb_key", "suffix_run_name", "using_wandb", "wandb_entity", "wandb_project", "wandb_log_all",
    "save_artifacts", "wandb_resume", "notes",
}

# our keys with their defaults
PLUGIN_DEFAULTS: dict[str, Any] = {
    "head": "partial_fc",
    "head_options": None,
    "samples_per_class": None,    # images per identity group; None: the head's default (default_samples_per_class)
    "image_size": 112,
    "margin": "combined",         # margin loss from the margin registry: "combined" (margin_list), "adaface", ...
    "margin_scale": 64.0,         # s of every margin loss
    "margin_gradient": "straight_through",  # of the "combined" margin: or "exact"
    "lr_power": 2.0,
    "head_lr_scale": 1.0,         # lr of the head's parameters (class centres) = lr * this; 1.0: arcface_torch
    "clip_grad_norm": 5.0,
    "max_steps": None,            # train this many global steps in all (the LR schedule ends there)
    "stop_at_step": None,         # end this run at this global step, schedule unchanged (resume goes on)
    "save_every_steps": 0,        # also write checkpoint_gpu_{rank}.pt every N steps (0: epoch ends only)
    "max_nonfinite_steps": 5,     # consecutive non-finite losses that stop training
    "doppelganger_mining": False,  # batches bring together classes the memory finds similar (PM, QAPM)
    "mining_fraction": 0.5,       # share of each batch filled with mined neighbour groups
    "doppelganger_k": 3,          # neighbours reported per class
    "quality_file": None,         # .npy of per-image quality (image-key order) passed to the head as quality=
    "synthetic": None,            # dict of make_synthetic_dataset arguments: generate `rec` if absent
    "deterministic": False,       # torch.use_deterministic_algorithms + single-threaded reproducibility
    "progress": True,             # tqdm progress bar on rank 0
    "compute_dtype": "float32",   # "float64" for bit-level comparisons (e.g. ranks vs one process)
    "freeze_bn": False,           # keep BatchNorm running statistics fixed (fine-tuning, exact DDP parity)
    "val_every_epoch": False,     # also verify at the end of every epoch
}
# arcface_torch's `resume` (False / True) also takes "auto": resume from the last complete checkpoint in
# `output` if there is one, else start (torchrun --max-restarts); False refuses a folder holding checkpoints


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the key."""


def load_config_file(path: Path) -> edict:
    """The ``config`` edict a Python config file defines; :class:`ConfigError` naming the file otherwise."""
    spec = importlib.util.spec_from_file_location(f"_protomem_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken config file
        raise ConfigError(f"config file {path} failed to load: {exc!r}") from exc
    if not hasattr(module, "config"):
        raise ConfigError(f"config file {path} defines no `config = edict(...)`")
    return edict(module.config)


def known_keys() -> set[str]:
    """Every config key the recipe accepts."""
    from ..registry import head_option_names, margin_option_names

    return ARCFACE_TORCH_KEYS | set(PLUGIN_DEFAULTS) | head_option_names() | margin_option_names()


def get_config(config_file: str | os.PathLike) -> edict:
    """Load ``base.py`` beside ``config_file``, update it with the job config, fill defaults, validate."""
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    base_path = path.parent / "base.py"
    cfg = load_config_file(base_path) if base_path.is_file() and base_path.resolve() != path.resolve() else edict()
    job = load_config_file(path)
    cfg.update(job)
    for key, value in PLUGIN_DEFAULTS.items():
        cfg.setdefault(key, value)
    if cfg.samples_per_class is None:
        cfg.samples_per_class = default_samples_per_class(cfg.head)
    if cfg.get("output") is None:
        cfg.output = os.path.join("work_dirs", path.stem)
    cfg.config_file = str(path)
    validate_config(cfg, source=str(path))
    return cfg


def default_samples_per_class(head: str | None) -> int:
    """Images per identity group when the config leaves ``samples_per_class`` unset: 2 for heads that
    learn only from identity groups (PM, QAPM), 1 (arcface_torch's plain shuffling) for the others,
    which the learning benchmark's tuning chose for the class-centre heads in 7 of 10 regime/head
    pairs. An unknown head gets 1 here and is refused by validation."""
    from ..registry import DEFAULT_HEAD, available_heads, get_head_class

    name = head or DEFAULT_HEAD
    if name not in available_heads():
        return 1
    return 2 if getattr(get_head_class(name), "needs_identity_groups", False) else 1


def validate_config(cfg: edict, source: str = "config") -> None:
    """Raise :class:`ConfigError` naming the key for unknown keys and values that cannot run."""
    from ..backbones import BACKBONE_NAMES

    check_known_keys(cfg, known_keys() | {"config_file"}, source)
    for key in ("rec", "num_classes", "network", "batch_size", "lr", "num_epoch", "embedding_size"):
        if cfg.get(key) is None:
            raise ConfigError(f"config key {key!r} is missing in {source}")
    if cfg.network not in BACKBONE_NAMES:
        raise ConfigError(f"config key 'network' = {cfg.network!r} in {source} is unknown; valid: {', '.join(BACKBONE_NAMES)}")
    check_head_keys(cfg, source)
    check_margin_keys(cfg, source)
    check_values(cfg, source)
    resume = cfg.get("resume")
    if not (resume is None or resume == "auto" or (isinstance(resume, int) and resume in (0, 1))):
        raise ConfigError(f"config key 'resume' in {source} must be False, True or 'auto', got {cfg.resume!r}")


def check_known_keys(cfg: edict, allowed: set[str], source: str) -> None:
    """Refuse the first key of ``cfg`` outside ``allowed``, suggesting the closest known keys."""
    for key in cfg:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


def check_head_keys(cfg: edict, source: str) -> None:
    """The head ``cfg.head`` exists and every option given for it is valid."""
    from ..registry import DEFAULT_HEAD, available_heads, head_options_from_config

    head = cfg.get("head") or DEFAULT_HEAD
    if head not in available_heads():
        raise ConfigError(f"config key 'head' = {head!r} in {source} is unknown; valid: {', '.join(available_heads())}")
    try:
        head_options_from_config(cfg, head)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def check_margin_keys(cfg: edict, source: str) -> None:
    """The margin ``cfg.margin`` exists, its options are valid and it builds (bad values name their key)."""
    from ..registry import build_margin

    try:
        build_margin(cfg)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def check_values(cfg: edict, source: str) -> None:
    """Positive integer sizes, batch made of whole identity groups, known optimizer and dtype."""
    for key in ("num_classes", "batch_size", "num_epoch", "embedding_size", "samples_per_class", "gradient_acc", "image_size"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"config key {key!r} in {source} must be a positive integer, got {value!r}")
    samples_per_class = cfg.get("samples_per_class") or 1
    if cfg.get("batch_size") and cfg.batch_size % samples_per_class:
        raise ConfigError(
            f"config key 'batch_size' ({cfg.batch_size}) in {source} must be a multiple of 'samples_per_class' ({samples_per_class})"
        )
    if cfg.get("compute_dtype", "float32") not in ("float32", "float64"):
        raise ConfigError(f"config key 'compute_dtype' in {source} must be 'float32' or 'float64'")
    if cfg.get("optimizer", "sgd") not in ("sgd", "adamw"):
        raise ConfigError(f"config key 'optimizer' = {cfg.optimizer!r} in {source}; valid: sgd, adamw")
    if "head_lr_scale" in cfg:
        check_head_lr_scale(cfg.head_lr_scale, source)


def check_head_lr_scale(value: Any, source: str | None = None) -> float:
    """``head_lr_scale`` as a float: a positive finite int or float (not a bool), else ConfigError naming the key."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        where = f" in {source}" if source else ""
        raise ConfigError(f"config key 'head_lr_scale'{where} must be a positive finite number, got {value!r}")
    return float(value)
