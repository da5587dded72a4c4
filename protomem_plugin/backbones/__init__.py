"""Face-recognition backbones under arcface_torch's names: ``get_model("r50", num_features=512)``."""
from __future__ import annotations

from torch import nn

from .iresnet import IRESNET_LAYERS, IBasicBlock, IResNet, iresnet
from .mobilefacenet import MBF_CONFIGS, MobileFaceNet
from .tiny import TinyFaceNet
from .vit import VIT_SPECS, VisionTransformer, build_vit

BACKBONE_NAMES: tuple[str, ...] = (*IRESNET_LAYERS, *MBF_CONFIGS, *VIT_SPECS, "tiny")

__all__ = ["BACKBONE_NAMES", "IBasicBlock", "IResNet", "MobileFaceNet", "TinyFaceNet", "VisionTransformer",
           "get_model"]


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a backbone by arcface_torch name.

    ``name``: one of :data:`BACKBONE_NAMES` (IResNets ``r18 r34 r50 r100 r200 r2060``, MobileFaceNets
    ``mbf mbf_large``, the ViTs of :data:`~protomem_plugin.backbones.vit.VIT_SPECS`, and ``tiny``).
    Keyword arguments as in arcface_torch: ``dropout=0.0``, ``fp16=False``, ``num_features=512``;
    IResNets also take ``zero_init_residual`` and ``checkpoint_segments``, MobileFaceNets ``blocks``
    and ``scale``, ViTs the fields of their spec. MobileFaceNets and ViTs have no dropout layer, so a
    non-zero ``dropout`` is rejected rather than ignored; the ViTs ignore ``fp16`` (they always run
    their projections and MLPs under float16 autocast on CUDA, as arcface_torch does).
    """
    if name in IRESNET_LAYERS:
        return iresnet(name, **kwargs)
    if name in MBF_CONFIGS:
        dropout = kwargs.pop("dropout", 0.0)
        if dropout:
            raise ValueError(f"backbone {name!r} has no dropout layer; got dropout={dropout}")
        return MobileFaceNet(**{**MBF_CONFIGS[name], **kwargs})
    if name in VIT_SPECS:
        return build_vit(name, **kwargs)
    if name == "tiny":
        return TinyFaceNet(**kwargs)
    raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONE_NAMES)}")
