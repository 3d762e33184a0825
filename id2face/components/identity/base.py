"""The identity-encoder contract shared by every variant."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import MissingWeightsError, UserError


class IdentityEncoder(nn.Module):
    """Frozen face-identity embedder.

    Contract: ``forward(images)`` takes RGB NCHW images in [-1, 1] of any square size and returns
    L2-normalised embeddings ``(N, embed_dim)``. The encoder owns its preprocessing (resize to
    ``input_size``, its own normalisation), stays in eval mode and has no trainable parameters,
    but gradients flow to the input (the training losses differentiate through it).
    Subclasses implement ``embed(x)`` on preprocessed ``(N, 3, input_size, input_size)`` tensors.
    """

    embed_dim: int
    input_size: int
    # per-channel normalisation applied after mapping [-1, 1] -> [0, 1]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=images.shape[-1] > self.input_size)
        x = (images + 1) / 2
        return (x - _channel_vector(self.mean, x)) / _channel_vector(self.std, x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(self.preprocess(images)), dim=-1)

    def weights_module(self) -> nn.Module:
        """The module whose ``state_dict()`` the ``weights`` file holds and loads into: the whole
        encoder, unless a wrapper loads its file into an inner network (then it overrides this).
        ``train-encoder`` trains exactly this module and writes its state, so the file it writes is
        what ``weights`` takes."""
        return self

    def weights_state_dict(self) -> dict[str, torch.Tensor]:
        """This encoder's state in the layout its ``weights`` parameter loads: detached, on CPU
        (sharing storage with the parameters there, as ``state_dict()`` does)."""
        return {k: v.detach().cpu() for k, v in self.weights_module().state_dict().items()}

    def freeze(self) -> "IdentityEncoder":
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "IdentityEncoder":
        # Frozen: BatchNorm/Dropout must not change behaviour when the parent calls .train().
        return super().train(False)


def _channel_vector(values, like: torch.Tensor) -> torch.Tensor:
    """(1, C, 1, 1) of ``values`` on ``like``'s device, filled there: ``new_tensor(values)`` would be
    a host-to-device copy, i.e. a host-device synchronisation in every training step."""
    out = like.new_empty(1, len(values), 1, 1)
    for channel, value in enumerate(values):
        out[:, channel] = value
    return out


def load_state_dict_file(path: str | Path | None, what: str, source: str) -> dict:
    """Read a local state-dict file (``torch.save`` format), unwrapping common containers."""
    if path is None or not Path(path).is_file():
        raise MissingWeightsError(what, path, source)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{what} weights at {path} cannot be read as a torch state dict: {err}") from None
    for key in ("state_dict", "model", "net"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{what} weights at {path} are not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_matching_state_dict(module: nn.Module, state: dict, what: str, path, hint: str = "") -> None:
    """``module.load_state_dict(state, strict=True)``, but a file of another architecture raises a
    one-line UserError that counts the missing / unexpected / mis-shaped keys and shows a few."""
    own = module.state_dict()
    state = dict(state)
    for key, value in own.items():
        # Files written before BatchNorm had this buffer (or stripped of it) are still complete.
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {_shape(state[k])} vs {_shape(own[k])}"
        for k in own
        if k in state and _shape(state[k]) != _shape(own[k])
    ]
    problems = [
        f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches, file vs model", mismatched))
        if keys
    ]
    if problems:
        raise UserError(f"{what} weights at {path} do not fit the model: {'; '.join(problems)}{hint}")
    module.load_state_dict(state, strict=True)


def _shape(value) -> tuple | str:
    return tuple(value.shape) if torch.is_tensor(value) else type(value).__name__


def require_weights(weights, allow_random_init: bool, what: str, source: str) -> None:
    """A recognizer without its trained weights embeds noise; training on it would silently learn
    nothing about identity, so ``weights: null`` needs an explicit ``allow_random_init: true``."""
    if weights is None and not allow_random_init:
        error = MissingWeightsError(what, "null", source)
        error.args = (f"{error} (allow_random_init: true builds it untrained, for tests and benchmarks only)",)
        raise error
    if weights is not None and not Path(weights).is_file():
        raise MissingWeightsError(what, weights, source)
