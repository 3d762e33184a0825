"""The FLOPs of one training step, counted on a meta-device copy of the model (nothing is computed
or allocated, the model is left as it was).

A training run's logged MFU (``training.TrainingThroughput``) and the benchmarks'
(``benchmarks/train_step.py``, ``ablation_costs.py``) count with the same function.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step (forward + backward) as ``FlopCounterMode`` counts them (matmuls,
    convolutions, attention), in all and by the model's top-level modules."""

    total: int
    by_role: dict[str, int]


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its parameters and buffers on the meta device: only the Python
    structure is copied, no weight, and the original is not touched (diffusers' schedulers, for
    one, move their tables to the device of what they are given). Compiled submodules run eagerly
    in the copy: their compiled code calls the original."""
    memo: dict[int, Any] = {}
    for param in module.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in module.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    copied = copy.deepcopy(module, memo)
    for sub in copied.modules():
        # nn.Module.compile keeps the compiled wrapper of the *original's* call here.
        if getattr(sub, "_compiled_call_impl", None) is not None:
            sub._compiled_call_impl = None
    return copied


def _on_meta(batch: Any) -> Any:
    return tree_map(lambda x: torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x, batch)


def training_step_flops(model: nn.Module, batch: Any, recomputation: bool = True) -> StepFlops:
    """FLOPs of ``model.training_losses(batch)["loss"]`` and its backward, counted on meta copies of
    both: the model and every random generator are left as they were (a run that counts trains the
    same numbers as one that does not), and any batch layout the model takes counts as it runs
    (a ``data.latent_cache`` batch skips the encodes).

    ``recomputation=False`` leaves out what gradient checkpointing computes twice (diffusers'
    ``gradient_checkpointing`` flags are cleared in the copy): the model FLOPs that MFU is defined
    on (PaLM, appendix B), where the default counts what the step executes."""
    from torch.utils.flop_counter import FlopCounterMode

    model = meta_copy(model)
    if not recomputation:
        for sub in model.modules():
            if getattr(sub, "gradient_checkpointing", False) is True:
                sub.gradient_checkpointing = False
    counter = FlopCounterMode(display=False)
    with counter:
        model.training_losses(_on_meta(batch))["loss"].backward()
    by_role = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()
               if "." not in name and name != "Global"}
    return StepFlops(int(counter.get_total_flops()), by_role)


def images_in(batch: Any) -> int:
    """Images a pair batch denoises: both directions of each pair."""
    return 2 * int(batch["a"]["image"].shape[0])
