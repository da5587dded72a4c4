"""Vision Transformer backbones (``vit_*``) with arcface_torch's parameter names.

Structure (input 3x112x112): a 9x9 stride-9 patch embedding to a 12x12 grid of tokens (the last
4 pixel rows and columns are not seen), a learned position embedding, ``depth`` pre-norm blocks
(multi-head self-attention without qkv bias, a ReLU6 MLP of 4x width, stochastic depth with rates
rising linearly from 0 in the first block to ``drop_path_rate`` in the last), a final LayerNorm,
and a head on all tokens flattened: Linear to ``embed_dim``, BatchNorm1d, Linear to
``num_features``, BatchNorm1d (both Linear without bias, BatchNorm eps 2e-5).

In training, with ``mask_ratio > 0``, a random share of each sample's tokens skips the blocks and
is put back as the learned ``mask_token`` after the final norm; with ``using_checkpoint`` the
blocks run under gradient checkpointing.

Precision: like arcface_torch, on CUDA the qkv and output projections and the MLP branch always run
under float16 autocast (whatever ``fp16`` says) with the attention product and softmax in
float32, while on CPU the whole model stays float32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .precision import cuda_autocast

IMAGE_SIZE = 112
PATCH_SIZE = 9
HEAD_BN_EPS = 2e-5
INIT_STD = 0.02


@dataclass(frozen=True)
class ViTSpec:
    """Hyper-parameters of a named ViT."""

    embed_dim: int
    depth: int
    num_heads: int
    drop_path_rate: float
    mask_ratio: float
    using_checkpoint: bool = False


#: arcface_torch's ViT names. For the two ``_mask_005`` names arcface_torch configures a ratio of
#: 0.05 but its forward pass masks with its masking routine's default share, 0.1; the share given
#: here is the one those models are trained with.
VIT_SPECS: dict[str, ViTSpec] = {
    "vit_t": ViTSpec(256, 12, 8, 0.1, 0.1),
    "vit_t_dp005_mask0": ViTSpec(256, 12, 8, 0.05, 0.0),
    "vit_s": ViTSpec(512, 12, 8, 0.1, 0.1),
    "vit_s_dp005_mask_0": ViTSpec(512, 12, 8, 0.05, 0.0),
    "vit_b": ViTSpec(512, 24, 8, 0.1, 0.1, using_checkpoint=True),
    "vit_b_dp005_mask_005": ViTSpec(512, 24, 8, 0.05, 0.1, using_checkpoint=True),
    "vit_l_dp005_mask_005": ViTSpec(768, 24, 8, 0.05, 0.1, using_checkpoint=True),
    "vit_h": ViTSpec(1024, 48, 8, 0.1, 0.0, using_checkpoint=True),
}


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's branch with probability ``p``, else scale by 1/(1-p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches of an ``img_size`` image, projected to ``embed_dim`` tokens."""

    def __init__(self, img_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE, in_channels: int = 3,
                 embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; qkv without bias, output projection with bias."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with cuda_autocast(x, True):
            qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        with cuda_autocast(x, False):
            q, k, v = qkv.to(torch.promote_types(qkv.dtype, torch.float32)).unbind(0)
            weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            out = (weights @ v).transpose(1, 2).flatten(2).to(x.dtype)
        with cuda_autocast(x, True):
            return self.proj(out)


class Mlp(nn.Module):
    """Linear, ReLU6, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, each with drop path."""

    def __init__(self, dim: int, num_heads: int, drop_path: float = 0.0, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        with cuda_autocast(x, True):
            return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT for 112x112 aligned faces, producing a ``num_features``-dimensional embedding."""

    def __init__(self, embed_dim: int = 512, depth: int = 12, num_heads: int = 8, num_features: int = 512,
                 drop_path_rate: float = 0.0, mask_ratio: float = 0.0, using_checkpoint: bool = False,
                 mlp_ratio: float = 4.0, img_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.using_checkpoint = using_checkpoint
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim=embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        rates = torch.linspace(0.0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, rate, mlp_ratio) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=HEAD_BN_EPS),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=HEAD_BN_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._initialize_weights()

    @property
    def ddp_find_unused_parameters(self) -> bool:
        """Without masking the mask token takes no part in training: DDP must not wait for its gradient."""
        return self.mask_ratio == 0

    def _initialize_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        nn.init.normal_(self.mask_token, std=INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=INIT_STD)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _keep_random_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep ``int(L * (1 - mask_ratio))`` random tokens per sample; returns them and their indices."""
        batch, length, dim = x.shape
        n_keep = int(length * (1 - self.mask_ratio))
        kept = torch.rand(batch, length, device=x.device).argsort(dim=1)[:, :n_keep]
        return x.gather(1, kept.unsqueeze(-1).expand(-1, -1, dim)), kept

    def _restore_tokens(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Put the kept tokens back in place, the mask token everywhere else."""
        batch, _, dim = x.shape
        full = self.mask_token.to(x.dtype).expand(batch, self.num_patches, dim)
        return full.scatter(1, kept.unsqueeze(-1).expand(-1, -1, dim), x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm, flattened to ``(B, num_patches * embed_dim)``."""
        x = self.patch_embed(x) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, kept = self._keep_random_tokens(x)
        use_checkpoint = self.using_checkpoint and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        x = self.norm(x.to(self.norm.weight.dtype))
        if masking:
            x = self._restore_tokens(x, kept)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.forward_features(x))


def build_vit(name: str, dropout: float = 0.0, fp16: bool = False, num_features: int = 512,
        **kwargs) -> VisionTransformer:
    """Build the ViT named ``name`` (one of :data:`VIT_SPECS`); keyword arguments override its spec.

    ``fp16`` is accepted for arcface_torch's calling convention and has no effect (see the module
    docstring); the ViTs have no dropout layer, so a non-zero ``dropout`` is rejected.
    """
    if name not in VIT_SPECS:
        raise ValueError(f"unknown ViT {name!r}; valid: {sorted(VIT_SPECS)}")
    if dropout:
        raise ValueError(f"backbone {name!r} has no dropout layer; got dropout={dropout}")
    del fp16
    return VisionTransformer(num_features=num_features, **{**asdict(VIT_SPECS[name]), **kwargs})
