"""Parity of our backbones with an arcface_torch checkout's ``backbones`` package.

For one name: build arcface_torch's model, estimate its BatchNorm statistics on random inputs (so
that deep nets such as ``r2060`` give finite, unit-scale embeddings), load its state_dict into ours
with ``strict=True`` and compare eval-mode outputs on the same random input. Optionally also in
training mode: with the same seed both models must draw the same masks and drop-path decisions,
so outputs and parameter gradients agree too.

Only one copy of the weights is held at a time: ours is built on the meta device and takes the
peer's tensors with ``assign=True`` after the peer model is released, so ``r2060`` (~1.1e9
parameters) fits in about 5 GiB for an eval-only comparison.

arcface_torch's ``vit.py`` imports ``DropPath``, ``to_2tuple`` and ``trunc_normal_`` from
``timm.models.layers``. Where timm cannot be imported (its package needs torchvision),
:func:`provide_timm_layers` registers a ``timm.models.layers`` module with those three names:
taken from timm's own source files when the package is on disk (they only need torch), else
minimal stand-ins. They only act in training mode and at initialisation, which the state_dict
overrides, so eval-mode parity does not depend on them.
"""
from __future__ import annotations

import collections.abc
import importlib.util
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

IMAGE_SHAPE = (3, 112, 112)
PEER_PACKAGE = "_arcface_torch_backbones"


@dataclass
class ParityResult:
    """One name's comparison; ``None`` where a figure was not computed."""

    name: str
    params: int | None
    strict_load: bool
    eval_max_abs_diff: float | None = None
    output_max_abs: float | None = None
    train_max_abs_diff: float | None = None
    grad_max_rel_diff: float | None = None
    error: str = ""


def _load_file_module(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _minimal_timm_layers() -> dict:
    from .vit import DropPath

    def to_2tuple(x):
        if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
            return tuple(x)
        return (x, x)

    return {"DropPath": DropPath, "to_2tuple": to_2tuple, "trunc_normal_": nn.init.trunc_normal_}


def provide_timm_layers() -> str:
    """Make ``from timm.models.layers import DropPath, to_2tuple, trunc_normal_`` work; says how."""
    try:
        from timm.models.layers import DropPath, to_2tuple, trunc_normal_  # noqa: F401
        return "timm"
    except Exception:  # noqa: BLE001 - a broken timm install fails in many ways
        pass
    for key in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
        del sys.modules[key]
    spec = importlib.util.find_spec("timm")
    layers_dir = Path(spec.origin).parent / "layers" if spec and spec.origin else None
    if layers_dir is not None and all((layers_dir / f).is_file() for f in ("drop.py", "helpers.py", "weight_init.py")):
        names = {
            "DropPath": _load_file_module("_timm_layers_drop", layers_dir / "drop.py").DropPath,
            "to_2tuple": _load_file_module("_timm_layers_helpers", layers_dir / "helpers.py").to_2tuple,
            "trunc_normal_": _load_file_module("_timm_layers_init", layers_dir / "weight_init.py").trunc_normal_,
        }
        source = f"timm source files ({layers_dir})"
    else:
        names = _minimal_timm_layers()
        source = "built-in stand-ins (training-mode comparison is then not independent)"
    timm, models, layers = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers"))
    layers.__dict__.update(names)
    timm.models, models.layers = models, layers
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})
    return source


def load_peer_backbones(root: str | Path) -> types.ModuleType:
    """Import ``<root>/backbones`` (an arcface_torch checkout) as a package of its own name."""
    root = Path(root)
    init = root / "backbones" / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"{init} not found: expected the recognition/arcface_torch folder of a checkout")
    provide_timm_layers()
    if PEER_PACKAGE in sys.modules:
        return sys.modules[PEER_PACKAGE]
    spec = importlib.util.spec_from_file_location(PEER_PACKAGE, init, submodule_search_locations=[str(init.parent)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PEER_PACKAGE] = package
    try:
        spec.loader.exec_module(package)
    except Exception:
        del sys.modules[PEER_PACKAGE]
        raise
    return package


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batch: int = 4, seed: int = 0) -> nn.Module:
    """Set every BatchNorm's running statistics to those of one training-mode pass on random inputs."""
    for bn in _batchnorms(model):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one pass gives that batch's statistics
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    model(torch.rand(batch, *IMAGE_SHAPE, generator=generator) * 2 - 1)
    for bn in _batchnorms(model):
        bn.momentum = 0.1
    return model.eval()


def _train_step(model: nn.Module, x: torch.Tensor, probe: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    """Training-mode output and parameter gradients of ``<output, probe>`` with the RNG at ``seed``."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    (out * probe).sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def compare_backbone(peers: types.ModuleType, name: str, num_features: int = 512, batch: int = 2,
                     seed: int = 0, train: bool = True, calibration_batch: int = 4) -> ParityResult:
    """Compare arcface_torch's ``name`` (from :func:`load_peer_backbones`) with ours."""
    from . import get_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # checkpoint and autocast warnings of the peer's code on CPU
        torch.manual_seed(seed)
        peer = peers.get_model(name, dropout=0.0, fp16=False, num_features=num_features)
        calibrate_batchnorm(peer, calibration_batch, seed)
        generator = torch.Generator().manual_seed(seed + 1)
        x = torch.rand(batch, *IMAGE_SHAPE, generator=generator) * 2 - 1
        probe = torch.randn(batch, num_features, generator=generator)
        with torch.no_grad():
            expected = peer(x)
        state = peer.state_dict()
        if train:
            state = {k: v.clone() for k, v in state.items()}
            peer_train, peer_grads = _train_step(peer, x, probe, seed + 2)
        del peer

        with torch.device("meta"):
            ours = get_model(name, dropout=0.0, fp16=False, num_features=num_features)
        try:
            ours.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            return ParityResult(name, None, False, error=str(err).splitlines()[0])
        del state
        result = ParityResult(name, sum(p.numel() for p in ours.parameters()), True)
        with torch.no_grad():
            got = ours.eval()(x)
        result.eval_max_abs_diff = float((got - expected).abs().max())
        result.output_max_abs = float(expected.abs().max())
        if train:
            ours_train, our_grads = _train_step(ours, x, probe, seed + 2)
            result.train_max_abs_diff = float((ours_train - peer_train).abs().max())
            if set(our_grads) != set(peer_grads):
                result.error = f"parameters with gradients differ: {sorted(set(our_grads) ^ set(peer_grads))[:4]}"
            else:
                result.grad_max_rel_diff = max(
                    float((our_grads[k] - g).abs().max() / g.abs().max().clamp_min(1e-30))
                    for k, g in peer_grads.items()
                )
    return result


def format_table(results: list[ParityResult]) -> str:
    """Fixed-width text table of :class:`ParityResult` rows."""
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    header = f"{'name':<22} {'params':>14} {'strict':>6} {'eval max|diff|':>14} {'max|out|':>9} " \
             f"{'train max|diff|':>15} {'grad rel diff':>13}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.name:<22} {fmt(r.params, ',d'):>14} {('OK' if r.strict_load else 'FAIL'):>6} "
                     f"{fmt(r.eval_max_abs_diff, '.3e'):>14} {fmt(r.output_max_abs, '.2f'):>9} "
                     f"{fmt(r.train_max_abs_diff, '.3e'):>15} {fmt(r.grad_max_rel_diff, '.3e'):>13}"
                     + (f"  {r.error}" if r.error else ""))
    return "\n".join(lines)
