"""`id2face prepare -i INPUT -o OUTPUT [--size 256] [--workers N] [--dataset LAYOUT]`.

Exit status: 0 when OUTPUT holds at least one usable crop (bad files are reported in the
manifest, not fatal), 1 when no input file gave a usable face, 2 for bad arguments.
"""
from __future__ import annotations

import argparse

LAYOUTS = ("identity_folder", "celeba", "celebahq", "vggface2", "ffhq")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, metavar="INPUT", help="folder of photos (never modified)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                        help="new or earlier-prepared folder outside INPUT (a rerun resumes)")
    parser.add_argument("--size", type=int, default=256, help="side of the aligned square crops (default 256)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that decode and detect in parallel (default 1 = in this process)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default 1: on shared machines more threads "
                             "oversubscribe the cores; scale with --workers)")
    parser.add_argument("--dataset", default="identity_folder", metavar="LAYOUT",
                        help=f"layout of INPUT and its identity rule: {', '.join(LAYOUTS)} "
                             f"(default identity_folder: INPUT/<identity>/<image>, top-level files unlabelled)")
    parser.add_argument("--dataset-param", action="append", default=[], metavar="KEY=VALUE",
                        help="layout parameter, e.g. identity_file=Anno/identity_CelebA.txt (repeatable)")
    parser.add_argument("--face-scale", type=float, default=1.0,
                        help="size of the face in the crop relative to the ArcFace template (< 1 keeps more "
                             "hair and background; at most 1.14, where the lower lip reaches the crop's edge; "
                             "default 1.0)")
    parser.add_argument("--multiple-faces", choices=("largest", "skip"), default="largest",
                        help="photos with several faces: crop the largest (default) or skip the photo")
    parser.add_argument("--min-score", type=float, default=0.9, help="MTCNN score for a face to count (default 0.9)")
    parser.add_argument("--detect-max-side", type=int, default=1024,
                        help="larger photos are downscaled to this side for detection only (default 1024)")
    parser.add_argument("--max-pixels", type=float, default=100e6,
                        help="photos above this many pixels are refused unread (status too_large; default 1e8)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import math
    import sys

    from ..data.prepare import PrepareSettings, prepare
    from ..errors import UserError

    params = {}
    for item in args.dataset_param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--dataset-param expects KEY=VALUE, got {item!r}")
        params[key] = value
    # A float for 1e8-style values; int() would raise a traceback on nan or inf, and 0.5 would become 0.
    if not (math.isfinite(args.max_pixels) and args.max_pixels >= 1):
        raise UserError(f"--max-pixels must be a finite number >= 1, got {args.max_pixels}")
    settings = PrepareSettings(size=args.size, face_scale=args.face_scale, dataset=args.dataset,
                               dataset_params=params, multiple_faces=args.multiple_faces, min_score=args.min_score,
                               detect_max_side=args.detect_max_side, max_pixels=int(args.max_pixels))
    summary = prepare(args.input, args.output, settings, workers=args.workers, threads=args.threads,
                      progress=not args.quiet)
    counts = ", ".join(f"{status} {n}" for status, n in summary.statuses.items())
    print(f"prepare: {summary.total} image files: {counts}")
    print(f"prepare: {summary.processed} processed in {summary.seconds:.1f} s "
          f"({summary.images_per_second:.2f} images/s), {summary.skipped} already done; "
          f"{summary.usable} usable crops; manifest {summary.manifest}")
    if summary.ignored_files:
        print(f"prepare: {summary.ignored_files} other files in the input were not image files for this layout")
    if summary.usable == 0:
        print("prepare: error: no usable face in any input file (see the manifest's status and message)",
              file=sys.stderr)
        return 1
    return 0
