"""The SD-1.5 UNet's self-attention, forward + backward (training) or forward alone (sampling), under each
PyTorch SDPA backend.

SD-1.5 has 8 heads at every level, so its head dimension is 40 at the 64 x 64 level (4096 tokens,
where most of the attention time goes), 80, 160 and 160 below. FlashAttention-2 runs head
dimensions in steps (32, 64, 96, ...): 40 takes its 64 kernels, so at most 40/64 of their
arithmetic is the model's. Other backends (memory-efficient, cuDNN) tile differently; which is
fastest at these shapes is a measurement, not a guess. Per level and backend: median ms of one
``scaled_dot_product_attention`` forward + backward (batch x 8 heads x tokens x head dim, bf16 on
CUDA), TFLOP/s of the model's arithmetic (4 B H N^2 d forward, twice that backward), and the
largest difference to the math backend's output in fp32 (two images); ``n/a`` where the backend refuses the
shape or device. The last rows weigh the levels as the UNet has them (5 + 5 + 5 + 1 layers) and
give the backends fastest first, as ``model.backbone.params.sdpa_backends`` takes them (an order of
preference: the first that takes a shape runs it). ``--forward-only``: sampling's case, no backward,
``torch.no_grad``, 4 B H N^2 d, batch 64 on CUDA (anonymize's).

    .venv/bin/python benchmarks/attention_backends.py [--device cpu|cuda] [--batch 32] [--levels 0 1 2 3]
        [--forward-only]

Prints a table; the last line is a JSON object with every figure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

HEADS = 8
# (channels, tokens, self-attention layers at that level) of SD-1.5 at 512 px: 64x64 ... 8x8 latents
SD15_SELF_ATTENTION = [(320, 64 * 64, 5), (640, 32 * 32, 5), (1280, 16 * 16, 5), (1280, 8 * 8, 1)]
DEFAULT = "default"  # no restriction: PyTorch's own choice
REFERENCE_IMAGES = 2


def backend_names() -> list[str]:
    from torch.nn.attention import SDPBackend

    return [DEFAULT] + [name.lower() for name in SDPBackend.__members__ if name not in ("ERROR", "OVERRIDEABLE")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None,
                        help="images (default: CUDA 32, the train step's, or 64 with --forward-only; CPU 1)")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3], choices=range(4),
                        help="UNet levels: 0 = 64x64 latents (320 ch) ... 3 = 8x8 (default all)")
    parser.add_argument("--backends", nargs="+", default=None, choices=backend_names(),
                        help="default: all (CUDA: all but math), PyTorch's own choice first")
    parser.add_argument("--forward-only", action="store_true", help="sampling: no backward pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    args.batch = args.batch or ((64 if args.forward_only else 32) if args.device == "cuda" else 1)
    # CUDA: not the math backend unless asked (batch 32 x 4096^2 attention matrices, tens of GB)
    args.backends = args.backends or [name for name in backend_names() if args.device == "cpu" or name != "math"]
    return args


def attention_inputs(batch: int, width: int, tokens: int, device: torch.device, dtype: torch.dtype):
    """Query, key, value laid out as diffusers' ``AttnProcessor2_0`` hands them to SDPA: projections
    (batch, tokens, width) viewed as heads and transposed, not copied."""
    generator = torch.Generator().manual_seed(0)
    projections = [torch.randn(batch, tokens, width, generator=generator).to(device, dtype).requires_grad_()
                   for _ in range(3)]
    return projections, [p.view(batch, tokens, HEADS, width // HEADS).transpose(1, 2) for p in projections]


def attention(backend: str, leaves: list[torch.Tensor], heads: list[torch.Tensor], backward: bool) -> torch.Tensor:
    """One SDPA over ``heads`` (views of ``leaves``) under ``backend``, and its backward if asked
    (else under no_grad, as sampling runs it); returns the output (RuntimeError if the backend refuses)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    context = nullcontext() if backend == DEFAULT else sdpa_kernel([SDPBackend.__members__[backend.upper()]])
    for leaf in leaves:
        leaf.grad = None
    with context, torch.set_grad_enabled(backward):
        out = torch.nn.functional.scaled_dot_product_attention(*heads)
        if backward:
            out.backward(torch.ones_like(out))
    return out


def measure_level(args, width: int, tokens: int, device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    leaves, heads = attention_inputs(args.batch, width, tokens, device, dtype)
    # the reference: the math backend in fp32 on two images (its attention matrices of the whole
    # batch would take tens of GB at 4096 tokens)
    exact = [head[:REFERENCE_IMAGES].detach().float().requires_grad_() for head in heads]
    backward = not args.forward_only
    reference = attention("math", exact, exact, backward).detach()
    head_dim = width // HEADS
    flops = (4 if args.forward_only else 12) * args.batch * HEADS * tokens * tokens * head_dim  # 4 B H N^2 d fwd, 8 bwd
    figures = {}
    for backend in args.backends:
        try:
            out = attention(backend, leaves, heads, backward)  # warm-up, and the refusal if any
        except RuntimeError as err:
            figures[backend] = {"available": False, "reason": str(err).strip().splitlines()[0][:160]}
            continue
        difference = float((out[:REFERENCE_IMAGES].detach().float() - reference).abs().max())
        seconds = [C.timed(lambda: attention(backend, leaves, heads, backward), device) for _ in range(args.repeats)]
        ms = 1000 * C.median(seconds)
        figures[backend] = {"available": True, "ms": ms, "tflop_per_s": flops / (ms / 1000) / 1e12,
                            "max_difference": difference}
    return {"width": width, "tokens": tokens, "head_dim": head_dim, "flops": flops, "backends": figures}


def fastest_order(levels: dict, measured: list[int]) -> tuple[list[str], float | None]:
    """The order of the backends that ran (PyTorch's own choice aside) whose UNet time is least when
    each level runs on the first backend of the order that takes it, as ``sdpa_backends`` does,
    and that time; ``([], None)`` if none ran."""
    from itertools import permutations

    ran = sorted({backend for level in measured for backend, entry in levels[level]["backends"].items()
                  if entry["available"] and backend != DEFAULT})
    best, best_ms = [], None
    for order in permutations(ran):
        ms = 0.0
        for level in measured:
            entries = levels[level]["backends"]
            first = next((backend for backend in order if entries[backend]["available"]), None)
            if first is None:
                break
            ms += SD15_SELF_ATTENTION[level][2] * entries[first]["ms"]
        else:
            if best_ms is None or ms < best_ms:
                best, best_ms = list(order), ms
    return best, best_ms


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.resolve_device(args.device)
    levels, rows = {}, []
    for level in args.levels:
        width, tokens, _ = SD15_SELF_ATTENTION[level]
        levels[level] = measure_level(args, width, tokens, device)
        for backend, entry in levels[level]["backends"].items():
            rows.append([level, f"{width} x {tokens}", width // HEADS, backend] +
                        ([f"{entry['ms']:.2f}", f"{entry['tflop_per_s']:.1f}", f"{entry['max_difference']:.1e}"]
                         if entry["available"] else ["n/a", "", entry["reason"][:60]]))
        C.progress(f"level {level} done")
    # The UNet's self-attention layers per step, per backend that ran at every level measured.
    unet = {}
    for backend in args.backends:
        entries = [levels[level]["backends"][backend] for level in args.levels]
        if all(entry["available"] for entry in entries):
            unet[backend] = sum(SD15_SELF_ATTENTION[level][2] * entry["ms"]
                                for level, entry in zip(args.levels, entries))
    passes = "forward (sampling)" if args.forward_only else "forward + backward"
    print(f"SD-1.5 self-attention, {passes}, batch {args.batch} x {HEADS} heads, "
          f"{'bf16' if device.type == 'cuda' else 'fp32'}, {C.machine_description(device)}; median of {args.repeats}")
    C.print_table(["level", "channels x tokens", "head dim", "backend", "ms", "TFLOP/s", "max diff to math"], rows)
    layers = " + ".join(str(SD15_SELF_ATTENTION[level][2]) for level in args.levels)
    for backend, ms in unet.items():
        print(f"the UNet's self-attention layers ({layers}), {backend}: {ms:.1f} ms")
    fastest_first, fastest_ms = fastest_order(levels, args.levels)
    if fastest_first:
        print(f"fastest order, {fastest_ms:.1f} ms: model.backbone.params.sdpa_backends=[{','.join(fastest_first)}]")
    C.print_json({"benchmark": "attention_backends", "device": C.machine_description(device), "batch": args.batch,
                  "forward_only": args.forward_only, "heads": HEADS, "levels": {str(k): v for k, v in levels.items()},
                  "unet_self_attention_ms": unet, "fastest_first": fastest_first, "fastest_first_ms": fastest_ms})
    return 0


if __name__ == "__main__":
    sys.exit(main())
