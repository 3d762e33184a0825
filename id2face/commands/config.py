"""`id2face config FILE... [key=value...] [--build]`."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="FILE|key=value",
                        help="config files (paths or packaged names like `tiny`) then key=value overrides")
    parser.add_argument("--build", action="store_true",
                        help="instantiate every component on CPU and print its parameter count")


def run(args: argparse.Namespace) -> int:
    from ..config import load_config, split_args, to_yaml

    files, overrides = split_args(args.args)
    cfg = load_config(files, overrides)
    print(to_yaml(cfg), end="")
    if args.build:
        from torch import nn

        from ..model import build_components, count_parameters

        components = build_components(cfg.model)
        print("# parameters per component (trainable / total)")
        for role, module in components.items():
            trainable, total = count_parameters(module)
            print(f"#   {role:18s} {getattr(module, 'registered_name', type(module).__name__):14s} "
                  f"{trainable:>13,d} / {total:>13,d}")
        trainable, total = count_parameters(nn.ModuleList(components.values()))
        print(f"#   {'total':18s} {'':14s} {trainable:>13,d} / {total:>13,d}")
    return 0

