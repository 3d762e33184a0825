"""MTCNN face detection per photo: facenet-pytorch's ``MTCNN.detect`` against id2face's
``id2face.data.mtcnn.detect`` (the same networks and detections, no host read per candidate face),
on the same photos, optionally while the GPU is kept busy as the sampler keeps it in `id2face anonymize`.

    python benchmarks/face_detection.py [--device cpu|cuda] [--photos 4] [--sides 1024 2048] [--busy-gpu]

Photos: anonymize_throughput.py's group photos (4032 x 3024, 4 SynthFaces faces each), downscaled
to each --side as the anonymize pipeline's ``FaceDetector`` does. Per implementation and side: ms
per photo (median, after a warm-up photo), faces found (score >= 0.8), torch ops dispatched and
host reads per photo (CUDA: synchronizing calls, as ``torch.cuda.set_sync_debug_mode`` reports
them; CPU: the ops that would be syncs on a GPU: scalar reads, nonzero, NMS, boolean-mask
indexing; torchvision's CPU NMS goes class by class beyond 1000 boxes, its GPU NMS not), and the
largest difference between the two implementations' boxes and landmarks (px). Per side also the host
time to make what MTCNN sees from the 12 MP photo (PIL's resize, as before, against ``FaceDetector.downscaled``)
and whether MTCNN finds the same faces on both. ``--busy-gpu``: a second thread keeps bf16
matmuls queued on the default stream while detection runs on a stream of its own, as in the
anonymize pipeline (its detection worker threads and the sampling thread); ours runs twice, on a
default-priority stream and on one of the pipeline's stage priority (``STAGE_STREAM_PRIORITY``).
Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, a sibling of this script

import torch  # noqa: E402

import _common as C  # noqa: E402
from anonymize_throughput import make_photos  # noqa: E402

from id2face.anonymize.workers import STAGE_STREAM_PRIORITY  # noqa: E402
from id2face.data.mtcnn import detect  # noqa: E402
from id2face.data.prepare import FaceDetector  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--photos", type=int, default=4, help="timed photos per side (default 4)")
    parser.add_argument("--sides", type=int, nargs="+", default=[1024, 2048],
                        help="detection sizes, the photo's longer side in px (default 1024 2048; anonymize: 2048)")
    parser.add_argument("--photo-size", type=int, nargs=2, default=[4032, 3024], metavar=("W", "H"))
    parser.add_argument("--busy-gpu", action="store_true", help="CUDA: time detection while matmuls keep the GPU busy")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.busy_gpu and args.device != "cuda":
        parser.error("--busy-gpu needs --device cuda")
    return args


class BusyGPU:
    """A thread that keeps 8192 x 8192 bf16 matmuls queued on the default stream (a few ms each,
    every SM busy), as batched sampling does, until the ``with`` block ends."""

    def __init__(self, device: torch.device):
        self.device, self.stop, self.matmuls = device, threading.Event(), 0

    def _run(self) -> None:
        a = torch.randn(8192, 8192, device=self.device, dtype=torch.bfloat16)
        while not self.stop.is_set():
            for _ in range(4):
                a @ a
            self.matmuls += 4
            torch.cuda.current_stream(self.device).synchronize()  # a queue a few matmuls deep, as a sampler's

    def __enter__(self) -> "BusyGPU":
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def run_one(driver: str, mtcnn, photo: np.ndarray, device: torch.device, stream) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (K, 5), points (K, 5, 2)) of one implementation, on ``stream`` (CUDA) synchronized."""
    def call():
        if driver == "facenet-pytorch":
            boxes, scores, points = mtcnn.detect(photo, landmarks=True)
            if boxes is None:
                return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
            return np.concatenate([boxes, scores[:, None]], axis=1).astype(np.float32), points.astype(np.float32)
        return detect(mtcnn, photo)

    if stream is None:
        return call()
    with torch.cuda.stream(stream):
        result = call()
        stream.synchronize()
    return result


IMPLEMENTATIONS = ("facenet-pytorch", "id2face")
# With the GPU busy, ours also on a stream of the anonymize pipeline's stage priority
# (``STAGE_STREAM_PRIORITY``: its blocks go before the queued matmuls').
STAGE_STREAM = "id2face, stage-priority stream"


def measure(mtcnn, photos: list[np.ndarray], device: torch.device, busy: bool) -> dict:
    variants = [(name, name, 0) for name in IMPLEMENTATIONS]
    if busy:
        variants.append((STAGE_STREAM, "id2face", STAGE_STREAM_PRIORITY))
    figures: dict = {}
    for label, driver, priority in variants:
        stream = torch.cuda.Stream(device, priority=priority) if device.type == "cuda" else None
        run_one(driver, mtcnn, photos[0], device, stream)  # warm-up: cuDNN plans, allocator
        seconds, results = [], []
        with BusyGPU(device) if busy else nullcontext():
            for photo in photos:
                seconds.append(C.timed(lambda: results.append(run_one(driver, mtcnn, photo, device, stream)), device))
        counter = C.HostReadCounter()
        with counter:
            run_one(driver, mtcnn, photos[0], device, stream)
        if device.type == "cuda":
            reads = len(C.host_syncs(lambda: run_one(driver, mtcnn, photos[0], device, stream)))
        else:
            reads = counter.host_reads
        figures[label] = {"ms_per_photo": 1000 * C.median(seconds), "faces": sum(int((b[:, 4] >= 0.8).sum())
                                                                                for b, _ in results),
                          "ops_per_photo": sum(counter.counts.values()), "host_reads_per_photo": reads,
                          "results": results}
        C.progress(f"{label}: {figures[label]['ms_per_photo']:.1f} ms/photo")
    theirs, ours = (figures[name]["results"] for name in IMPLEMENTATIONS)
    for label, _, _ in variants:
        figures[label].pop("results")
    figures["max_difference_px"] = max((float(np.abs(a[0][:, :4] - b[0][:, :4]).max(initial=0.0)) for a, b in
                                        zip(theirs, ours) if a[0].shape == b[0].shape), default=0.0)
    figures["same_faces"] = all(a[0].shape == b[0].shape for a, b in zip(theirs, ours))
    return figures


def pil_downscaled(photo: np.ndarray, side: int) -> np.ndarray:
    """What MTCNN saw until FaceDetector.downscaled used torch: PIL's bilinear resize of its own copy of the photo."""
    scale = side / max(photo.shape[:2])
    size = (round(photo.shape[1] * scale), round(photo.shape[0] * scale))
    return np.asarray(Image.fromarray(photo).resize(size, Image.BILINEAR, reducing_gap=3.0))


def downscale_figures(mtcnn, originals: list[np.ndarray], side: int) -> dict:
    """Host ms per photo of making what MTCNN sees, PIL's way and ``FaceDetector.downscaled``'s, and
    whether MTCNN finds the same faces on both."""
    ours = FaceDetector(max_side=side).downscaled
    figures = {}
    for name, resize in (("pil", lambda photo: pil_downscaled(photo, side)), ("id2face", lambda photo: ours(photo)[0])):
        resize(originals[0])
        figures[f"{name}_ms"] = 1000 * C.median([C.timed(lambda: resize(photo), torch.device("cpu"))
                                                 for photo in originals])
    pairs = [(pil_downscaled(photo, side), ours(photo)[0]) for photo in originals]
    figures["max_level_difference"] = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in pairs)
    found = [(detect(mtcnn, a)[0], detect(mtcnn, b)[0]) for a, b in pairs]
    figures["same_faces"] = all(len(a) == len(b) for a, b in found)
    # each box against its nearest on the other photo: faces of about equal size may swap places
    # in the largest-first order
    figures["max_box_difference_px"] = max((float(np.abs(a[:, None, :4] - b[None, :, :4]).max(-1).min(1).max())
                                            for a, b in found if len(a) == len(b) > 0), default=0.0)
    return figures


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.resolve_device(args.device)
    from facenet_pytorch import MTCNN

    mtcnn = MTCNN(keep_all=True, select_largest=True, min_face_size=20, device=device).eval()
    with tempfile.TemporaryDirectory() as folder:
        make_photos(Path(folder), args.photos, 4, size=tuple(args.photo_size), fmt="jpg")
        originals = [np.asarray(Image.open(path).convert("RGB")) for path in sorted(Path(folder).iterdir())]
    C.progress(f"{len(originals)} photos made")
    rows, figures = [], {"device": C.machine_description(device), "busy_gpu": args.busy_gpu, "sides": {}}
    for side in args.sides:
        as_detected = FaceDetector(max_side=side).downscaled  # as the anonymize pipeline hands photos to MTCNN
        by_side = measure(mtcnn, [as_detected(photo)[0] for photo in originals], device, args.busy_gpu)
        figures["sides"][str(side)] = by_side
        for name in (*IMPLEMENTATIONS, STAGE_STREAM):
            if name in by_side:
                row = by_side[name]
                rows.append([side, name, f"{row['ms_per_photo']:.1f}", row["faces"], row["ops_per_photo"],
                             row["host_reads_per_photo"]])
        figures["sides"][str(side)]["speedup"] = (by_side["facenet-pytorch"]["ms_per_photo"]
                                                  / by_side["id2face"]["ms_per_photo"])
        by_side["downscale"] = downscale_figures(mtcnn, originals, side)
    print(f"MTCNN per photo: {args.photos} photos {args.photo_size[0]}x{args.photo_size[1]} x 4 SynthFaces faces, "
          f"device {args.device} ({figures['device']}){', GPU kept busy by matmuls' if args.busy_gpu else ''}")
    C.print_table(["side", "implementation", "ms/photo", "faces", "ops/photo",
                   "host syncs/photo" if device.type == "cuda" else "host reads/photo"], rows)
    for side, by_side in figures["sides"].items():
        print(f"side {side}: id2face {by_side['speedup']:.2f}x facenet-pytorch's speed; same faces: "
              f"{by_side['same_faces']}, largest box difference {by_side['max_difference_px']:.2e} px")
        shrink = by_side["downscale"]
        print(f"side {side}: photo -> what MTCNN sees (host): PIL {shrink['pil_ms']:.1f} ms, id2face "
              f"{shrink['id2face_ms']:.1f} ms (levels apart <= {shrink['max_level_difference']}); MTCNN on each: "
              f"same faces {shrink['same_faces']}, largest box difference {shrink['max_box_difference_px']:.2f} px")
    C.print_json(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
