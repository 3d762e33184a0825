"""One cross-attention layer, forward + backward: the harmonizer's decoupled processors (``sum``,
``gated``, each computed both ways: ``-weights`` default, ``-sdpa``) vs the stock diffusers
processor over all tokens (what the bare UNet runs), at the SD-1.5 UNet's cross-attention shapes.

A level is (width, query tokens): 320 x 64x64, 640 x 32x32, 1280 x 16x16, 1280 x 8x8 at 512 px; 8
heads, 20 context tokens of 768 (4 identity + 16 attribute). ``ms`` is the median time of one
layer's forward + backward; ``saved MiB`` what autograd keeps for backward (distinct storages,
counted with saved-tensor hooks); ``x stock`` both over the stock processor's; ``kernels`` and
``GB`` the eager kernels and bytes of the same forward + backward counted on fake tensors
(``_traffic.py``; with ``--bf16`` under CUDA's autocast policy), as a GPU would be asked for them.

    .venv/bin/python benchmarks/harmonizer_attention.py [--batch 4] [--levels 0 1 2 3]
        [--device cpu|cuda] [--bf16] [--repeats 5] [--threads T]

Prints a table; the last line is a JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

SD15_LEVELS = [(320, 64 * 64), (640, 32 * 32), (1280, 16 * 16), (1280, 8 * 8)]
HEADS, CONTEXT_DIM, ID_TOKENS, ATTR_TOKENS, TIME_EMBED_DIM, GATE_HIDDEN = 8, 768, 4, 16, 64, 64


PROCESSORS = ("stock", "sum-weights", "sum-sdpa", "gated-weights", "gated-sdpa")


def normed(hidden: torch.Tensor) -> torch.Tensor:
    """The layer's input as the UNet hands it over: a LayerNorm's output (fp32 under autocast, and
    not a leaf, so autocast's cast cache does not serve the layer's several readers)."""
    return torch.nn.functional.layer_norm(hidden, hidden.shape[-1:])


def make_processor(name: str, width: int):
    """(processor, its gate module or None) for a layer of ``width``; ``name``: stock or
    ``{sum,gated}-{weights,sdpa}`` (harmonizer, attention path)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from id2face.components.harmonizer import DecoupledCrossAttnProcessor, TimestepGate

    if name == "stock":
        return AttnProcessor2_0(), None
    harmonizer, attention = name.split("-")
    gate = TimestepGate(width, TIME_EMBED_DIM, GATE_HIDDEN) if harmonizer == "gated" else None
    return DecoupledCrossAttnProcessor(ID_TOKENS, gate=gate, attention=attention), gate


def layer_traffic(name: str, width: int, queries: int, batch: int, bf16: bool):
    """Kernels and bytes of one forward + backward of the layer, on fake CPU tensors."""
    import _traffic as T
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=width, cross_attention_dim=CONTEXT_DIM, heads=HEADS, dim_head=width // HEADS)
    processor, gate = make_processor(name, width)
    params = [*attn.parameters(), *(gate.parameters() if gate is not None else ())]
    device = torch.device("cpu")
    with T.fake_cpu():
        hidden = torch.randn(batch, queries, width, requires_grad=True)
        context = torch.randn(batch, ID_TOKENS + ATTR_TOKENS, CONTEXT_DIM, requires_grad=True)
        kwargs = {} if name == "stock" else {"harmonizer_temb": torch.randn(batch, TIME_EMBED_DIM)}

        def step():
            with C.autocast(device, bf16):
                out = processor(attn, normed(hidden), context, **kwargs)
            torch.autograd.grad(out.float().square().mean(), [hidden, context, *params])

        return T.count_traffic(step, C.DEFAULT_PEAK_FLOPS, C.DEFAULT_BANDWIDTH)


def measure(name: str, width: int, queries: int, batch: int, device: torch.device, bf16: bool,
            repeats: int) -> dict:
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=width, cross_attention_dim=CONTEXT_DIM, heads=HEADS, dim_head=width // HEADS).to(device)
    processor, gate = make_processor(name, width)
    if gate is not None:
        gate.to(device)
        torch.nn.init.normal_(gate.mlp[-1].weight, std=0.1)  # a trained gate: not constant 0.5
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, queries, width, generator=g).to(device).requires_grad_()
    context = torch.randn(batch, ID_TOKENS + ATTR_TOKENS, CONTEXT_DIM, generator=g).to(device).requires_grad_()
    temb = torch.randn(batch, TIME_EMBED_DIM, generator=g).to(device)
    kwargs = {} if name == "stock" else {"harmonizer_temb": temb}

    def forward():
        with C.autocast(device, bf16):
            return processor(attn, normed(hidden), context, **kwargs)

    def step():
        forward().float().square().mean().backward()

    step()  # warm-up
    times = [C.timed(step, device) for _ in range(repeats)]
    traffic = layer_traffic(name, width, queries, batch, bf16)
    return {"level": f"{width} x {queries}", "processor": name, "ms": 1e3 * C.median(times),
            "saved_bytes": C.saved_for_backward(forward), "kernels": traffic.kernels, "bytes": traffic.bytes}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="SD-1.5 levels: 0 = 320 x 64x64 ... 3 = 1280 x 8x8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.resolve_device(args.device)
    rows = []
    for level in args.levels:
        width, queries = SD15_LEVELS[level]
        for name in PROCESSORS:
            rows.append(measure(name, width, queries, args.batch, device, args.bf16, args.repeats))
    stock = {r["level"]: r for r in rows if r["processor"] == "stock"}
    for r in rows:
        base = stock[r["level"]]
        r["time_over_stock"] = r["ms"] / base["ms"]
        r["saved_over_stock"] = r["saved_bytes"] / base["saved_bytes"]
    print(f"one cross-attention layer fwd + bwd on {C.machine_description(device)}, batch {args.batch}, "
          f"bf16={args.bf16}, {HEADS} heads, {ID_TOKENS} + {ATTR_TOKENS} tokens of {CONTEXT_DIM}; "
          f"median of {args.repeats}")
    C.print_table(["level", "processor", "ms", "x stock", "saved MiB", "x stock", "kernels", "GB"],
                  [[r["level"], r["processor"], f"{r['ms']:.2f}", f"{r['time_over_stock']:.2f}",
                    f"{r['saved_bytes'] / 2**20:.1f}", f"{r['saved_over_stock']:.2f}", r["kernels"],
                    f"{r['bytes'] / 1e9:.3f}"] for r in rows])
    result = {"benchmark": "harmonizer_attention", "device": C.machine_description(device), "batch": args.batch,
              "bf16": args.bf16, "torch": torch.__version__, "rows": rows}
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    main()
