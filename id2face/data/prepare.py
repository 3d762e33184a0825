"""`id2face prepare`: detect, align and crop every face photo of a dataset, once, with a manifest.

Output layout (what every real dataset reads in prepared mode)::

    OUTPUT/prepare.json        settings (size, face_scale, template, dataset, detector settings)
    OUTPUT/manifest.jsonl      one JSON object per input image file, sorted by source path
    OUTPUT/images/<source relative path, suffix .png>   the aligned crops (usable entries only;
                               a.jpg.png where a.jpg and a.png both exist: see output_paths)
    OUTPUT/prepare_errors.log  tracebacks of unexpected per-file errors (status ``error``)

Manifest fields: ``source`` (relative to INPUT), ``output`` (relative to OUTPUT, null when no
crop), ``status``, ``message`` (one line, "" when nothing to say), ``identity`` (the dataset's
label or null), ``score``, ``box`` [x0, y0, x1, y1] and ``landmarks`` (5, 2) in the upright source
image, ``landmarks_crop`` in the crop, ``matrix`` (2, 3) source -> crop, ``num_faces``,
``source_size`` [w, h] (upright), ``source_bytes``/``source_mtime_ns`` (resume key),
``output_bytes``, plus dataset fields (CelebA ``partition``).

Statuses: ``ok``; ``multiple_faces`` (several faces scored >= min_score: with the default
``--multiple-faces largest`` the largest is cropped and the entry is usable, with ``skip`` there
is no crop); ``no_face``; ``too_small``; ``empty_file``; ``not_an_image``; ``truncated``;
``unreadable``; ``too_large`` (over ``--max-pixels``, never decoded); ``error`` (a bug: the
traceback goes to prepare_errors.log). Photos larger than ``--detect-max-side`` are downscaled
for detection only; the crop is cut from the full-resolution photo.

Resumable: a rerun keeps every entry whose source file is unchanged (size and mtime) and whose
crop exists under its name with the recorded size, and redoes the rest (plus ``error`` and ``too_large``, which
may succeed with a fixed bug or a higher cap). Crops are written to a temporary name and renamed,
so a crop that exists is complete. Inputs are opened read-only and never modified.
"""
from __future__ import annotations

import json
import os
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import UserError, one_line
from .datasets import (MANIFEST_NAME, META_NAME, USABLE_STATUSES, AlignedFaceDataset, RawEntry, is_usable,
                       read_manifest)
from .imageio import DEFAULT_MAX_PIXELS, ImageReadError, read_image

FORMAT_VERSION = 1
ERROR_LOG_NAME = "prepare_errors.log"
RETRY_STATUSES = frozenset({"error", "too_large"})
MULTIPLE_FACE_POLICIES = ("largest", "skip")
# Settings that decide what a crop looks like: a rerun into the same OUTPUT must repeat them.
_FIXED_SETTINGS = ("size", "face_scale", "dataset", "dataset_params", "multiple_faces", "min_score",
                   "detect_max_side", "min_face_size")


@dataclass
class PrepareSettings:
    size: int = 256
    face_scale: float = 1.0
    dataset: str = "identity_folder"
    dataset_params: dict = field(default_factory=dict)
    multiple_faces: str = "largest"
    min_score: float = 0.9
    detect_max_side: int = 1024
    min_face_size: int = 20
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class PrepareSummary:
    total: int                      # image files in INPUT
    skipped: int                    # already done by an earlier run
    processed: int                  # handled by this run
    usable: int                     # entries with a crop (this run + earlier)
    statuses: dict[str, int]        # status -> count over all entries
    seconds: float                  # wall time of the processing loop
    images_per_second: float        # processed / seconds
    manifest: str
    ignored_files: int = 0          # non-image files in INPUT (not in the manifest)


@dataclass
class Job:
    source: str
    output: str
    identity: str | None
    extra: dict


class FaceDetector:
    """MTCNN on CPU or a given device: facenet-pytorch's networks (their weights ship in the wheel)
    run by ``id2face.data.mtcnn.detect``.

    ``__call__(pixels (H, W, 3) uint8)`` -> ``(boxes (K, 4), scores (K,), landmarks (K, 5, 2))``
    float64 in ``pixels`` coordinates, largest box first. Photos larger than ``max_side`` are
    downscaled for the detector (a few hundred pixels of face are plenty for 5 points).
    Raises ``ImageReadError("too_small")`` below ``min_face_size`` pixels (MTCNN has no scale).
    """

    def __init__(self, min_face_size: int = 20, max_side: int = 1024, device: str = "cpu",
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)):
        from facenet_pytorch import MTCNN

        self.min_face_size, self.max_side = int(min_face_size), int(max_side)
        self.mtcnn = MTCNN(min_face_size=self.min_face_size, thresholds=list(thresholds), keep_all=True,
                           select_largest=True, device=device).eval()

    def downscaled(self, pixels: np.ndarray) -> tuple[np.ndarray, float, float]:
        """(the photo MTCNN sees, its x and y scale): ``pixels`` downscaled to ``max_side`` if larger."""
        import torch

        height, width = pixels.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        if scale == 1.0:
            return pixels, 1.0, 1.0
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        # torch's uint8 antialiased bilinear (the (H, W, 3) array is already its channels-last
        # layout, no copy): within one level of PIL's resize and 3-5x faster, 20-32 vs 80-110 ms
        # for a 12 MP photo to 2048 px on the CI machine (benchmarks/face_detection.py), where PIL
        # first copies the photo into its own pixels.
        with warnings.catch_warnings():  # decoded photos are read-only arrays; nothing writes to this view
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            photo = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
        small = torch.nn.functional.interpolate(photo, size=size, mode="bilinear", antialias=True)
        return small[0].permute(1, 2, 0).contiguous().numpy(), size[1] / width, size[0] / height

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from .mtcnn import detect

        height, width = pixels.shape[:2]
        detect_on, scale_x, scale_y = self.downscaled(pixels)
        if min(detect_on.shape[:2]) < self.min_face_size:
            where = " after downscaling for detection" if detect_on is not pixels else ""
            raise ImageReadError("too_small", f"{width}x{height} is below the {self.min_face_size} px "
                                              f"minimum face size{where}")
        found, points = detect(self.mtcnn, detect_on)
        boxes, scores, points = (found[:, :4].astype(np.float64), found[:, 4].astype(np.float64),
                                 points.astype(np.float64))
        to_source = np.array([scale_x, scale_y])
        boxes = (boxes.reshape(-1, 2, 2) + 0.5) / to_source - 0.5
        points = (points + 0.5) / to_source - 0.5
        return boxes.reshape(-1, 4), scores, points


def process_file(job: Job, input_root: Path, output_root: Path, settings: PrepareSettings,
                 detector: FaceDetector | Callable[[], FaceDetector]) -> dict:
    """Read, detect, align and write one photo; always returns a manifest entry (never raises
    for a bad photo; an unexpected exception becomes status ``error`` with ``_traceback``).
    ``detector`` may be a factory, called only once a photo has decoded."""
    from PIL import Image

    from .align import alignment_matrix, crop_face, transform_points

    source = input_root / job.source
    entry: dict[str, Any] = {"source": job.source, "output": None, "status": "", "message": "",
                             "identity": job.identity, **job.extra}
    try:
        try:
            stat = os.stat(source)
        except OSError as err:
            raise ImageReadError("unreadable", f"cannot access file: {err.strerror or err}") from None
        entry.update(source_bytes=stat.st_size, source_mtime_ns=stat.st_mtime_ns)
        loaded = read_image(source, settings.max_pixels)
        entry["source_size"] = list(loaded.size)
        notes = list(loaded.notes)
        if not isinstance(detector, FaceDetector):
            detector = detector()
        if max(loaded.size) > detector.max_side:
            notes.append(f"downscaled to {detector.max_side} px for detection")
        boxes, scores, points = detector(loaded.pixels)
        confident = np.flatnonzero(scores >= settings.min_score)
        entry["num_faces"] = int(len(confident))
        if len(confident) == 0:
            best = f" (best score {scores.max():.2f} < --min-score {settings.min_score})" if len(scores) else ""
            return _finish(entry, "no_face", f"no face detected{best}", notes)
        areas = (boxes[confident, 2] - boxes[confident, 0]) * (boxes[confident, 3] - boxes[confident, 1])
        chosen = int(confident[int(np.argmax(areas))])
        status = "ok"
        if len(confident) > 1:
            status = "multiple_faces"
            if settings.multiple_faces == "skip":
                return _finish(entry, status, f"{len(confident)} faces; skipped (--multiple-faces skip)", notes)
            notes.insert(0, f"{len(confident)} faces; kept the largest")
        landmarks = points[chosen]
        matrix = alignment_matrix(landmarks, settings.size, settings.face_scale)
        crop = crop_face(loaded.pixels, matrix, settings.size)
        output = output_root / job.output
        output.parent.mkdir(parents=True, exist_ok=True)
        temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        try:
            Image.fromarray(crop).save(temporary, format="PNG", compress_level=3)
            os.replace(temporary, output)
        finally:
            if temporary.exists():
                temporary.unlink()
        entry.update(output=job.output, output_bytes=output.stat().st_size, score=_round(scores[chosen], 5),
                     box=_round(boxes[chosen]), landmarks=_round(landmarks),
                     landmarks_crop=_round(transform_points(landmarks, matrix)), matrix=_round(matrix, 6))
        return _finish(entry, status, "", notes)
    except ImageReadError as err:
        return _finish(entry, err.status, str(err), [])
    except Exception as err:  # noqa: BLE001 - one odd file must not stop a 200k-image run
        entry["_traceback"] = traceback.format_exc()
        return _finish(entry, "error", f"internal error {type(err).__name__}: {one_line(err, 200)} "
                                       f"(traceback in {ERROR_LOG_NAME})", [])


def _finish(entry: dict, status: str, message: str, notes: list[str]) -> dict:
    entry["status"] = status
    entry["message"] = "; ".join([m for m in [message, *notes] if m])
    return entry


def _round(values, digits: int = 2):
    if np.ndim(values) == 0:
        return round(float(values), digits)
    return np.round(np.asarray(values, dtype=np.float64), digits).tolist()


# -- worker plumbing: a torch Dataset so DataLoader workers decode and detect in parallel -------
_DETECTORS: dict[tuple, FaceDetector] = {}


class _Jobs:
    """Map-style dataset of jobs; each worker process builds its own detector on first use."""

    def __init__(self, jobs: list[Job], input_root: Path, output_root: Path, settings: PrepareSettings):
        self.jobs, self.input_root, self.output_root, self.settings = jobs, input_root, output_root, settings

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict:
        return process_file(self.jobs[index], self.input_root, self.output_root, self.settings, self._detector)

    def _detector(self) -> FaceDetector:
        key = (self.settings.min_face_size, self.settings.detect_max_side)
        if key not in _DETECTORS:
            _DETECTORS[key] = FaceDetector(*key)
        return _DETECTORS[key]


def _unbatched(item):
    return item


def _worker_init(threads: int, worker_id: int):
    import torch

    torch.set_num_threads(threads)


def _run_jobs(jobs: list[Job], input_root: Path, output_root: Path, settings: PrepareSettings,
              workers: int, threads: int | None) -> Iterator[dict]:
    import functools

    import torch

    if not jobs:  # a finished run: no workers to start
        return
    dataset = _Jobs(jobs, input_root, output_root, settings)
    # One torch thread per worker unless asked: MTCNN's small convolutions gain little from
    # intra-op threads, and on a machine shared with other jobs (or a SLURM node where
    # os.cpu_count() is the whole node) spinning OpenMP threads make it 10-30x slower.
    # Scale with --workers (processes) instead.
    threads = threads or 1
    if workers <= 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for index in range(len(dataset)):
                yield dataset[index]
        finally:
            torch.set_num_threads(before)
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                         collate_fn=_unbatched, prefetch_factor=2,
                                         worker_init_fn=functools.partial(_worker_init, threads))
    yield from loader


# -- the command -------------------------------------------------------------------------------
def check_folders(input_root: Path, output_root: Path) -> tuple[Path, Path]:
    """Resolve and validate INPUT and OUTPUT (UserError on any problem)."""
    if not input_root.exists():
        raise UserError(f"input folder {input_root} does not exist")
    if not input_root.is_dir():
        raise UserError(f"input {input_root} is not a folder")
    source, target = input_root.resolve(), output_root.expanduser().resolve()
    if target == source or source in target.parents:
        raise UserError(f"output {output_root} is inside the input {input_root}: choose a folder outside it "
                        f"(prepare never writes into its input)")
    if target in source.parents:
        raise UserError(f"input {input_root} is inside the output {output_root}: choose a separate output folder")
    if target.exists() and not target.is_dir():
        raise UserError(f"output {output_root} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / META_NAME).is_file():
        raise UserError(f"output {output_root} is a non-empty folder that `prepare` did not create "
                        f"(no {META_NAME}): choose a new or empty folder")
    return source, target


def output_paths(sources: list[str]) -> list[str]:
    """images/<source with .png>, one distinct name per source. A source keeps its suffix
    (images/a.jpg.png) where its stem is shared in one folder (a.jpg, a.png) or is itself a source
    (a.jpg.png beside a.jpg, whose crop is then images/a.jpg.png; a.jpg.png's is images/a.jpg.png.png):
    a suffix-free name can then only equal another suffix-free one, of the same stem, which both
    rules exclude. The names depend on the set of sources only, so a rerun repeats them."""
    stems = [Path(s).with_suffix("").as_posix() for s in sources]
    shared, names = Counter(stems), set(sources)
    return [f"images/{stem}.png" if shared[stem] == 1 and stem not in names else f"images/{source}.png"
            for source, stem in zip(sources, stems)]


def check_outputs(outputs: list[str], output_root: Path) -> None:
    """Refuse (UserError) a crop path that would land outside ``output_root`` (resolved): by ".."
    from a dataset layout, or through a symlinked folder under it. Crops are written there and
    the input may be beside it: one escaping path could overwrite a source photo."""
    for output in outputs:
        if Path(output).is_absolute() or ".." in Path(output).parts:
            raise UserError(f"crop path {output!r} would be outside the output {output_root}: "
                            f"the dataset layout gave a source path outside the input")
    for folder in sorted({Path(output).parent for output in outputs}):  # one resolve per folder
        resolved = Path(os.path.realpath(output_root / folder))  # realpath: a link loop is no crash
        if resolved != output_root and output_root not in resolved.parents:
            raise UserError(f"{output_root / folder} resolves to {resolved}, outside the output {output_root}: "
                            f"remove that link or choose a new output folder")


def _dataset_class(name: str) -> type[AlignedFaceDataset]:
    from ..registry import DATASETS

    cls = DATASETS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, AlignedFaceDataset)):
        usable = [n for n in DATASETS.names()
                  if isinstance(DATASETS.get(n), type) and issubclass(DATASETS.get(n), AlignedFaceDataset)]
        raise UserError(f"dataset '{name}' has no on-disk layout to prepare; choose one of {', '.join(usable)}")
    return cls


def scan_input(input_root: Path, dataset: str, params: dict) -> list[RawEntry]:
    cls = _dataset_class(dataset)
    unknown = sorted(set(params) - set(cls.layout_params))
    if unknown:
        raise UserError(f"dataset '{dataset}' has no layout parameter {', '.join(unknown)}; "
                        f"valid: {', '.join(cls.layout_params) or '(none)'}")
    return cls.scan_raw(input_root, **params)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _check_meta(output_root: Path, settings: PrepareSettings) -> dict:
    meta = {"format": FORMAT_VERSION, **asdict(settings)}
    from .align import template_landmarks

    meta["template"] = np.round(template_landmarks(settings.size, settings.face_scale), 4).tolist()
    meta_path = output_root / META_NAME
    if meta_path.is_file():
        try:
            previous = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{meta_path} is not valid JSON: remove it or use a new output folder") from None
        changed = [f"{k}={previous.get(k)!r} (now {meta[k]!r})" for k in _FIXED_SETTINGS if previous.get(k) != meta[k]]
        if changed:
            raise UserError(f"{output_root} was prepared with other settings: {', '.join(changed)}; "
                            f"rerun with the same settings or choose a new output folder")
    return meta


def _is_done(previous: dict | None, source: Path, output_root: Path, output: str) -> bool:
    if previous is None or previous.get("status") in RETRY_STATUSES:
        return False
    try:
        stat = os.stat(source)
    except OSError:
        return False
    if (previous.get("source_bytes"), previous.get("source_mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
        return False
    if is_usable(previous):
        # Renamed since (a sibling appeared, see output_paths): redo it under its new name, or a
        # new source's crop could be written at the name this entry still points at.
        if previous["output"] != output:
            return False
        path = output_root / output
        return path.is_file() and path.stat().st_size == previous.get("output_bytes")
    return True


def prepare(input_root: str | Path, output_root: str | Path, settings: PrepareSettings | None = None,
            workers: int = 1, threads: int | None = None, progress: bool = True) -> PrepareSummary:
    """Run the whole preparation (see the module docstring); returns the summary.

    ``workers`` processes decode and detect (1 = this process), each with ``threads`` torch
    threads (default 1; see ``_run_jobs``).
    """
    settings = settings or PrepareSettings()
    if settings.multiple_faces not in MULTIPLE_FACE_POLICIES:
        raise UserError(f"--multiple-faces must be one of {', '.join(MULTIPLE_FACE_POLICIES)}")
    if not 16 <= settings.size <= 4096:
        raise UserError(f"--size must be between 16 and 4096, got {settings.size}")
    from .align import MAX_FACE_SCALE

    if not 0.1 <= settings.face_scale <= MAX_FACE_SCALE:  # larger: anonymize could not regenerate the whole face
        raise UserError(f"--face-scale must be between 0.1 and {MAX_FACE_SCALE:g} (larger puts the inner face past "
                        f"the crop), got {settings.face_scale}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    # anonymize's floor: smaller leaves MTCNN too few pixels for a face (0 made every photo too_small)
    if not settings.detect_max_side >= 32:
        raise UserError(f"--detect-max-side must be >= 32, got {settings.detect_max_side}")
    if not settings.max_pixels >= 1:  # `not >=`: NaN fails too
        raise UserError(f"--max-pixels must be >= 1, got {settings.max_pixels}")
    input_root, output_root = check_folders(Path(input_root), Path(output_root))
    entries = scan_input(input_root, settings.dataset, settings.dataset_params)
    if not entries:
        raise UserError(f"no image files under {input_root} for dataset layout '{settings.dataset}'")
    ignored = _count_other_files(input_root, len(entries))
    meta = _check_meta(output_root, settings)
    manifest_path = output_root / MANIFEST_NAME
    previous = {e["source"]: e for e in read_manifest(manifest_path)} if manifest_path.is_file() else {}
    jobs, final = [], {}
    for entry, output in zip(entries, output_paths([e.path for e in entries])):
        old = previous.get(entry.path)
        if _is_done(old, input_root / entry.path, output_root, output):
            old.update(identity=entry.identity, **entry.extra)  # labels may have been corrected since
            final[entry.path] = old
        else:
            jobs.append(Job(entry.path, output, entry.identity, entry.extra))
    check_outputs([job.output for job in jobs], output_root)  # before anything is written
    output_root.mkdir(parents=True, exist_ok=True)
    meta["input"] = str(input_root)
    _write_atomic(output_root / META_NAME, json.dumps(meta, indent=1) + "\n")

    started = time.perf_counter()
    with open(manifest_path, "a", encoding="utf-8") as manifest, _progress(len(jobs), progress) as bar:
        counts: Counter = Counter()
        for entry in _run_jobs(jobs, input_root, output_root, settings, workers, threads):
            trace = entry.pop("_traceback", None)
            if trace:
                # backslashreplace: a source name that is not UTF-8 arrives with surrogate escapes
                with open(output_root / ERROR_LOG_NAME, "a", encoding="utf-8", errors="backslashreplace") as log:
                    log.write(f"--- {entry['source']}\n{trace}\n")
            manifest.write(json.dumps(entry) + "\n")
            manifest.flush()
            final[entry["source"]] = entry
            counts[entry["status"]] += 1
            bar.update(1)
            bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in sorted(counts.items())), refresh=False)
    seconds = time.perf_counter() - started

    ordered = [final[e.path] for e in entries]
    _write_atomic(manifest_path, "".join(json.dumps(e) + "\n" for e in ordered))
    statuses = Counter(e["status"] for e in ordered)
    return PrepareSummary(
        total=len(entries), skipped=len(entries) - len(jobs), processed=len(jobs),
        usable=sum(is_usable(e) for e in ordered), statuses=dict(sorted(statuses.items())),
        seconds=seconds, images_per_second=len(jobs) / seconds if jobs and seconds > 0 else 0.0,
        manifest=str(manifest_path), ignored_files=ignored)


def _count_other_files(root: Path, images: int) -> int:
    total = sum(len([f for f in files if not f.startswith(".")]) for _, _, files in os.walk(root))
    return max(0, total - images)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="prepare", unit="img", dynamic_ncols=True, mininterval=0.5, disable=not enabled)


__all__ = ["FaceDetector", "PrepareSettings", "PrepareSummary", "prepare", "process_file", "check_folders",
           "output_paths", "check_outputs", "scan_input", "USABLE_STATUSES"]
