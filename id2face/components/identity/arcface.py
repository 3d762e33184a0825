"""ArcFace identity encoder: an IResNet with insightface arcface_torch's module and parameter
names, so that model-zoo ``backbone.pth`` files load strictly."""
from __future__ import annotations

import re

import torch
from torch import nn

from ...errors import UserError
from ...registry import IDENTITY_ENCODERS
from .base import IdentityEncoder, load_matching_state_dict, load_state_dict_file, require_weights

ARCFACE_SOURCE = (
    "the insightface arcface_torch model zoo (a `backbone.pth` per model, e.g. ms1mv3_arcface_r50_fp16, "
    "glint360k_cosface_r100_fp16_0.1)"
)
# Basic blocks per stage (arcface_torch iresnet18 ... iresnet200).
IRESNET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}
IRESNET_WIDTHS = (64, 128, 256, 512)


class IBasicBlock(nn.Module):
    """Pre-activation residual block of the "improved" ResNet: BN-conv-BN-PReLU-conv(stride)-BN,
    plus a 1x1 strided conv + BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.prelu(self.bn2(out)))
        return self.bn3(out) + shortcut


class IResNet(nn.Module):
    """arcface_torch's IResNet: (N, 3, 112, 112) normalised RGB -> (N, num_features) embedding
    (not normalised). Four stride-2 stages take 112 px to 7x7, which the ``fc`` layer flattens;
    other input sizes do not fit ``fc``."""

    fc_scale = 7 * 7

    def __init__(self, layers: tuple[int, ...], num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        in_channels = 64
        for index, (blocks, channels) in enumerate(zip(layers, IRESNET_WIDTHS), start=1):
            stage = [IBasicBlock(in_channels, channels, stride=2)]
            stage += [IBasicBlock(channels, channels) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            in_channels = channels
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)  # parameter-free; kept so the module tree matches
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet(depth: int, num_features: int = 512) -> IResNet:
    if depth not in IRESNET_LAYERS:
        raise UserError(f"arcface depth must be one of {', '.join(map(str, IRESNET_LAYERS))}; got {depth!r}")
    return IResNet(IRESNET_LAYERS[depth], num_features)


def iresnet_depth_of(state: dict) -> int | None:
    """The depth whose block counts match the ``layer{i}.{j}.`` keys of a state dict, if any."""
    blocks = [0, 0, 0, 0]
    for key in state:
        match = re.match(r"layer([1-4])\.(\d+)\.", key)
        if match:
            stage, block = int(match.group(1)) - 1, int(match.group(2))
            blocks[stage] = max(blocks[stage], block + 1)
    return next((depth for depth, layers in IRESNET_LAYERS.items() if tuple(blocks) == layers), None)


@IDENTITY_ENCODERS.register("arcface")
class ArcFaceEncoder(IdentityEncoder):
    """ArcFace recogniser (IResNet-18/34/50/100/200, 512-d) from an arcface_torch ``backbone.pth``.

    Input: RGB NCHW in [-1, 1], any size (resized to 112 px, the network's only size).
    arcface_torch normalises RGB as ``(x01 - 0.5) / 0.5``. Output: unit embeddings (N, 512).
    ``weights: null`` is an error unless ``allow_random_init: true``.
    """

    embed_dim = 512
    input_size = 112
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, weights: str | None = None, depth: int = 50, allow_random_init: bool = False):
        super().__init__()
        require_weights(weights, allow_random_init, "arcface", ARCFACE_SOURCE)
        self.depth = depth
        self.net = iresnet(depth, self.embed_dim)
        if weights is not None:
            state = load_state_dict_file(weights, "arcface", ARCFACE_SOURCE)
            found = iresnet_depth_of(state)
            hint = f" (the file holds an iresnet{found}: set depth: {found})" if found not in (None, depth) else ""
            load_matching_state_dict(self.net, state, f"arcface iresnet{depth}", weights, hint)
        self.freeze()

    def weights_module(self) -> nn.Module:
        return self.net  # the file is an arcface_torch ``backbone.pth``: the IResNet's own keys

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
