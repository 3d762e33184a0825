"""`id2face demo [--root DIR] [key=value...]`: the end-to-end SynthFaces story (see id2face/demo.py)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied on top of tiny + demo")
    parser.add_argument("--root", default="runs", help="where runs/demo goes (default: runs)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N test faces")
    parser.add_argument("--checkpoint", default=None,
                        help="evaluate this `id2face train` checkpoint instead of training a 300-step model")


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.root, args.overrides, args.limit, args.checkpoint)
    return 0
