"""Sampling guidance (inference only): how the denoiser's predictions under several conditions are
combined into the one the sampler steps with.

Contract: ``needs_source_condition`` (the caller must also predict with the *source* identity
condition), ``needs_unconditional`` (the caller must also predict with the identity condition
dropped, as in training's identity dropout); ``combine(eps_cond, eps_source=None, eps_uncond=None)
-> eps``, all of one shape; ``unet_copies``: UNet evaluations per face and sampler step.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import GUIDANCES


class _Guidance(nn.Module):
    needs_source_condition = False
    needs_unconditional = False

    @property
    def unet_copies(self) -> int:
        return 1 + int(self.needs_source_condition) + int(self.needs_unconditional)

    def combine(self, eps_cond: torch.Tensor, eps_source: torch.Tensor | None = None,
                eps_uncond: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, eps_cond, eps_source=None, eps_uncond=None) -> torch.Tensor:
        return self.combine(eps_cond, eps_source, eps_uncond)


@GUIDANCES.register("none")
class NoGuidance(_Guidance):
    """Null variant: the prediction under the pseudo-identity condition, as is."""

    def combine(self, eps_cond, eps_source=None, eps_uncond=None):
        return eps_cond


@GUIDANCES.register("negative")
class NegativeGuidance(_Guidance):
    """The inference-intervention baseline: steer away from the source identity condition,
    ``eps_cond + scale * (eps_cond - eps_source)``."""

    needs_source_condition = True

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)

    def combine(self, eps_cond, eps_source=None, eps_uncond=None):
        if eps_source is None:
            raise ValueError("negative guidance needs eps_source (the prediction under the source identity)")
        return eps_cond + self.scale * (eps_cond - eps_source)


@GUIDANCES.register("cfg")
class ClassifierFreeGuidance(_Guidance):
    """Classifier-free guidance on the identity condition: ``eps_uncond + scale * (eps_cond -
    eps_uncond)`` (scale 1 = no guidance); the unconditional branch exists thanks to identity dropout."""

    needs_unconditional = True

    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.scale = float(scale)

    def combine(self, eps_cond, eps_source=None, eps_uncond=None):
        if eps_uncond is None:
            raise ValueError("classifier-free guidance needs eps_uncond (the prediction without identity)")
        return eps_uncond + self.scale * (eps_cond - eps_uncond)
