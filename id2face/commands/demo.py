"""`id2face demo [--root DIR] [--checkpoint CKPT] [--oracle ORACLE] [key=value...]`: the end-to-end
SynthFaces story (see id2face/demo.py). `make demo` passes the shipped checkpoints/demo-tiny.pt and
checkpoints/demo-oracle.pt."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied on top of tiny + demo")
    parser.add_argument("--root", default="runs", help="where runs/demo goes (default: runs)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N test faces (sets eval.limit)")
    parser.add_argument("--checkpoint", default=None,
                        help="evaluate this `id2face train` checkpoint (or `id2face export` of one) instead of "
                             "training the model here (trainer.max_steps of the demo config: ~30 min on 2 cores)")
    parser.add_argument("--oracle", default=None,
                        help="judge with this trained oracle (`id2face train-oracle` folder or its oracle.pt) "
                             "instead of training one into the cache (its weights vary with the processor)")


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.root, args.overrides, args.limit, args.checkpoint, args.oracle)
    return 0
