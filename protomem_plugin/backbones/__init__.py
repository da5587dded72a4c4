"""Face-recognition backbones under arcface_torch's names: ``get_model("r50", num_features=512)``."""
from __future__ import annotations

from torch import nn

from .iresnet import IRESNET_LAYERS, IBasicBlock, IResNet, iresnet
from .mobilefacenet import MobileFaceNet
from .tiny import TinyFaceNet

BACKBONE_NAMES: tuple[str, ...] = (*IRESNET_LAYERS, "mbf", "tiny")

__all__ = ["BACKBONE_NAMES", "IBasicBlock", "IResNet", "MobileFaceNet", "TinyFaceNet", "get_model"]


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a backbone by arcface_torch name.

    ``name``: one of ``r18 r34 r50 r100 r200 mbf tiny``. Keyword arguments as in arcface_torch:
    ``dropout=0.0``, ``fp16=False``, ``num_features=512``; IResNets also take ``zero_init_residual``,
    ``mbf`` also ``blocks`` and ``scale``. ``mbf`` has no dropout layer, so a non-zero ``dropout`` is
    rejected rather than ignored.
    """
    if name in IRESNET_LAYERS:
        return iresnet(name, **kwargs)
    if name == "mbf":
        dropout = kwargs.pop("dropout", 0.0)
        if dropout:
            raise ValueError(f"backbone 'mbf' has no dropout layer; got dropout={dropout}")
        return MobileFaceNet(**kwargs)
    if name == "tiny":
        return TinyFaceNet(**kwargs)
    raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONE_NAMES)}")
