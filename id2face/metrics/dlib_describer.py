"""dlib face descriptors, in this process or in worker processes.

dlib holds the GIL while it detects and embeds (~0.1 s a 150 px crop on one core), so threads can
overlap it neither with each other nor with the sampling thread of ``id2face anonymize``, whose
kernel launches it would stall. Worker processes can. This module imports only dlib and numpy, so
a spawned worker starts without torch.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence


class DlibDescriber:
    """HOG face detection (``upsample`` times 2x; the largest face, else the frame inset by
    ``fallback_margin`` stands in), the 5-point shape predictor, then the 128-d descriptor."""

    def __init__(self, shape_predictor: str, recognition_model: str, upsample: int = 1,
                 fallback_margin: float = 0.1, num_jitters: int = 0):
        import dlib

        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(shape_predictor)
        self._net = dlib.face_recognition_model_v1(recognition_model)
        self.upsample, self.fallback_margin, self.num_jitters = int(upsample), float(fallback_margin), int(num_jitters)

    def _face_box(self, frame):
        detections = self._detector(frame, self.upsample)
        if len(detections):
            return max(detections, key=lambda r: r.area()), True
        h, w = frame.shape[:2]
        mx, my = int(round(self.fallback_margin * w)), int(round(self.fallback_margin * h))
        return self._dlib.rectangle(mx, my, w - 1 - mx, h - 1 - my), False

    def __call__(self, frames: Sequence) -> list[tuple[list[float], bool]]:
        """(descriptor, detected) per (H, W, 3) uint8 frame."""
        out = []
        for frame in frames:
            box, found = self._face_box(frame)
            shape = self._shape(frame, box)
            out.append((list(self._net.compute_face_descriptor(frame, shape, self.num_jitters)), found))
        return out


_worker: DlibDescriber | None = None


def _start_worker(*args) -> None:
    global _worker
    _worker = DlibDescriber(*args)


def _describe_in_worker(frames: Sequence) -> list[tuple[list[float], bool]]:
    return _worker(frames)


class DlibProcessPool:
    """``workers`` spawned processes, each with its own ``DlibDescriber``; a call splits the frames
    into one contiguous chunk per worker and returns the results in order."""

    def __init__(self, workers: int, *describer_args):
        self.workers = int(workers)
        # spawn, not fork: the parent may hold CUDA state and threads that a forked child inherits.
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_worker, initargs=describer_args)

    def __call__(self, frames: Sequence) -> list[tuple[list[float], bool]]:
        size = -(-len(frames) // self.workers) if frames else 1
        chunks = [frames[i:i + size] for i in range(0, len(frames), size)]
        return [row for rows in self._pool.map(_describe_in_worker, chunks) for row in rows]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
