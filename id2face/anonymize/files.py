"""Photos on disk: input folders mirrored into the output folder, each photo and its JSON sidecar
written atomically (the sidecar last: a sidecar means a finished photo), finished photos skipped
on a rerun with the same settings, originals never opened for writing, and the run's summary.

The run's settings are recorded in the summary before the first photo (and in each sidecar), so a
rerun into a folder that an interrupted run left is refused with other settings as after a finished
one. Nothing is written where a link inside the output folder leads out of it: such a photo fails."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..data.imageio import ImageReadError, is_image_name, read_image
from ..errors import UserError, describe
from .engine import Anonymizer, round_values
from .workers import ahead, io_executor


SUMMARY_NAME = "anonymize_summary.json"
ERROR_LOG_NAME = "anonymize_errors.log"
SIDECAR_SUFFIX = ".json"
OUTPUT_FORMATS = ("keep", "png")
# Image statuses whose photo is written (the rest have a sidecar but no output photo).
WRITTEN_STATUSES = frozenset({"anonymized", "covered", "no_face"})
# Threads that decode and encode photo files beside the model: a 12 MP JPEG takes ~0.1 s each way
# on one core, as long as several faces take on a GPU.
DEFAULT_IO_WORKERS = min(4, os.cpu_count() or 1)
# Settings that decide what an output looks like: a rerun into the same folder must repeat them.
# min_face_size, detect_max_side: which faces the detector finds; cover_if_recognized: which it covers.
_FIXED_SETTINGS = ("checkpoint", "image_size", "steps", "keyed", "cover", "output_format", "min_score",
                   "face_scale", "template", "min_face_size", "detect_max_side", "cover_if_recognized")


@dataclass
class Job:
    source: Path      # the input photo
    output: Path      # the anonymized photo
    sidecar: Path     # its audit JSON
    relative: str     # output path relative to the output folder (POSIX)


def check_paths(inputs: Sequence[str | Path], output: str | Path) -> tuple[list[Path], Path]:
    """Resolve and validate the inputs and the output folder (UserError on any problem)."""
    if not inputs:
        raise UserError("no input given (-i FILE_OR_FOLDER ...)")
    resolved = []
    for given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            raise UserError(f"input {given} does not exist")
        resolved.append(path.resolve())
    target = Path(output).expanduser().resolve()
    for given, source in zip(inputs, resolved):
        if target == source:
            raise UserError(f"output {output} is the input {given}: choose another output folder "
                            "(anonymize never writes into its input)")
        if source.is_dir() and source in target.parents:
            raise UserError(f"output {output} is inside the input {given}: choose a folder outside it "
                            "(anonymize never writes into its input)")
        if target in source.parents:
            raise UserError(f"input {given} is inside the output {output}: choose a separate output folder")
    if target.exists() and not target.is_dir():
        raise UserError(f"output {output} exists and is not a folder")
    return resolved, target


def plan_jobs(inputs: Sequence[Path], output: Path, output_format: str = "keep") -> list[Job]:
    """One job per photo: a folder's photos (recursive, sorted; hidden files skipped) mirror into
    ``output`` by their path relative to the folder, a file goes to ``output/<name>``."""
    if output_format not in OUTPUT_FORMATS:
        raise UserError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    sources: list[tuple[Path, str]] = []
    for root in inputs:
        if root.is_dir():
            found = sorted(p for p in root.rglob("*") if p.is_file() and is_image_name(p)
                           and not any(part.startswith(".") for part in p.relative_to(root).parts))
            sources.extend((p, p.relative_to(root).as_posix()) for p in found)
        else:
            sources.append((root, root.name))
    if not sources:
        raise UserError("no image files in the inputs (extensions: jpg, png, bmp, webp, tif, gif, ppm)")
    relatives = [rel for _, rel in sources]
    if output_format == "png":
        stems = Counter(str(Path(rel).with_suffix("")) for rel in relatives)
        relatives = [f"{Path(rel).with_suffix('').as_posix()}.png" if stems[str(Path(rel).with_suffix(""))] == 1
                     else f"{rel}.png" for rel in relatives]
    seen: dict[str, Path] = {}
    jobs = []
    for (source, _), rel in zip(sources, relatives):
        if rel in seen:
            raise UserError(f"{seen[rel]} and {source} would both be written to {output / rel}: "
                            "give them separately or rename one")
        if rel in (SUMMARY_NAME, ERROR_LOG_NAME):
            raise UserError(f"{source} would overwrite the run's {rel}: rename it")
        seen[rel] = source
        jobs.append(Job(source, output / rel, output / f"{rel}{SIDECAR_SUFFIX}", rel))
    return jobs


def write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_photo(pixels: np.ndarray, path: Path) -> None:
    """Write ``pixels`` in the format of ``path``'s extension, atomically. JPEG at quality 95 without
    chroma subsampling, WebP lossless; no metadata is carried over (EXIF, GPS: dropped)."""
    import io

    from PIL import Image

    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    options: dict[str, Any] = {}
    if fmt == "JPEG":
        options = {"quality": 95, "subsampling": 0}
    elif fmt == "WEBP":
        options = {"lossless": True}
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())


def folder_problem(folder: Path, root: Path) -> str | None:
    """Why nothing may be written into ``folder`` (a folder of the output folder ``root``, both
    absolute, ``root`` resolved), else None: a link on its way that leads out of ``root`` (into an
    input, a write there would replace an original), or a file where one of its folders goes.
    Inside the real ``root`` is outside every input: check_paths refuses overlapping ones."""
    real = Path(os.path.realpath(folder))  # links followed; the part not there yet stays as it is
    shown = folder.relative_to(root).as_posix()
    if real != root and root not in real.parents:
        return f"folder {shown} leads outside the output folder (to {real}); anonymize writes only inside it"
    existing = real  # the root itself is a folder or not there yet (check_paths)
    while existing != root and not os.path.lexists(existing):
        existing = existing.parent
    if existing != root and not existing.is_dir():
        return f"{existing.relative_to(root).as_posix()} in the output folder is a file, not a folder"
    return None


def remove_output(job: Job) -> None:
    """Remove an earlier run's output of ``job`` (a photo whose new status writes none must not keep
    an old one): a file or a link itself, never what a link leads to, never a folder."""
    if job.output.is_symlink() or job.output.is_file():
        job.output.unlink()


def _source_stat(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def is_finished(job: Job, settings: Mapping[str, Any] | None = None, output: Path | None = None) -> dict | None:
    """The sidecar of a photo an earlier run finished (output written, source unchanged), else None.
    UserError if that run's fixed settings, recorded in the sidecar, are not ``settings`` (of a run
    into the folder ``output``): a killed run leaves no summary to tell, and its photos must not be
    mixed with other ones."""
    if not (job.sidecar.is_file() and job.output.is_file()):
        return None
    try:
        sidecar = json.loads(job.sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(sidecar, dict):
        return None
    if settings is not None and isinstance(sidecar.get("settings"), dict):
        _refuse_other(output or job.output.parent, sidecar["settings"], settings)
    if sidecar.get("status") not in WRITTEN_STATUSES:
        return None
    if _source_stat(job.source) != (sidecar.get("source_bytes"), sidecar.get("source_mtime_ns")):
        return None
    return sidecar


def run_settings(anonymizer: Anonymizer, info: Mapping[str, Any], output_format: str) -> dict:
    s = anonymizer.settings
    detector = anonymizer.detector_fn  # built now, not at the first photo; another detector records None
    return {"checkpoint": str(Path(info.get("checkpoint", "")).resolve()) if info.get("checkpoint") else None,
            "image_size": anonymizer.size, "steps": s.steps, "keyed": s.key is not None, "cover": s.cover,
            "output_format": output_format, "min_score": s.min_score, "face_scale": s.face_scale,
            "template": round_values(anonymizer.template, 3), "precision": s.precision,
            "min_face_size": getattr(detector, "min_face_size", None),
            "detect_max_side": getattr(detector, "max_side", None), "cover_if_recognized": s.cover_if_recognized}


def _check_previous(output: Path, settings: Mapping[str, Any]) -> None:
    path = output / SUMMARY_NAME
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text()).get("settings") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return
    _refuse_other(output, previous, settings)


def _refuse_other(output: Path, previous: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """UserError if ``previous`` (a record of an earlier run into ``output``) has other fixed settings;
    a setting it does not record (an older version's record) is not compared."""
    changed = [f"{k}={previous.get(k)!r} (now {settings.get(k)!r})" for k in _FIXED_SETTINGS
               if k in previous and previous.get(k) != settings.get(k)]
    if changed:
        raise UserError(f"{output} holds a run with other settings: {'; '.join(changed)}; "
                        "rerun with the same settings or choose a new output folder")


def _decode(job: Job) -> tuple[dict, np.ndarray | ImageReadError]:
    """(sidecar fields, pixels or the error that says why there are none) of ``job``'s source."""
    stat = _source_stat(job.source)
    meta = {"source": str(job.source), "output": job.relative,
            "source_bytes": stat[0] if stat else None, "source_mtime_ns": stat[1] if stat else None}
    try:
        loaded = read_image(job.source)
    except ImageReadError as err:
        return meta, err
    meta.update(source_size=list(loaded.size), notes=list(loaded.notes))
    return meta, loaded.pixels


def anonymize_files(inputs: Sequence[str | Path], output: str | Path, anonymizer: Anonymizer,
                    info: Mapping[str, Any] | None = None, output_format: str = "keep", progress: bool = True,
                    warn: Callable[[str], None] | None = None, io_workers: int = DEFAULT_IO_WORKERS) -> dict:
    """Anonymize every photo of ``inputs`` into ``output`` (see the package docstring); returns the
    run summary (also written to ``output/anonymize_summary.json``). ``warn`` gets one line per
    photo that could not be processed (default: stderr). ``io_workers`` threads decode the next
    photos and encode the finished ones while the model runs (0: in this thread); each sidecar is
    still written after its photo, and photos finish in the order the model returns them."""
    info = dict(info or {})
    roots, target = check_paths(inputs, output)
    jobs = plan_jobs(roots, target, output_format)
    settings = run_settings(anonymizer, info, output_format)
    _check_previous(target, settings)
    sidecars: dict[str, dict] = {}
    todo, blocked = [], []  # blocked: (job, why nothing may be written where it goes)
    problems: dict[Path, str | None] = {}
    for job in jobs:
        folder = job.output.parent
        if folder not in problems:
            problems[folder] = folder_problem(folder, target)
        if problems[folder] is not None:  # checked first: its sidecar and output are not ours to read
            blocked.append((job, f"cannot write {job.relative}: {problems[folder]}"))
            continue
        done = is_finished(job, settings, target)
        if done is not None:
            sidecars[job.relative] = done
        else:
            todo.append(job)
    skipped = len(sidecars)
    model = {k: info.get(k) for k in ("config_source", "ema_weights", "template", "compiled", "first_stage_dtype",
                                      "unet_dtype", "tiny_decoder", "tiny_encoder", "harmonizer_attention",
                                      "attention_backends", "frozen_weights_from_checkpoint")}
    target.mkdir(parents=True, exist_ok=True)
    # The settings before the first photo: a rerun after a killed run is checked against them too.
    # The summary is rewritten at the end (finished: true) over every photo of the run.
    write_atomic(target / SUMMARY_NAME, (json.dumps({"finished": False, "settings": settings, "model": model},
                                                    indent=1) + "\n").encode())
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    error_log = target / ERROR_LOG_NAME
    anonymizer.error_log = lambda text: _append(error_log, text)
    statuses: Counter = Counter()

    depth = 2 * max(io_workers, 1)  # photos decoded ahead, and photos whose writes may be in flight

    def decoded(executor) -> Iterator[tuple[tuple[Job, dict], np.ndarray]]:
        for job, future in ahead(partial(executor.submit, _decode), todo, depth):
            meta, pixels = future.result()
            if isinstance(pixels, ImageReadError):
                finish(job, {**meta, "status": pixels.status, "message": str(pixels), "output": None, "faces": []})
                continue
            yield (job, meta), pixels

    faces_seen = sum(len(s.get("faces", [])) for s in sidecars.values())

    def finish(job: Job, sidecar: dict, record: bool = True) -> None:
        """Count ``job``'s photo and, if ``record``, write its sidecar (an earlier output removed first
        if it has none now); a sidecar that cannot be written is the photo's write_error."""
        nonlocal faces_seen
        if record:
            sidecar["settings"] = {k: settings[k] for k in _FIXED_SETTINGS}
            try:
                if sidecar.get("output") is None:  # an earlier run's output of this photo must not stay behind
                    remove_output(job)
                job.sidecar.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(job.sidecar, (json.dumps(sidecar, indent=1) + "\n").encode())
            except OSError as err:  # e.g. a full disk: without its sidecar the photo is not finished
                _append(error_log, f"--- {job.source}: sidecar\n{''.join(traceback.format_exception(err))}\n")
                sidecar.update(status="write_error", message=f"cannot write {job.relative}: {describe(err)}",
                               output=None)
                with contextlib.suppress(OSError):
                    remove_output(job)
        statuses[sidecar["status"]] += 1
        faces_seen += len(sidecar.get("faces", []))
        if sidecar["status"] not in WRITTEN_STATUSES:
            warn(f"id2face anonymize: {job.source}: {sidecar['status']}: {sidecar['message']}")
        sidecars[job.relative] = sidecar
        bar.update(1)
        # The statuses count photos: a bare "faces=9 anonymized=3" read as 3 of 9 faces.
        bar.set_postfix_str(f"faces={faces_seen}, photos " + " ".join(f"{k}={v}" for k, v in sorted(statuses.items())),
                            refresh=False)

    writes: deque[tuple[Job, dict, Future | None]] = deque()  # None: nothing to write

    def settle(keep: int) -> None:
        """Finish photos in the order the model returned them, until at most ``keep`` wait."""
        while writes and (len(writes) > keep or writes[0][2] is None or writes[0][2].done()):
            job, sidecar, future = writes.popleft()
            err = None if future is None else future.exception()  # waits for the write
            if err is not None:  # e.g. a format PIL cannot write
                _append(error_log, f"--- {job.source}: write\n{''.join(traceback.format_exception(err))}\n")
                sidecar.update(status="write_error", message=f"cannot write {job.relative}: {describe(err)}",
                               output=None)
            finish(job, sidecar)

    started = time.perf_counter()
    faces_this_run = 0
    with _progress(len(todo) + len(blocked), progress) as bar, io_executor(io_workers) as executor:
        for job, message in blocked:  # nothing written: neither the photo nor its sidecar
            finish(job, {"source": str(job.source), "output": None, "status": "write_error", "message": message,
                         "faces": []}, record=False)
        for (job, meta), result in anonymizer.process(decoded(executor)):
            sidecar = {**meta, "status": result.status, "message": result.message, "faces": result.faces,
                       "notes": meta.get("notes", []) + result.notes}
            faces_this_run += len(result.faces)
            if result.pixels is not None and result.status in WRITTEN_STATUSES:
                write = executor.submit(write_photo, result.pixels, job.output)
            else:
                sidecar["output"] = None  # finish removes an earlier run's output
                write = None
            writes.append((job, sidecar, write))
            settle(keep=depth)
        settle(keep=0)
    seconds = time.perf_counter() - started

    summary = summarize(jobs, sidecars, skipped, seconds, faces_this_run, anonymizer)
    summary.update(finished=True, settings=settings, model=model)
    write_atomic(target / SUMMARY_NAME, (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def summarize(jobs: Sequence[Job], sidecars: Mapping[str, dict], skipped: int, seconds: float, faces_this_run: int,
              anonymizer: Anonymizer) -> dict:
    """Run summary over every photo of the run (this invocation's and those an earlier one finished)."""
    statuses = Counter(s.get("status") for s in sidecars.values())
    face_status: Counter = Counter()
    reasons: Counter = Counter()
    worst = None
    for rel, sidecar in sidecars.items():
        for face in sidecar.get("faces", []):
            face_status[face.get("status")] += 1
            if face.get("reason"):
                reasons[face["reason"]] += 1
            distance = face.get("residual_distance")  # in the recognizer's own metric: smaller = more alike
            if distance is not None and (worst is None or distance < worst["residual_distance"]):
                worst = {"image": rel, "face": face.get("index"), "residual_distance": distance,
                         "residual_similarity": face.get("residual_similarity"),
                         "residual_same_person": face.get("residual_same_person")}
    failed = [{"source": s.get("source"), "status": s.get("status"), "message": s.get("message")}
              for s in sidecars.values() if s.get("status") not in WRITTEN_STATUSES]
    processed = len(jobs) - skipped
    return {
        "images": {"total": len(jobs), "processed": processed, "skipped": skipped,
                   "written": sum(statuses[s] for s in WRITTEN_STATUSES), "failed": len(failed)},
        "statuses": dict(sorted(statuses.items())),
        "faces": {"total": sum(face_status.values()), "anonymized": face_status["anonymized"],
                  "covered": face_status["covered"], "covered_reasons": dict(sorted(reasons.items()))},
        "clusters": len(anonymizer.clusters.representatives) if anonymizer.clusters is not None else None,
        "worst_residual": worst,
        "audit_recognizer": getattr(anonymizer.audit, "description", None) or
                            (type(anonymizer.audit).__name__ if anonymizer.audit is not None else None),
        "seed": anonymizer.seed,  # the noise's, keyed or not: with it and the key a run repeats
        "seconds": round(seconds, 3),
        "stage_seconds": {stage: round(busy, 3) for stage, busy in anonymizer.stage_seconds.items()},
        "faces_this_run": faces_this_run,
        "faces_per_second": round(faces_this_run / seconds, 4) if seconds > 0 and faces_this_run else 0.0,
        "images_per_second": round(processed / seconds, 4) if seconds > 0 and processed else 0.0,
        "failed": failed,
    }


def exit_code(summary: Mapping[str, Any]) -> int:
    """0: every photo written and every face anonymized; 1: some photos not written (unreadable,
    detection or write error); 3: all written, but some faces covered instead of anonymized."""
    if summary["images"]["failed"]:
        return 1
    return 3 if summary["faces"]["covered"] else 0


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="anonymize", unit="img", dynamic_ncols=True, mininterval=0.5, disable=not enabled, file=sys.stderr)
