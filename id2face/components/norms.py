"""Norm layers that run in the autocast dtype under autocast (``low_precision_norms`` switches).

CUDA's autocast runs every GroupNorm and LayerNorm in fp32, with a cast from the bf16 activations
before it and back after it, forward and backward: memory-bound passes that are a fifth of the
bytes of a bf16 SD-1.5 training step. These subclasses compute in the autocast dtype instead
(PyTorch's kernels still accumulate the statistics in fp32; the parameters stay fp32 for the
optimizer and are cast per call). Without autocast they are the stock layers. Not the same
numbers as autocast's, so every use is a switch, off by default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import active_autocast_dtype, autocast_off


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)


class _AutocastDtypeNorm:
    """Mixin before a norm class: under autocast, ``_norm`` in the autocast dtype, autocast off."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = active_autocast_dtype(x.device.type)
        if dtype is None:
            return super().forward(x)
        with autocast_off(x.device.type):
            return self._norm(x.to(dtype), _cast(self.weight, dtype), _cast(self.bias, dtype))


class AutocastDtypeGroupNorm(_AutocastDtypeNorm, nn.GroupNorm):
    def _norm(self, x, weight, bias):
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


class AutocastDtypeLayerNorm(_AutocastDtypeNorm, nn.LayerNorm):
    def _norm(self, x, weight, bias):
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


# Exact types only: a subclass with a forward of its own keeps it.
_LOW_PRECISION = {nn.GroupNorm: AutocastDtypeGroupNorm, nn.LayerNorm: AutocastDtypeLayerNorm}


def use_low_precision_norms(module: nn.Module) -> int:
    """Switch every plain ``nn.GroupNorm`` / ``nn.LayerNorm`` in ``module`` to its autocast-dtype
    subclass in place (same parameters, same names); returns how many."""
    switched = 0
    for child in module.modules():
        low = _LOW_PRECISION.get(type(child))
        if low is not None:
            child.__class__ = low
            switched += 1
    return switched
