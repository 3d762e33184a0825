"""``model.optim``: AdamW from its values, and the check of those values without a model, so that
``id2face sweep`` refuses a bad one before anything is queued (Lightning is not imported here)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .errors import UserError, one_line


def adamw(params, optim: Mapping[str, Any], fused: bool = False) -> torch.optim.AdamW:
    """AdamW with ``model.optim``'s lr, betas and weight decay; a value torch refuses (a negative lr,
    a beta outside [0, 1)) is a ``UserError`` naming them."""
    try:
        return torch.optim.AdamW(params, lr=float(optim["lr"]), betas=tuple(float(b) for b in optim["betas"]),
                                 weight_decay=float(optim["weight_decay"]), fused=fused)
    except (TypeError, ValueError, IndexError) as err:
        raise UserError(f"model.optim: {one_line(err)} (lr={optim['lr']}, betas={list(optim['betas'])}, "
                        f"weight_decay={optim['weight_decay']})") from None


def check_optim(optim: Mapping[str, Any]) -> None:
    """The values of ``model.optim`` that torch or the EMA would refuse, as one-line ``UserError``s."""
    adamw([torch.zeros(1, requires_grad=True)], optim)
    ema_decay, ema_every = float(optim["ema_decay"]), int(optim.get("ema_every", 1))
    if not 0 <= ema_decay <= 1 or ema_every < 1:
        raise UserError(f"model.optim.ema_decay must be in [0, 1] and ema_every >= 1 (optimiser steps between "
                        f"EMA updates), got {ema_decay} and {ema_every}")
