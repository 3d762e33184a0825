"""Throughput of `id2face prepare` (images/s) against --workers, on astronaut-derived photos.

    python benchmarks/prepare_throughput.py [--images 24] [--runs 1x1 2x1 1x2] [--side 512]

Writes N JPEG photos made from skimage's astronaut (random crop, zoom, flip, brightness), runs
`prepare` on them once per run WxT (W --workers, T --threads per worker) into a fresh output
folder, and prints a table and a final JSON line. Timings include worker start-up and MTCNN construction (what a user waits for);
a resume rerun (nothing to do) is timed too. The load average is printed: on a shared machine
it matters more than the worker count.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from id2face.data.prepare import PrepareSettings, prepare  # noqa: E402


def make_photos(folder: Path, count: int, side: int, seed: int = 0) -> None:
    from skimage.data import astronaut

    source = Image.fromarray(astronaut())
    rng = np.random.default_rng(seed)
    for index in range(count):
        half = int(rng.uniform(150, 250))       # face stays inside: it spans x 180-270, y 60-175
        cx, cy = 225 + rng.uniform(-25, 25), 120 + rng.uniform(-20, 20)
        box = (int(cx - half), int(cy - half), int(cx + half), int(cy + half))
        photo = source.crop(box).resize((side, side), Image.BICUBIC)
        if rng.random() < 0.5:
            photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
        photo = ImageEnhance.Brightness(photo).enhance(rng.uniform(0.7, 1.3))
        (folder / f"person{index % 4}").mkdir(exist_ok=True)
        photo.save(folder / f"person{index % 4}" / f"{index:04d}.jpg", quality=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--runs", nargs="+", default=["1x1", "2x1", "1x2"],
                        help="WORKERSxTHREADS per run, in order (first = speedup baseline)")
    parser.add_argument("--side", type=int, default=512, help="side of the generated photos")
    parser.add_argument("--size", type=int, default=256, help="crop size")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        make_photos(photos, args.images, args.side)
        for run in args.runs:
            workers, threads = (int(v) for v in run.lower().split("x"))
            output = Path(tmp) / f"out{run}"
            load = os.getloadavg()[0]
            started = time.perf_counter()
            summary = prepare(photos, output, PrepareSettings(size=args.size), workers=workers,
                              threads=threads, progress=False)
            wall = time.perf_counter() - started
            rerun_started = time.perf_counter()
            rerun = prepare(photos, output, PrepareSettings(size=args.size), workers=workers,
                            threads=threads, progress=False)
            rerun_seconds = time.perf_counter() - rerun_started
            assert rerun.processed == 0
            rows.append({"workers": workers, "threads_per_worker": threads, "images": summary.processed,
                         "usable": summary.usable, "seconds": round(wall, 2),
                         "images_per_second": round(summary.processed / wall, 3),
                         "resume_seconds": round(rerun_seconds, 2), "load_average_1min": round(load, 2)})

    base = rows[0]["images_per_second"]
    print(f"prepare throughput: {args.images} photos {args.side}x{args.side} -> {args.size} px crops; "
          f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"{'workers':>7} {'threads':>7} {'images':>6} {'usable':>6} {'seconds':>8} {'img/s':>7} "
          f"{'speedup':>7} {'resume s':>8} {'load':>5}")
    for row in rows:
        print(f"{row['workers']:>7} {row['threads_per_worker']:>7} {row['images']:>6} {row['usable']:>6} "
              f"{row['seconds']:>8.2f} {row['images_per_second']:>7.2f} {row['images_per_second'] / base:>7.2f} "
              f"{row['resume_seconds']:>8.2f} {row['load_average_1min']:>5.1f}")
    print(json.dumps({"benchmark": "prepare_throughput", "cpu_count": os.cpu_count(), "side": args.side,
                      "size": args.size, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
