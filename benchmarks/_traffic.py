"""What one eager step asks of a GPU, counted without one: FLOPs, bytes moved and kernels, per aten op.

The step runs on fake tensors (``FakeTensorMode``: shapes and dtypes, no data, no compute), so an
SD-1.5-size training step counts in seconds on any machine. Each aten op that computes something
is one eager kernel (or a few: a lower bound); it reads its tensor inputs and writes its outputs,
so its traffic is their sizes (views and allocations move nothing). Its roofline time is
``max(FLOPs / peak, bytes / bandwidth)``, and the sum over ops bounds the eager step's GPU time
from below: no kernel runs faster than its FLOPs or its memory traffic allow, and eager mode fuses
nothing across ops. Real kernels reach neither peak (the measured bare SD-1.5 step took ~2x its
bound), so use the figures to compare two steps, not to predict one.

bf16 autocast: CUDA's autocast cannot be entered without a device, so the counts run under the
CPU's, which lowers the same matmul / convolution / attention ops to bf16, plus a function mode
that runs what CUDA's autocast keeps in fp32 (normalisations, softmax, losses) in fp32, as on
the GPU: that decides the bytes of the memory-bound ops around every norm.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

# Functions CUDA's autocast runs in fp32 whatever their input dtype (a subset of its fp32 list:
# the ones these models call on activations).
CUDA_AUTOCAST_FP32 = frozenset({
    F.group_norm, F.layer_norm, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax,
    torch.log_softmax, torch.Tensor.log_softmax, F.mse_loss, F.cosine_similarity, torch.logsumexp,
})

# Ops that move no data: views, allocations without a fill, metadata.
_NO_TRAFFIC = frozenset({
    aten.detach, aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
    aten.lift_fresh, aten.alias, aten._unsafe_view, aten.set_,
})


def _flop_formulas() -> dict:
    from torch.utils.flop_counter import flop_registry

    formulas = dict(flop_registry)
    # The CPU flash kernel the fake CPU step dispatches to has the CUDA kernels' arithmetic.
    formulas[aten._scaled_dot_product_flash_attention_for_cpu] = flop_registry[aten._scaled_dot_product_flash_attention]
    formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
        flop_registry[aten._scaled_dot_product_flash_attention_backward]
    return formulas


class CudaAutocastFp32(TorchFunctionMode):
    """Under an active CPU autocast, runs ``CUDA_AUTOCAST_FP32`` functions on fp32 inputs with
    autocast off, as CUDA's autocast does (the casts are real ops, counted and differentiated)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CUDA_AUTOCAST_FP32 and torch.is_autocast_enabled("cpu"):
            def fp32(x):
                return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

            with torch.autocast("cpu", enabled=False):
                return func(*[fp32(a) for a in args], **{k: fp32(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)


@contextmanager
def cuda_autocast_fp32():
    """``CudaAutocastFp32`` in forward, and in the forward that gradient checkpointing recomputes in
    backward: the autograd engine runs that recompute without the forward's function modes, so the
    backbone's ``checkpoint`` gets the mode in its recompute context (else checkpoint finds bf16
    norms in the recompute where forward ran fp32 ones, and refuses)."""
    from torch.utils.checkpoint import noop_context_fn

    from id2face.components import backbone

    original = backbone.checkpoint

    def checkpoint(fn, *args, context_fn=noop_context_fn, **kwargs):
        def contexts():
            forward, recompute = context_fn()
            return forward, _entered_together(recompute, CudaAutocastFp32())
        return original(fn, *args, context_fn=contexts, **kwargs)

    backbone.checkpoint = checkpoint
    try:
        with CudaAutocastFp32():
            yield
    finally:
        backbone.checkpoint = original


@contextmanager
def _entered_together(first, second):
    with first, second:
        yield


@dataclass
class OpCost:
    kernels: int = 0
    flops: int = 0
    bytes: int = 0
    roofline_s: float = 0.0

    def add(self, flops: int, nbytes: int, seconds: float) -> None:
        self.kernels += 1
        self.flops += flops
        self.bytes += nbytes
        self.roofline_s += seconds


@dataclass
class Traffic:
    """Totals of one counted call and the same per aten op (``by_op``: name -> OpCost)."""

    by_op: dict[str, OpCost] = field(default_factory=lambda: defaultdict(OpCost))

    def _total(self, name: str):
        return sum(getattr(cost, name) for cost in self.by_op.values())

    kernels = property(lambda self: self._total("kernels"))
    flops = property(lambda self: self._total("flops"))
    bytes = property(lambda self: self._total("bytes"))
    roofline_s = property(lambda self: self._total("roofline_s"))


def _writes_inputs(func) -> bool:
    """Whether ``func`` writes into an argument: in-place ops that return nothing (the fused
    optimizers' ``_fused_adamw_``) still read and write their tensors."""
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


class TrafficCounter(TorchDispatchMode):
    def __init__(self, peak_flops: float, bandwidth: float):
        super().__init__()
        self.peak_flops, self.bandwidth = peak_flops, bandwidth
        self.formulas = _flop_formulas()
        self.traffic = Traffic()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if func.namespace != "aten" or func.is_view or packet in _NO_TRAFFIC:
            return out
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outputs and not _writes_inputs(func):  # size / device / scalar queries
            return out
        tensors = {id(t): t for t in [*tree_leaves((args, kwargs)), *outputs] if isinstance(t, torch.Tensor)}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        flops = int(self.formulas[packet](*args, **kwargs, out_val=out)) if packet in self.formulas else 0
        seconds = max(flops / self.peak_flops, nbytes / self.bandwidth)
        self.traffic.by_op[str(packet).removeprefix("aten.")].add(flops, nbytes, seconds)
        return out


def count_traffic(fn: Callable[[], object], peak_flops: float, bandwidth: float) -> Traffic:
    """Counts ``fn()``, which must run on fake tensors (see ``fake_cpu``) so that nothing is computed."""
    counter = TrafficCounter(peak_flops, bandwidth)
    with counter, cuda_autocast_fp32():
        fn()
    return counter.traffic


def fake_cpu():
    """Fake-tensor mode in which real CPU modules (parameters left uninitialised: ``to_empty``)
    take fake inputs: tensors made inside are fake, and the parameters become fake where used."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def track_memory(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, *modules) -> dict[str, int]:
    """Device bytes at the peak of one training step on fake tensors (``loss_fn()``, backward,
    ``optimizer`` step, gradients set to None), by kind (torch's ``MemTracker``: "Parameter",
    "Buffer", "Gradient", "Activation", "Temp", "Optstate", "Total"), with CUDA's caching-allocator
    rounding. ``modules``: those whose parameters and buffers exist before the step."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class NoHook:
        def remove(self) -> None:
            pass

    class FrozenAwareMemTracker(MemTracker):
        # MemTracker hooks the gradient of every parameter a module's forward sees, which raises for
        # a frozen one (requires_grad=False: the identity encoder, the first stage). A frozen
        # parameter is entered as hooked already, so only the trainable ones get hooks.
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for param in module.parameters():
                if not param.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(param, (NoHook(), NoHook()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        # Only the step's peak is read here; torch's version also walks every module's statistics at
        # every operator: half of the tiny count's time (21k operators), 9/10 of the SD-1.5 one's.
        def _update_peak_stats(self, peak_state) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                    self._peak_mem[device] = snapshot[_TOTAL_KEY]
                    self._peak_mem_snap[device] = dict(snapshot)

    class Forward(torch.nn.Module):
        # The forward as one root module: MemTracker takes a root module called twice for the next
        # step, and the step calls some modules twice (the first stage encodes the masked image too).
        def forward(self):
            return loss_fn()

    tracker = FrozenAwareMemTracker()
    tracker.track_external(*modules, optimizer)
    with tracker:
        Forward()().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    (by_kind,) = tracker.get_tracker_snapshot("peak").values()  # one device: the fake CPU
    return {str(getattr(kind, "value", kind)): int(nbytes) for kind, nbytes in by_kind.items()}
