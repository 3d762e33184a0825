"""`id2face export CKPT -o OUT`: a training checkpoint reduced to what inference needs.

Keeps the weights (live and EMA; the frozen encoders' too, so the file stands alone), the resolved
config and the global step; drops optimizer moments, schedulers, loops and callbacks (half the
size of a Lightning checkpoint). The result loads wherever a checkpoint does: `id2face anonymize
--checkpoint`, `id2face eval --checkpoint`, `id2face demo --checkpoint`. It cannot resume training.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint written by id2face train")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="the weights file to write")


def export_weights(checkpoint: str | Path, output: str | Path) -> Path:
    """Write ``{state_dict, hyper_parameters, global_step, exported_from}`` of ``checkpoint`` to
    ``output`` (atomically); returns ``output``."""
    import os

    import torch

    from ..errors import UserError
    from ..inference import read_checkpoint_config

    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and output.resolve() == checkpoint.resolve():
        raise UserError(f"output {output} is the checkpoint itself; choose another path")
    if output.is_dir():  # checked first: the rename at the end cannot replace a folder
        raise UserError(f"output {output} is a folder: name the weights file to write (e.g. {output / 'model.pt'})")
    config, state, _ = read_checkpoint_config(checkpoint)  # refuses anything that is not ours
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    from omegaconf import OmegaConf

    reduced = {"state_dict": dict(state),
               "hyper_parameters": {"config": OmegaConf.to_container(config, resolve=True)},
               "global_step": payload.get("global_step"), "exported_from": checkpoint.name}
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    torch.save(reduced, partial)
    os.replace(partial, output)
    return output


def run(args: argparse.Namespace) -> int:
    output = export_weights(args.checkpoint, args.output)
    print(f"id2face export: wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    return 0
