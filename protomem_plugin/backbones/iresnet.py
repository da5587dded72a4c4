"""Improved ResNet (IResNet) backbones with arcface_torch's layer names.

Parameter and buffer names and shapes match arcface_torch's ``backbones/iresnet.py``, so a published
arcface_torch ``model.pt`` loads into these modules with ``strict=True``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from .precision import trunk_autocast

#: Blocks per stage (layer1..layer4) of each named IResNet depth.
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
    "r2060": (3, 128, 896, 3),
}

#: Gradient-checkpointing segments per stage in training (0: none), as arcface_torch trains them.
IRESNET_CHECKPOINT_SEGMENTS: dict[str, tuple[int, int, int, int]] = {
    "r2060": (0, 20, 100, 0),
}

STAGE_WIDTHS = (64, 128, 256, 512)
BN_EPS = 1e-5


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN, conv3x3, BN, PReLU, conv3x3 (strided), BN, plus shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet for 112x112 aligned faces, producing a ``num_features``-dimensional embedding.

    With ``fp16=True`` the convolutional trunk runs under autocast (float16 on CUDA, bfloat16 on CPU)
    while ``fc`` and ``features`` run in float32, as in arcface_torch.

    ``checkpoint_segments`` gives, per stage, the number of segments for
    ``torch.utils.checkpoint.checkpoint_sequential`` in training with gradients enabled (0: the
    stage runs plainly). Checkpointing trades compute for memory; outputs and gradients are the same.
    """

    fc_scale = 7 * 7

    def __init__(self, layers: Sequence[int], dropout: float = 0.0, num_features: int = 512,
                 zero_init_residual: bool = False, fp16: bool = False,
                 checkpoint_segments: Sequence[int] = (0, 0, 0, 0)) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {list(layers)}")
        if len(checkpoint_segments) != 4 or any(int(n) < 0 for n in checkpoint_segments):
            raise ValueError(f"checkpoint_segments must be 4 counts >= 0, got {list(checkpoint_segments)}")
        self.checkpoint_segments = tuple(int(n) for n in checkpoint_segments)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.fp16 = fp16
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=BN_EPS)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_stage(STAGE_WIDTHS[0], layers[0])
        self.layer2 = self._make_stage(STAGE_WIDTHS[1], layers[1])
        self.layer3 = self._make_stage(STAGE_WIDTHS[2], layers[2])
        self.layer4 = self._make_stage(STAGE_WIDTHS[3], layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_stage(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=BN_EPS),
        )
        stage = [IBasicBlock(self.inplanes, planes, stride=2, downsample=downsample)]
        self.inplanes = planes
        stage.extend(IBasicBlock(planes, planes) for _ in range(1, blocks))
        return nn.Sequential(*stage)

    def _run_stage(self, stage: nn.Sequential, segments: int, x: torch.Tensor) -> torch.Tensor:
        if segments and self.training and torch.is_grad_enabled():
            return checkpoint_sequential(stage, segments, x, use_reentrant=False)
        return stage(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with trunk_autocast(x, self.fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            stages = (self.layer1, self.layer2, self.layer3, self.layer4)
            for stage, segments in zip(stages, self.checkpoint_segments):
                x = self._run_stage(stage, segments, x)
            x = self.bn2(x)
            x = torch.flatten(x, 1)
            x = self.dropout(x)
        x = self.fc(x.float() if self.fp16 else x)
        return self.features(x)


def iresnet(name: str, dropout: float = 0.0, fp16: bool = False, num_features: int = 512,
            **kwargs) -> IResNet:
    """Build the IResNet named ``name`` (one of :data:`IRESNET_LAYERS`).

    Names in :data:`IRESNET_CHECKPOINT_SEGMENTS` (``r2060``) checkpoint their stages in training
    unless ``checkpoint_segments`` is given.
    """
    if name not in IRESNET_LAYERS:
        raise ValueError(f"unknown IResNet {name!r}; valid: {sorted(IRESNET_LAYERS)}")
    kwargs.setdefault("checkpoint_segments", IRESNET_CHECKPOINT_SEGMENTS.get(name, (0, 0, 0, 0)))
    return IResNet(IRESNET_LAYERS[name], dropout=dropout, num_features=num_features, fp16=fp16,
                   **kwargs)
