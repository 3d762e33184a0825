"""Numeric precision of sampling outside the Lightning Trainer (``id2face anonymize``, ``id2face eval``
and a sweep task's evaluation).

Names are Lightning's ``trainer.precision`` values. By default a checkpoint samples on a GPU in the
precision it was trained in (what its validation images were made with: bf16 autocast for the
paper-scale config, several times faster than fp32 on tensor cores) and in fp32 on a CPU, where
reduced-precision autocast is rarely faster.
"""
from __future__ import annotations

import contextlib

from .errors import UserError

# torch is imported inside the functions: the CLI's parsers read the choices (``id2face --help`` stays fast).
INFERENCE_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
PRECISION_CHOICES = ("auto", *INFERENCE_PRECISIONS)
_AUTOCAST_DTYPES = {"32-true": None, "bf16-mixed": "bfloat16", "16-mixed": "float16"}
# Training precisions -> the sampling precision that matches them (weights stay fp32 at inference;
# autocast gives the half-precision arithmetic of a "-true" run).
_FROM_TRAINING = {"32": "32-true", "32-true": "32-true", "64": "32-true", "64-true": "32-true",
                  "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-mixed",
                  "16": "16-mixed", "16-mixed": "16-mixed", "16-true": "16-mixed"}


def resolve_precision(requested: str | None, device, trained: str | int | None) -> str:
    """``requested`` (None or "auto": ``trained`` on CUDA, fp32 elsewhere) -> one of
    ``INFERENCE_PRECISIONS``; anything else is a one-line UserError."""
    import torch

    if requested in (None, "auto"):
        if torch.device(device).type != "cuda":
            return "32-true"
        return _FROM_TRAINING.get(str(trained), "32-true")
    if requested not in INFERENCE_PRECISIONS:
        raise UserError(f"precision {requested!r}: valid: auto, {', '.join(INFERENCE_PRECISIONS)}")
    return requested


def autocast(precision: str, device):
    """The context to sample in: ``torch.autocast`` for the mixed precisions, nothing for fp32."""
    import torch

    dtype = _AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))


def active_autocast_dtype(device_type: str):
    """The dtype an enclosing ``torch.autocast`` on ``device_type`` computes in, or None."""
    import torch

    if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_off(device_type: str):
    """Autocast disabled for code that must run in its inputs' dtype; nothing to disable on a device
    without autocast (``meta``: the benchmarks' shape-only and host-overhead runs)."""
    import torch

    if _autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast_available(device_type: str) -> bool:
    # Dynamo of torch 2.11 cannot trace torch.amp.is_autocast_available: every harmonizer and
    # low-precision norm broke the compiled UNet's graph, and its blocks were recompiled until
    # dynamo gave up (anonymize --compile on an H100, 2026-11-27). Compiled code runs on devices
    # with autocast; only the uncompiled meta-device runs need the question asked.
    import torch

    return torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)
