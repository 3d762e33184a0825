"""Host time per face of the anonymize pipeline's alignment work, outside detection and the model:
the aligned crop (``crop_face``) against PIL's warp of the whole photo (what crop_face did until
2026-11-27), and the identity mask, its growth and its feathering at the crop size.

    python benchmarks/face_alignment.py [--size 512] [--photo-size 4032 3024] [--face 115] [--repeats 5]

A face of --face px (eye-to-mouth scale of the ArcFace template) in a random photo of --photo-size;
each part timed --repeats times after one warm-up, median ms. Stage 1 of the file pipeline (one
thread: detection, alignment, identity encoding) runs crop, mask and growth per face; paste-back
(another thread) the feathering. Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, a sibling of this script

import _common as C  # noqa: E402

from id2face.anonymize.engine import AnonymizeSettings  # noqa: E402
from id2face.anonymize.paste_back import feathered_mask, grow_mask  # noqa: E402
from id2face.data.align import (crop_face, estimate_similarity, inner_face_mask, invert_affine,  # noqa: E402
                                pil_affine, template_landmarks, transform_points)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="crop side, px (the model's image size)")
    parser.add_argument("--photo-size", type=int, nargs=2, default=[4032, 3024], metavar=("W", "H"))
    parser.add_argument("--face", type=float, default=115.0, help="face size in the photo, px")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


def whole_photo_crop(photo: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The crop as PIL's bicubic warp of the whole photo (converted whole first)."""
    return np.asarray(Image.fromarray(photo).convert("RGB").transform(
        (size, size), Image.AFFINE, pil_affine(invert_affine(matrix)), resample=Image.BICUBIC, fillcolor=(0, 0, 0)))


def main(argv=None) -> int:
    args = parse_args(argv)
    width, height = args.photo_size
    photo = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    template = template_landmarks(args.size)
    landmarks = template / args.size * args.face + np.array([width / 3, height / 3])
    matrix = estimate_similarity(landmarks, template)
    settings = AnonymizeSettings()
    own = inner_face_mask(transform_points(landmarks, matrix), args.size)
    grown = grow_mask(own, settings.mask_margin * args.size)
    parts = {
        "crop (whole-photo warp, before)": lambda: whole_photo_crop(photo, matrix, args.size),
        "crop (crop_face)": lambda: crop_face(photo, matrix, args.size),
        "identity mask": lambda: inner_face_mask(transform_points(landmarks, matrix), args.size),
        "mask grown": lambda: grow_mask(own, settings.mask_margin * args.size),
        "feathered (paste-back thread)": lambda: feathered_mask(grown, settings.feather * args.size),
    }
    figures = {name: C.median_ms(fn, args.repeats) for name, fn in parts.items()}
    difference = np.abs(crop_face(photo, matrix, args.size).astype(int) - whole_photo_crop(photo, matrix, args.size))
    print(f"alignment per face: {args.face:g} px face in a {width}x{height} photo -> {args.size} px crop "
          f"({C.machine_description(C.resolve_device('cpu'))})")
    C.print_table(["part", "ms/face"], [[name, f"{ms:.1f}"] for name, ms in figures.items()])
    speedup = figures["crop (whole-photo warp, before)"] / figures["crop (crop_face)"]
    print(f"crop_face {speedup:.1f}x the whole-photo warp; pixels differing: {(difference > 0).mean():.1e} "
          f"(at most {difference.max()} level)")
    C.print_json({"benchmark": "face_alignment", "ms_per_face": figures, "crop_speedup": speedup,
                  "crop_max_difference": int(difference.max()),
                  "crop_differing_fraction": float((difference > 0).mean()),
                  "size": args.size, "photo_size": args.photo_size, "face": args.face})
    return 0


if __name__ == "__main__":
    sys.exit(main())
