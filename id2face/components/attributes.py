"""Attribute (non-identity) encoders: image + identity mask -> attribute tokens for cross-attention.

Contract: ``forward(images (N, 3, S, S) in [-1, 1], masks (N, 1, S, S) in {0, 1}) -> tokens
(N, num_tokens, C)``, C = ``context_dim`` (runtime fact). The tokens carry what the generator must
keep (pose, expression, hair, light, background); identity must come from the identity latent.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ATTRIBUTE_ENCODERS
from .norms import use_low_precision_norms


@ATTRIBUTE_ENCODERS.register("none")
class NullAttributeEncoder(nn.Module):
    """Null variant: one all-zero token (the generator then sees only the identity tokens and the
    masked image it inpaints)."""

    def __init__(self, context_dim: int):
        super().__init__()
        self.context_dim = int(context_dim)
        self.num_tokens = 1

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return images.new_zeros(images.shape[0], self.num_tokens, self.context_dim)


def _num_heads(width: int) -> int:
    # Heads of at least 32 channels, dividing the width.
    return next(h for h in (8, 4, 2, 1) if width % h == 0 and (width // h >= 32 or h == 1))


class _ConvTokenEncoder(nn.Module):
    """Conv trunk (stem + ``depth`` stride-2 blocks) -> ``grid`` x ``grid`` feature map ->
    ``num_tokens`` learned queries attending over it -> LayerNorm -> (N, num_tokens, C).

    The input has four channels: the RGB image (identity region zeroed if ``hide_identity``) and
    the mask, so the network knows where the hidden region is. ``input_size``: larger inputs are
    area-downsampled to it first (after the masking, so the blind spot stays exact). Pose,
    expression, hair and light are coarse; at 512 px the trunk's first level alone (fp32 GroupNorm
    maps of 32 channels) holds more activation memory than the rest of the conditioning.
    ``low_precision_norms``: its GroupNorms and LayerNorm in the autocast dtype (``norms.py``).
    """

    def __init__(self, context_dim: int, num_tokens: int, width: int, depth: int, grid: int,
                 hide_identity: bool, input_size: int | None = None, low_precision_norms: bool = False):
        super().__init__()
        self.context_dim, self.num_tokens = int(context_dim), int(num_tokens)
        self.hide_identity = hide_identity
        self.input_size = None if input_size is None else int(input_size)
        channels = [max(width >> (depth - i), 8) for i in range(depth + 1)]
        blocks = [nn.Conv2d(4, channels[0], 3, padding=1)]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks += [nn.GroupNorm(math.gcd(8, c_in), c_in), nn.SiLU(),
                       nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)]
        blocks += [nn.GroupNorm(math.gcd(8, channels[-1]), channels[-1]), nn.SiLU()]
        self.trunk = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.proj_in = nn.Linear(channels[-1], width)
        self.position = nn.Parameter(torch.randn(grid * grid, width) * 0.02)
        self.queries = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.attend = nn.MultiheadAttention(width, _num_heads(width), batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, context_dim)
        if low_precision_norms:
            use_low_precision_norms(self)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        masks = masks.to(images.dtype)
        visible = images * (1 - masks) if self.hide_identity else images
        x = torch.cat([visible, masks], dim=1)
        if self.input_size is not None and max(x.shape[-2:]) > self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area")
        features = self.pool(self.trunk(x))  # (N, c, g, g)
        features = self.proj_in(features.flatten(2).transpose(1, 2)) + self.position
        queries = self.queries.unsqueeze(0).expand(images.shape[0], -1, -1)
        tokens, _ = self.attend(queries, features, features, need_weights=False)
        return self.proj_out(self.norm(tokens + queries))


@ATTRIBUTE_ENCODERS.register("masked")
class MaskedAttributeEncoder(_ConvTokenEncoder):
    """Identity-masked attribute encoder: sees ``images * (1 - masks)`` and the mask, so nothing
    inside the identity region can reach the tokens (the output is exactly invariant to it).
    ``hide_identity: false`` is the masking ablation with every other param of the run kept
    (``ablations/attributes_unmasked.yaml``)."""

    def __init__(self, context_dim: int, num_tokens: int = 16, width: int = 256, depth: int = 3, grid: int = 8,
                 input_size: int | None = 256, hide_identity: bool = True, low_precision_norms: bool = False):
        super().__init__(context_dim, num_tokens, width, depth, grid, hide_identity=bool(hide_identity),
                         input_size=input_size, low_precision_norms=low_precision_norms)


@ATTRIBUTE_ENCODERS.register("unmasked")
class UnmaskedAttributeEncoder(_ConvTokenEncoder):
    """Ablation: the same network as ``masked`` but it sees the full image (identity can leak)."""

    def __init__(self, context_dim: int, num_tokens: int = 16, width: int = 256, depth: int = 3, grid: int = 8,
                 input_size: int | None = 256, low_precision_norms: bool = False):
        super().__init__(context_dim, num_tokens, width, depth, grid, hide_identity=False, input_size=input_size,
                         low_precision_norms=low_precision_norms)
