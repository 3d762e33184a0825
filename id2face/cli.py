"""`id2face <command>`: the command-line entry point (lazy: heavy imports happen in the command)."""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module under id2face.commands or None while not built yet, one-line help)
COMMANDS: dict[str, tuple[str | None, str]] = {
    "config": ("config", "print the resolved config of FILE... key=value; --build instantiates it"),
    "synthfaces": ("synthfaces", "render a SynthFaces grid (rows = identities, columns = samples)"),
    "train": ("train", "train a model from a config"),
    "train-encoder": ("train_encoder", "train or fine-tune an identity encoder on identity labels"),
    "train-oracle": ("train_oracle", "train the SynthFaces oracle (identity classifier + factor regressors)"),
    "eval": ("eval", "evaluate a checkpoint and write metrics.json"),
    "anonymize": ("anonymize", "anonymize the faces in photos or folders"),
    "prepare": ("prepare", "detect and align faces into a dataset folder with a manifest"),
    "sweep": ("sweep", "launch a grid of runs locally or on SLURM"),
    "table": ("table", "build paper-style tables from run folders"),
    "cache-latents": ("cache_latents", "encode and identity-embed a dataset's images once, for data.latent_cache"),
    "export": ("export", "reduce a training checkpoint to the weights and config inference needs"),
    "demo": ("demo", "train, anonymize and evaluate on SynthFaces end to end"),
}


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="id2face", description="ID²Face: identity-decoupled diffusion for face anonymization."
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if module is not None and name == chosen:  # import only the command that runs
            importlib.import_module(f"id2face.commands.{module}").add_arguments(p)
        elif module is None:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(argv)
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also follow options (`train-encoder tiny -o w.pt data.batch_size=4`)
    target = next((name for name in ("args", "overrides") if isinstance(getattr(args, name, None), list)), None)
    unknown = [e for e in extra if "=" not in e or e.startswith("-")]
    if unknown or (extra and target is None):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        getattr(args, target).extend(extra)
    if args.command is None:
        parser.print_help()
        return 2
    module = COMMANDS[args.command][0]
    if module is None:
        print(f"id2face {args.command}: not built yet in this version", file=sys.stderr)
        return 2
    from .errors import UserError, user_message

    try:
        return int(importlib.import_module(f"id2face.commands.{module}").run(args) or 0)
    except UserError as err:
        print(f"id2face {args.command}: error: {user_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"id2face {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno is None:  # not the system's refusal of a file operation: a bug, with its traceback
            raise
        # The file system's answer (a file where a folder goes, a full disk, no permission): the
        # user's to fix, in one line, as the commands' own checks of their paths say it.
        paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
        print(f"id2face {args.command}: error: {err.strerror or err}{': ' + paths if paths else ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
