"""Head and margin registries: ``build_head(cfg, margin_loss)`` builds the head an arcface_torch
config names, ``build_margin(cfg)`` its margin loss.

``cfg.head`` picks the head (default ``"partial_fc"``). A head's own options are read from
top-level config keys of the same name, or from ``cfg.head_options`` (a dict, validated strictly).
Third-party heads register through the entry-point group ``protomem_plugin.heads`` or
:func:`register_head`.

``cfg.margin`` picks the margin loss (default ``"combined"``: arcface_torch's ``margin_list`` with
``margin_scale``; ``"adaface"``: AdaFace). A margin's options are top-level config keys it
declares. Third-party margins register through the entry-point group ``protomem_plugin.margins``
or :func:`register_margin`.
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Callable, Mapping

from torch import nn

ENTRY_POINT_GROUP = "protomem_plugin.heads"
MARGIN_ENTRY_POINT_GROUP = "protomem_plugin.margins"
DEFAULT_HEAD = "partial_fc"
DEFAULT_MARGIN = "combined"
COMMON_KEYS = ("embedding_size", "num_classes", "sample_rate", "fp16")

class _Registry:
    """Named classes of one kind (heads or margins), selected by the config key of the same name,
    with their declared ``options`` (``{key: (type, default, description)}``), the built-in ones and
    those of an entry-point group."""

    def __init__(self, kind: str, group: str, builtin: str) -> None:
        self.kind, self.group, self.builtin = kind, group, builtin
        self.classes: dict[str, type] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[type], type]:
        def decorator(cls: type) -> type:
            if name in self.classes and self.classes[name] is not cls:
                raise ValueError(f"a {self.kind} named {name!r} is already registered ({self.classes[name].__qualname__})")
            if "options" not in cls.__dict__:
                cls.options = dict(getattr(cls, "options", {}))
            self.classes[name] = cls
            return cls

        return decorator

    def load(self) -> None:
        import_module(self.builtin)  # registers the built-in classes
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for point in entry_points(group=self.group):
            cls = point.load()
            if point.name not in self.classes:
                self.register(point.name)(cls)

    def available(self) -> list[str]:
        self.load()
        return sorted(self.classes)

    def get(self, name: str) -> type:
        self.load()
        if not isinstance(name, str) or name not in self.classes:
            raise ValueError(f"unknown {self.kind} {name!r} in config key '{self.kind}'; "
                             f"valid choices: {', '.join(sorted(self.classes))}")
        return self.classes[name]

    def option_names(self) -> set[str]:
        self.load()
        return {key for cls in self.classes.values() for key in cls.options}

    def refuse_foreign_options(self, cfg: Mapping[str, Any], name: str) -> None:
        """``ValueError`` when ``cfg`` sets options that only other classes of this kind declare."""
        declared = self.get(name).options
        foreign = sorted(k for k in self.option_names() - set(declared) if cfg.get(k) is not None)
        if foreign:
            raise ValueError(
                f"config key(s) {foreign} are options of other {self.kind}s, not of {self.kind} {name!r}; "
                f"valid options: {', '.join(sorted(declared)) or '(none)'}"
            )


_HEADS = _Registry("head", ENTRY_POINT_GROUP, "protomem_plugin.heads")
_MARGINS = _Registry("margin", MARGIN_ENTRY_POINT_GROUP, "protomem_plugin.losses")


def register_head(name: str) -> Callable[[type], type]:
    """Class decorator registering a head under ``name`` (its ``options`` declare its config keys)."""
    return _HEADS.register(name)


def available_heads() -> list[str]:
    """Names of every registered head."""
    return _HEADS.available()


def get_head_class(name: str) -> type:
    """The class registered under ``name``; ``ValueError`` naming the valid choices otherwise."""
    return _HEADS.get(name)


def head_option_names() -> set[str]:
    """Every option key any registered head declares (config keys the plugin understands)."""
    return _HEADS.option_names()


def _check_type(head: str, key: str, value: Any, expected: type, default: Any, kind: str = "head") -> Any:
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
            f"config key {key!r} of {kind} {head!r} must be of type {expected.__name__}, "
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
    _HEADS.refuse_foreign_options(cfg, name)
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


# ----------------------------------------------------------------------------- margins
def register_margin(name: str) -> Callable[[type], type]:
    """Class decorator registering a margin loss under ``name``, selected by config key ``margin``.

    The class declares its config keys in ``options`` (``{key: (type, default, description)}``;
    the keys are top-level config keys, so prefix them with the margin's name). It is built by
    ``cls.from_config(cfg, **options)`` when it defines that classmethod, else ``cls(**options)``,
    with the options the config sets (type-checked). It is called as
    ``margin(logits, labels) -> scaled logits`` (arcface_torch's convention); with
    ``needs_norms = True`` also with ``norms=`` (see :mod:`protomem_plugin.losses`). Example::

        @register_margin("my_margin")
        class MyMargin(torch.nn.Module):
            options = {"my_margin_m": (float, 0.3, "the margin")}

            def __init__(self, my_margin_m: float = 0.3) -> None: ...
            def forward(self, logits, labels): ...

    Then ``config.margin = "my_margin"`` (and ``config.my_margin_m = 0.5``) selects it.
    """

    return _MARGINS.register(name)


def available_margins() -> list[str]:
    """Names of every registered margin loss."""
    return _MARGINS.available()


def get_margin_class(name: str) -> type:
    """The margin class registered under ``name``; ``ValueError`` naming the key and the valid choices otherwise."""
    return _MARGINS.get(name)


def margin_option_names() -> set[str]:
    """Every option key any registered margin declares (config keys the plugin understands)."""
    return _MARGINS.option_names()


def margin_name(cfg: Mapping[str, Any]) -> str:
    """The margin ``cfg`` selects (``"combined"`` when ``margin`` is unset or None)."""
    return cfg.get("margin") or DEFAULT_MARGIN


def margin_options_from_config(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The options of margin ``name`` set in ``cfg``, type-checked; options of other margins raise."""
    declared = get_margin_class(name).options
    _MARGINS.refuse_foreign_options(cfg, name)
    return {key: _check_type(name, key, cfg[key], expected, default, kind="margin")
            for key, (expected, default, _doc) in declared.items() if cfg.get(key) is not None}


def build_margin(cfg: Mapping[str, Any]) -> Callable:
    """Build the margin loss named by ``cfg.margin`` (default ``"combined"``) with its options.

    ``ValueError`` naming the key for an unknown margin, an option of another margin, a wrong type or
    a bad value.
    """
    name = margin_name(cfg)
    cls = get_margin_class(name)
    options = margin_options_from_config(cfg, name)
    from_config = getattr(cls, "from_config", None)
    if callable(from_config):
        return from_config(cfg, **options)
    return cls(**options)
