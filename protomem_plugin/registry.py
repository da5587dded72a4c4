"""Head registry: ``build_head(cfg, margin_loss)`` builds the head an arcface_torch config names.

``cfg.head`` picks the head (default ``"partial_fc"``). A head's own options are read from
top-level config keys of the same name, or from ``cfg.head_options`` (a dict, validated strictly).
Third-party heads register through the entry-point group ``protomem_plugin.heads``.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable, Mapping

from torch import nn

ENTRY_POINT_GROUP = "protomem_plugin.heads"
DEFAULT_HEAD = "partial_fc"
COMMON_KEYS = ("embedding_size", "num_classes", "sample_rate", "fp16")

_HEADS: dict[str, type] = {}
_entry_points_loaded = False


def register_head(name: str) -> Callable[[type], type]:
    """Class decorator registering a head under ``name`` (its ``options`` declare its config keys)."""

    def decorator(cls: type) -> type:
        if name in _HEADS and _HEADS[name] is not cls:
            raise ValueError(f"a head named {name!r} is already registered ({_HEADS[name].__qualname__})")
        if not hasattr(cls, "options"):
            cls.options = {}
        _HEADS[name] = cls
        return cls

    return decorator


def _load_builtin_and_entry_points() -> None:
    global _entry_points_loaded
    from . import heads  # noqa: F401  (registers the built-in heads)

    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        cls = point.load()
        if point.name not in _HEADS:
            register_head(point.name)(cls)


def available_heads() -> list[str]:
    """Names of every registered head."""
    _load_builtin_and_entry_points()
    return sorted(_HEADS)


def get_head_class(name: str) -> type:
    """The class registered under ``name``; ``ValueError`` naming the valid choices otherwise."""
    _load_builtin_and_entry_points()
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r} in config key 'head'; valid choices: {', '.join(sorted(_HEADS))}")
    return _HEADS[name]


def head_option_names() -> set[str]:
    """Every option key any registered head declares (config keys the plugin understands)."""
    _load_builtin_and_entry_points()
    return {key for cls in _HEADS.values() for key in cls.options}


def _check_type(head: str, key: str, value: Any, expected: type, default: Any) -> Any:
    if value is None and default is None:
        return None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, float) and value.is_integer() and key == "memory_size":
        return int(value)
    if isinstance(value, bool) and expected is not bool:
        ok = False
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ValueError(
            f"config key {key!r} of head {head!r} must be of type {expected.__name__}, "
            f"got {type(value).__name__} ({value!r})"
        )
    return value


def head_options_from_config(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The options of head ``name`` found in ``cfg``, type-checked; unknown options raise."""
    cls = get_head_class(name)
    declared = cls.options
    explicit = dict(cfg.get("head_options") or {})
    unknown = sorted(set(explicit) - set(declared))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} in config key 'head_options' for head {name!r}; "
            f"valid options: {', '.join(sorted(declared)) or '(none)'}"
        )
    foreign = sorted(k for k in head_option_names() - set(declared) if cfg.get(k) is not None)
    if foreign:
        raise ValueError(
            f"config key(s) {foreign} are options of other heads, not of head {name!r}; "
            f"valid options: {', '.join(sorted(declared)) or '(none)'}"
        )
    options: dict[str, Any] = {}
    for key, (expected, default, _doc) in declared.items():
        if key in explicit:
            value = explicit[key]
        elif key in cfg:
            value = cfg[key]
        else:
            continue
        options[key] = _check_type(name, key, value, expected, default)
    return options


def default_memory_size(cfg: Mapping[str, Any], sample_rate: float) -> int:
    """``sample_rate * num_classes`` slots, but at least one global batch (``batch_size * world size``).

    A memory smaller than the classes of one global batch cannot run; with ``sample_rate = 0``
    (arcface_torch's "positives only") the memory holds just the classes of the current batch.
    """
    import torch.distributed as dist

    slots = int(round(sample_rate * int(cfg["num_classes"])))
    if cfg.get("batch_size"):
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        slots = max(slots, int(cfg["batch_size"]) * world)
    return max(1, min(slots, int(cfg["num_classes"])))


def build_head(cfg: Mapping[str, Any], margin_loss: Callable, **kwargs: Any) -> nn.Module:
    """Build the head named by ``cfg.head`` with arcface_torch's common keys and the head's options.

    ``memory_size`` defaults to :func:`default_memory_size` when absent. ``kwargs`` (e.g.
    ``process_group``) are passed to the constructor unchanged.
    """
    name = cfg.get("head", DEFAULT_HEAD) or DEFAULT_HEAD
    cls = get_head_class(name)
    for key in ("embedding_size", "num_classes"):
        if cfg.get(key) is None:
            raise ValueError(f"config key {key!r} is required to build head {name!r}")
    options = head_options_from_config(cfg, name)
    sample_rate = float(cfg.get("sample_rate", 1.0))
    if "memory_size" in cls.options and options.get("memory_size") is None:
        options["memory_size"] = default_memory_size(cfg, sample_rate)
    return cls(
        margin_loss,
        int(cfg["embedding_size"]),
        int(cfg["num_classes"]),
        sample_rate=sample_rate,
        fp16=bool(cfg.get("fp16", False)),
        **options,
        **kwargs,
    )
