"""`id2face train CONFIG... [key=value...]`: train one run in its run folder (resumes if it has a checkpoint)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="FILE|key=value",
                        help="config files (paths or packaged names like `tiny`) then key=value overrides, "
                             "e.g. `id2face train tiny ablations/harmonizer_sum.yaml trainer.max_steps=100`")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from scratch even if the run folder has a checkpoint")


def run(args: argparse.Namespace) -> int:
    from ..config import load_config, split_args
    from ..training import fit

    files, overrides = split_args(args.args)
    folder = fit(load_config(files, overrides), resume=not args.no_resume)
    print(f"run folder: {folder}")
    return 0
