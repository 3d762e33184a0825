"""`id2face table RUN... [--format md|latex|csv] [--layout main|ablation|encoders] [-o FILE]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders holding metrics.json (+ config.yaml)")
    parser.add_argument("--format", choices=("md", "latex", "csv"), default="md", help="output format (default md)")
    parser.add_argument("--layout", choices=("main", "ablation", "encoders"), default="main",
                        help="main: one row per experiment; ablation: one row per ablation; "
                             "encoders: one row per training identity encoder, columns per recognizer")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the table here instead of stdout")


def run(args: argparse.Namespace) -> int:
    from ..metrics.table import make_table

    text = make_table(args.runs, fmt=args.format, layout=args.layout)
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"id2face table: wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
