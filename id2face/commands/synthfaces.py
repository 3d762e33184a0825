"""`id2face synthfaces -o grid.png [--identities N --samples M --size S --seed K]`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UserError

MIN_SIZE, MAX_SIZE = 32, 256  # mirrors id2face.data.synthfaces (not imported here: it loads torch)
MAX_GRID_SIDE = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, help="PNG file to write")
    parser.add_argument("--identities", type=int, default=8, help="rows: one identity each (default 8)")
    parser.add_argument("--samples", type=int, default=8,
                        help="columns: samples of each identity (pose, expression, light, hair, background)")
    parser.add_argument("--size", type=int, default=64,
                        help=f"face size in pixels, {MIN_SIZE}..{MAX_SIZE} (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--first-identity", type=int, default=0, help="index of the first row's identity")


def run(args: argparse.Namespace) -> int:
    if not MIN_SIZE <= args.size <= MAX_SIZE:
        raise UserError(f"--size must be in {MIN_SIZE}..{MAX_SIZE}, got {args.size}")
    for name in ("identities", "samples"):
        if not 1 <= getattr(args, name) <= MAX_GRID_SIDE:
            raise UserError(f"--{name} must be in 1..{MAX_GRID_SIDE}, got {getattr(args, name)}")
    if args.seed < 0 or args.first_identity < 0:
        raise UserError("--seed and --first-identity must be >= 0")
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise UserError(f"output {output} must be a .png file")
    folder = output.parent if str(output.parent) else Path(".")
    if output.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK) or (
            output.exists() and not os.access(output, os.W_OK)):
        raise UserError(f"cannot write {output}: "
                        + ("it is a folder" if output.is_dir() else
                           f"folder {folder} does not exist" if not folder.is_dir() else "permission denied"))

    from ..data.synthfaces import save_grid

    try:
        save_grid(output, args.identities, args.samples, args.size, args.seed, args.first_identity)
    except OSError as err:
        raise UserError(f"cannot write {output}: {err.strerror or err}") from None
    print(f"wrote {output} ({args.identities} identities x {args.samples} samples at {args.size} px, seed {args.seed})")
    return 0
