"""A small CPU backbone (``tiny``) for tests and CPU demos.

Four strided 3x3 Conv-BN-PReLU stages (3 -> 16 -> 32 -> 64 -> 128 channels), an adaptive average pool
to a fixed 4x4 grid so any input size from 16x16 up works (32x32, 56x56, 112x112, ...), then the same
embedding tail as IResNet: BatchNorm2d, dropout, fc, BatchNorm1d ``features`` with a frozen weight.
About 0.03 GFLOP (multiply-adds) at 112x112.
"""
from __future__ import annotations

import torch
from torch import nn

from .precision import trunk_autocast

TINY_WIDTHS = (16, 32, 64, 128)
POOL_SIZE = 4


def _conv_bn_prelu(in_c: int, out_c: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_c, out_c, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_c),
        nn.PReLU(out_c),
    )


class TinyFaceNet(nn.Module):
    """Four-stage conv net mapping ``(B, 3, H, W)`` images (H, W >= 16) to ``(B, num_features)``."""

    def __init__(self, dropout: float = 0.0, fp16: bool = False, num_features: int = 512) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.fp16 = fp16
        stages, in_c = [], 3
        for out_c in TINY_WIDTHS:
            stages += [_conv_bn_prelu(in_c, out_c, stride=2), _conv_bn_prelu(out_c, out_c, stride=1)]
            in_c = out_c
        self.body = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(POOL_SIZE)
        self.bn2 = nn.BatchNorm2d(in_c)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_c * POOL_SIZE * POOL_SIZE, num_features)
        self.features = nn.BatchNorm1d(num_features)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < 16:
            raise ValueError(f"tiny backbone expects (B, 3, H, W) with H, W >= 16, got {tuple(x.shape)}")
        with trunk_autocast(x, self.fp16):
            x = self.bn2(self.pool(self.body(x)))
            x = self.dropout(torch.flatten(x, 1))
        x = self.fc(x.float() if self.fp16 else x)
        return self.features(x)
