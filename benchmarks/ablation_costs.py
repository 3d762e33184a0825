"""What each ablation costs against the default model: parameters, training and sampling FLOPs.

    python benchmarks/ablation_costs.py [--profile sd15|tiny] [--steps 25] [--ablations ablations/X.yaml ...]
        [--override FILE|KEY=VALUE ...]

One row per ablation file (default: every file in ``ablations/``) and the profile's own model
first: trainable and total parameters, the training step's FLOPs per image (forward + backward,
cached latents, as ``train_step.py --flops-only --cached-latents``) and one anonymization's FLOPs
per face at ``--steps`` sampler steps with the configured guidance (as ``sample.py
--flops-only``), each also as a ratio to the default's. Everything is counted on the meta device:
the SD-1.5-size table on any machine in a few minutes, the costs a paper's ablation table reports
beside its quality columns. ``--override`` applies to every row (the default's too). Last line:
one JSON object, ``rows``.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

ABLATIONS = Path(__file__).resolve().parents[1] / "ablations"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["tiny", "sd15"], default="sd15")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps of one anonymization")
    parser.add_argument("--ablations", nargs="+", type=Path, default=None, metavar="FILE",
                        help="ablation files, one row each (default: every file in ablations/)")
    parser.add_argument("--override", nargs="*", action="extend", default=[],
                        help=f"every row's config, the default's too: {C.OVERRIDE_HELP}")
    args = parser.parse_args(argv)
    args.ablations = args.ablations or sorted(ABLATIONS.glob("*.yaml"))
    missing = [str(path) for path in args.ablations if not path.is_file()]
    if missing:
        parser.error(f"no such ablation file: {', '.join(missing)}")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def costs(profile: str, overrides: list[str], steps: int) -> dict:
    """Parameters and FLOPs of the model ``overrides`` configure, built and counted on the meta device."""
    import sample
    import train_step
    from id2face.model import count_parameters

    with torch.device("meta"):
        model, cfg = C.build_model(profile, torch.device("meta"), overrides)
    trainable, total = count_parameters(model)
    step, _ = train_step.step_flops_per_image(model, profile, cached_latents=True)
    sampling = sum(sample.flops_per_face_by_part(model, cfg, profile, steps).values())
    return {"trainable_params": trainable, "params": total, "train_flops_per_image": step,
            "sample_flops_per_face": sampling, "guidance": model.guidance.registered_name}


def main(argv=None) -> int:
    from id2face.errors import UntrainedWeightsWarning

    args = parse_args(argv)
    warnings.simplefilter("ignore", UntrainedWeightsWarning)  # random weights are the point here
    rows = {"default": costs(args.profile, args.override, args.steps)}
    C.progress("default counted")
    for path in args.ablations:
        rows[path.stem] = costs(args.profile, [str(path), *args.override], args.steps)
        C.progress(f"{path.stem} counted")
    base = rows["default"]
    for row in rows.values():
        row["train_flops_ratio"] = row["train_flops_per_image"] / base["train_flops_per_image"]
        row["sample_flops_ratio"] = row["sample_flops_per_face"] / base["sample_flops_per_face"]
    print(f"cost of each ablation, profile {args.profile} ({C.PROFILE_IMAGE_SIZE[args.profile]} px), counted on the "
          f"meta device: training step per image (forward + backward, cached latents), one anonymization per face "
          f"({args.steps} steps, the configured guidance)")
    header = ["model", "trainable M", "params M", "train GFLOP/img", "x default", "sample GFLOP/face", "x default"]
    C.print_table(header,
                  [[name, f"{row['trainable_params'] / 1e6:.2f}", f"{row['params'] / 1e6:.2f}",
                    f"{row['train_flops_per_image'] / 1e9:.1f}", f"{row['train_flops_ratio']:.3f}",
                    f"{row['sample_flops_per_face'] / 1e9:.1f}", f"{row['sample_flops_ratio']:.3f}"]
                   for name, row in rows.items()])
    C.print_json({"benchmark": "ablation_costs", "profile": args.profile, "steps": args.steps,
                  "overrides": args.override, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
