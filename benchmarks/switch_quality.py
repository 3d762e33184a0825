"""What the sampling speed switches cost in quality: `id2face eval` of one trained checkpoint under
each arithmetic, beside the same model evaluated with another noise seed (the scale a difference
must exceed to mean anything).

    python benchmarks/switch_quality.py --checkpoint CKPT [--variants fp32 seed bf16 bf16_norms ...]
        [--device cpu|cuda] [--limit N] [--out DIR] [--override key=value ...]

Each variant is one `id2face eval` run (its own run folder under --out, default a temporary one)
with the same seeds except `seed`. Variants:
    fp32        32-true, no switch (the reference)
    seed        32-true with run.seed + 1 (sampling noise alone)
    bf16        --precision bf16-mixed (autocast)
    bf16_norms  bf16 autocast, the UNet's and attribute encoder's norms in bf16 (low_precision_norms)
    bf16_unet   the UNet's weights and arithmetic in bf16 (anonymize --unet-dtype bfloat16)
    bf16_vae    an SD VAE first stage in bf16 (anonymize --vae-dtype bfloat16; latent models only)
The table lists each metric per variant; "max shift" is the largest |variant - fp32| over the
switch variants, "seed shift" |seed - fp32|. The last line is a JSON object of every figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "fp32": ["--precision", "32-true"],
    "seed": ["--precision", "32-true"],  # + run.seed=<checkpoint's + 1>, set in main
    "bf16": ["--precision", "bf16-mixed"],
    "bf16_norms": ["--precision", "bf16-mixed", "model.backbone.params.low_precision_norms=true",
                   "model.attribute_encoder.params.low_precision_norms=true"],
    "bf16_unet": ["--precision", "32-true", "model.backbone.params.dtype=bfloat16"],
    "bf16_vae": ["--precision", "32-true", "model.first_stage.params.dtype=bfloat16"],
}
# Shown first when present; the JSON line has every metric.
PREFERRED = ("top1", "top5", "diversity", "fid", "pose", "expression", "id_factor_change", "psnr", "ssim")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=["fp32", "seed", "bf16", "bf16_norms", "bf16_unet"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--limit", type=int, default=None, help="the first N test faces only")
    parser.add_argument("--out", default=None, help="folder for the eval runs (default: a temporary one)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every variant (e.g. eval.recognizers=...)")
    args = parser.parse_args(argv)
    if "fp32" not in args.variants:
        parser.error("--variants must include fp32, the reference")
    return args


def _columns(metrics: dict) -> list[str]:
    def rank(key: str) -> int:
        last = key.rsplit("/", 1)[-1]
        return PREFERRED.index(last) if last in PREFERRED and key.count("/") <= 1 else len(PREFERRED)

    return sorted((k for k in metrics if rank(k) < len(PREFERRED)), key=lambda k: (rank(k), k))


def main(argv=None) -> int:
    args = parse_args(argv)
    from id2face.cli import main as id2face
    from id2face.inference import read_checkpoint_config

    seed = int(read_checkpoint_config(args.checkpoint)[0].run.seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        results = {}
        for name in args.variants:
            extra = [f"run.seed={seed + 1}"] if name == "seed" else []
            command = ["eval", "--checkpoint", args.checkpoint, "--run-dir", str(out / name), *VARIANTS[name],
                       *(["--device", args.device] if args.device else []),
                       *(["--limit", str(args.limit)] if args.limit is not None else []), *args.override, *extra]
            print(f"== {name}: id2face {' '.join(command)}", file=sys.stderr)
            if id2face(command) != 0:
                print(f"switch_quality: variant {name} failed", file=sys.stderr)
                return 1
            results[name] = json.loads((out / name / "metrics.json").read_text())["metrics"]

    reference = results["fp32"]
    columns = _columns(reference)
    switches = [name for name in results if name not in ("fp32", "seed")]
    max_shift = {k: max((abs(results[n][k] - reference[k]) for n in switches), default=0.0) for k in reference}
    seed_shift = {k: abs(results["seed"][k] - reference[k]) for k in reference} if "seed" in results else None
    print("| variant | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, metrics in results.items():
        print(f"| {name} | " + " | ".join(f"{metrics[k]:.4f}" for k in columns) + " |")
    print("| max shift | " + " | ".join(f"{max_shift[k]:.4f}" for k in columns) + " |")
    if seed_shift is not None:
        print("| seed shift | " + " | ".join(f"{seed_shift[k]:.4f}" for k in columns) + " |")
    print(json.dumps({"checkpoint": args.checkpoint, "limit": args.limit, "metrics": results,
                      "max_shift": max_shift, "seed_shift": seed_shift}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
