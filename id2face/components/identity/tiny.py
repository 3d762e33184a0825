"""Tiny identity encoder: a small CNN for the CPU profile, trained by ``id2face train-encoder``."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ...errors import UntrainedWeightsWarning
from ...registry import IDENTITY_ENCODERS
from .base import IdentityEncoder, load_matching_state_dict, load_state_dict_file

TINY_SOURCE = "`id2face train-encoder CONFIG -o FILE.pt` (trains it on the configured dataset's identities)"
# Seed of the untrained initialisation: every process builds the same untrained encoder.
TINY_INIT_SEED = 0


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


@IDENTITY_ENCODERS.register("tiny")
class TinyIdentityEncoder(IdentityEncoder):
    """Three stages of two 3x3 conv-BN-ReLU blocks (widths w, 2w, 4w; 2x2 max-pool between stages),
    global average pool, linear projection.

    Input: RGB NCHW in [-1, 1], any size (resized to ``input_size``). Output: unit embeddings
    ``(N, embed_dim)``. ``weights``: a state-dict file written by ``id2face train-encoder`` with the
    same ``embed_dim`` / ``width``. Without it the network is a deterministic random init (the same
    in every process), which is only good for tests: it warns. Frozen, hence BatchNorm always uses
    its running statistics; ``train-encoder`` switches the submodules to training mode itself.
    """

    def __init__(self, embed_dim: int = 64, width: int = 16, input_size: int = 32,
                 weights: str | None = None):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.input_size = int(input_size)
        self.width = int(width)
        # fork_rng: a seeded init that leaves the caller's global RNG stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_INIT_SEED)
            self.features = nn.Sequential(
                *_conv_block(3, width), *_conv_block(width, width), nn.MaxPool2d(2),
                *_conv_block(width, 2 * width), *_conv_block(2 * width, 2 * width), nn.MaxPool2d(2),
                *_conv_block(2 * width, 4 * width), *_conv_block(4 * width, 4 * width),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(4 * width, embed_dim)
        if weights is not None:
            state = load_state_dict_file(weights, "tiny identity encoder", TINY_SOURCE)
            load_matching_state_dict(
                self, state, "tiny identity encoder", weights,
                f" (it must be trained with the same params: embed_dim={embed_dim}, width={width})",
            )
        else:
            warnings.warn(
                "tiny identity encoder has no weights: using an untrained deterministic init "
                f"(tests only); train one with {TINY_SOURCE} and set its `weights`",
                UntrainedWeightsWarning, stacklevel=2,
            )
        self.freeze()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))
