"""`id2face train-oracle [CONFIG...] [key=value...] [-o DIR] [--force]`.

Trains the SynthFaces judge for the config's data section (identities, renderer seed, image size)
and caches it under DIR/oracle-<hash>/ (default ~/.cache/id2face/oracle); a rerun with the same
settings is a cache hit. ``oracle.<field>=value`` sets the oracle's own settings (steps, width, ...);
give the same settings to the `oracle` recognizer (``params: {settings: {...}}``) to evaluate with it.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="FILE|key=value",
                        help="config files (paths or packaged names like `tiny`), key=value overrides; "
                             "oracle.<field>=value for the oracle's own settings")
    parser.add_argument("-o", "--cache-dir", metavar="DIR",
                        help="oracle cache folder (default $ID2FACE_CACHE/oracle or ~/.cache/id2face/oracle)")
    parser.add_argument("--force", action="store_true", help="retrain even if the cache holds this oracle")


def _oracle_settings(overrides: list[str]) -> tuple[dict, list[str]]:
    from ..config import parse_overrides
    from omegaconf import OmegaConf

    own = [o for o in overrides if o.startswith("oracle.")]
    rest = [o for o in overrides if not o.startswith("oracle.")]
    settings = OmegaConf.to_container(parse_overrides(own)).get("oracle", {}) if own else {}
    return settings, rest


def run(args: argparse.Namespace) -> int:
    from ..config import load_config, split_args
    from ..metrics.oracle import oracle_config, oracle_dir, train_oracle

    files, overrides = split_args(args.args)
    settings, overrides = _oracle_settings(overrides)
    cfg = load_config(files, overrides)
    config = oracle_config(cfg.data, settings)
    train_oracle(config, args.cache_dir, force=args.force)
    folder = oracle_dir(config, args.cache_dir)
    print(json.dumps({"oracle": str(folder), **json.loads((folder / "metrics.json").read_text())}))
    print(f"id2face train-oracle: oracle at {folder}", file=sys.stderr)
    return 0
