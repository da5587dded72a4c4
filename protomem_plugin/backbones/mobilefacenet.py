"""MobileFaceNet (``mbf``) with arcface_torch's module layout and parameter names.

Structure (input 3x112x112): a strided 3x3 ConvBlock, a grouped 3x3 ConvBlock, then alternating
strided DepthWise bottlenecks and stacks of residual DepthWise bottlenecks, a 1x1 ConvBlock to 512
channels (``conv_sep``) and a global depthwise conv head (``features``, GDC) giving the embedding.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .precision import trunk_autocast

Pair = tuple[int, int]

#: arcface_torch's MobileFaceNet names: residual stack depths and width multiplier.
MBF_CONFIGS: dict[str, dict] = {
    "mbf": {"blocks": (1, 4, 6, 2), "scale": 2},
    "mbf_large": {"blocks": (2, 8, 12, 4), "scale": 4},
}


class ConvBlock(nn.Module):
    """Conv (no bias), BatchNorm, PReLU in ``self.layers``."""

    def __init__(self, in_c: int, out_c: int, kernel: Pair = (1, 1), stride: Pair = (1, 1),
                 padding: Pair = (0, 0), groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv (no bias) then BatchNorm, without activation, in ``self.layers``."""

    def __init__(self, in_c: int, out_c: int, kernel: Pair = (1, 1), stride: Pair = (1, 1),
                 padding: Pair = (0, 0), groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``groups`` channels, depthwise conv, 1x1 linear projection."""

    def __init__(self, in_c: int, out_c: int, residual: bool = False, kernel: Pair = (3, 3),
                 stride: Pair = (2, 2), padding: Pair = (1, 1), groups: int = 1) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups),
            ConvBlock(groups, groups, kernel=kernel, stride=stride, padding=padding, groups=groups),
            LinearBlock(groups, out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` residual DepthWise bottlenecks at constant width ``c``."""

    def __init__(self, c: int, num_block: int, groups: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(
            DepthWise(c, c, residual=True, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=groups)
            for _ in range(num_block)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv head: 7x7 depthwise LinearBlock, flatten, Linear (no bias), BatchNorm1d."""

    def __init__(self, embedding_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, kernel=(7, 7), groups=512),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet for 112x112 faces. ``blocks`` are the residual stack depths, ``scale`` the width.

    With ``blocks[0] == 1`` the second layer is one grouped 3x3 ConvBlock (``mbf``), otherwise a
    stack of ``blocks[0]`` residual DepthWise bottlenecks (``mbf_large``).
    """

    def __init__(self, fp16: bool = False, num_features: int = 512,
                 blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2) -> None:
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"blocks must have 4 entries, got {list(blocks)}")
        self.fp16 = fp16
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1))])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, kernel=(3, 3), padding=(1, 1), groups=64))
        else:
            self.layers.append(Residual(c1, blocks[0], groups=128))
        self.layers.extend([
            DepthWise(c1, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=128),
            Residual(c1, blocks[1], groups=128),
            DepthWise(c1, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=256),
            Residual(c2, blocks[2], groups=256),
            DepthWise(c2, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=512),
            Residual(c2, blocks[3], groups=256),
        ])
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(num_features)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with trunk_autocast(x, self.fp16):
            for layer in self.layers:
                x = layer(x)
        x = self.conv_sep(x.float() if self.fp16 else x)
        return self.features(x)
