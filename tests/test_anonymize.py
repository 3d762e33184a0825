"""`id2face anonymize`: multi-face scenes, exact paste-back, fail-closed, keyed pseudonyms, the
astronaut photo end to end, audit JSON, resume, and one-line errors.

One tiny model is trained once for the module (`id2face.training.fit`, 8 steps: the anonymized
faces are noise, which is all these tests need: they check where pixels change, what is reported
and which identity each face is given, not how good the faces look). SynthFaces scenes use a
ground-truth detector (the known paste positions), so their tests do not depend on MTCNN finding
cartoon faces; MTCNN is exercised on the astronaut photo.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from scipy.ndimage import distance_transform_edt  # noqa: E402

from id2face.anonymize import (SUMMARY_NAME, AnonymizeSettings, Anonymizer, anonymize_files,  # noqa: E402
                               build_audit_recognizer, exit_code, feathered_mask, training_template)
from id2face.inference import load_model, read_checkpoint_config  # noqa: E402
from id2face.cli import main  # noqa: E402
from id2face.data.align import (crop_face, estimate_similarity, inner_face_mask, scale_points,  # noqa: E402
                               template_landmarks)
from id2face.data.synthfaces import render_sample  # noqa: E402
from id2face.errors import UserError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:tiny identity encoder has no weights",
                                        "ignore:.*does not have many workers",
                                        "ignore:Found .* module\\(s\\) in eval mode")
REPO = Path(__file__).resolve().parents[1]
STEPS = 3  # sampler steps: the checks do not depend on sample quality


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: faster than two contended ones for tiny models on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A run folder of `id2face.training.fit` on the tiny profile: config.yaml + checkpoints/last.ckpt."""
    from id2face.config import load_config
    from id2face.training import fit

    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(["tiny"], [f"run.root={root}", "trainer.max_steps=8", "run.checkpoint_every_n_steps=8",
                                 "run.log_images_every_n_steps=0", "data.batch_size=4",
                                 "data.dataset.params.num_identities=12", "data.dataset.params.samples_per_identity=2",
                                 "trainer.val_check_interval=1000"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = fit(cfg, resume=False, limit_val_batches=0, logger=False, enable_model_summary=False)
    path = folder / "checkpoints" / "last.ckpt"
    assert path.is_file() and (folder / "config.yaml").is_file()
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, cfg, info = load_model(checkpoint)
    template, info["template"] = training_template(cfg, int(cfg.data.image_size))
    return model, cfg, info, template


@pytest.fixture(scope="module")
def dlib():
    pytest.importorskip("dlib")
    from id2face.metrics.recognizers import build_recognizer

    return build_recognizer("dlib")


@pytest.fixture(scope="module")
def mtcnn():
    from id2face.data.prepare import FaceDetector

    return FaceDetector()


# ------------------------------------------------------------------------------ scenes
class GroundTruthDetector:
    """Detector for composed scenes: returns the known faces of a photo (looked up by its pixels)."""

    def __init__(self):
        self.faces: dict[bytes, tuple] = {}
        self.calls = 0

    def add(self, pixels: np.ndarray, boxes, landmarks) -> None:
        self.faces[hashlib.sha256(pixels.tobytes()).digest()] = (
            np.asarray(boxes, np.float64), np.full(len(boxes), 0.99), np.asarray(landmarks, np.float64))

    def __call__(self, pixels: np.ndarray):
        self.calls += 1
        return self.faces[hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).digest()]


def compose(detector: GroundTruthDetector, background: np.ndarray, placements, size: int = 112,
            shape=(320, 480)) -> tuple[np.ndarray, list[dict]]:
    """Paste SynthFaces renders (identity, sample, x, y) into a resized skimage photo. Returns the
    photo and per face: identity, tile [x0, y0, x1, y1), landmarks and the renderer's inner-face
    mask in photo coordinates."""
    photo = np.asarray(Image.fromarray(background).convert("RGB").resize(shape[::-1], Image.BILINEAR)).copy()
    truth, boxes, points = [], [], []
    for identity, sample, x, y in placements:
        item = render_sample(identity, sample, size)
        photo[y:y + size, x:x + size] = np.rint((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
        landmarks = item["landmarks"].numpy().astype(np.float64) - 0.5 + [x, y]  # render: pixel [0, 1) -> index
        mask = np.zeros(shape, bool)
        mask[y:y + size, x:x + size] = item["mask"][0].numpy() > 0.5
        eyes = np.linalg.norm(landmarks[1] - landmarks[0])
        centre = landmarks.mean(0)  # a face box like MTCNN's: brows to chin, cheek to cheek
        boxes.append([centre[0] - 1.1 * eyes, centre[1] - 1.5 * eyes, centre[0] + 1.1 * eyes, centre[1] + 1.4 * eyes])
        points.append(landmarks)
        truth.append({"identity": identity, "tile": [x, y, x + size, y + size], "landmarks": landmarks, "mask": mask})
    detector.add(photo, boxes, points)
    return photo, truth


def outside(regions, shape) -> np.ndarray:
    keep = np.ones(shape[:2], bool)
    for x0, y0, x1, y1 in regions:
        keep[y0:y1, x0:x1] = False
    return keep


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def anonymizer(loaded, **kwargs) -> Anonymizer:
    model, cfg, _, template = loaded
    options = {k: kwargs.pop(k) for k in ("detector", "audit", "cluster_by", "pipeline_depth", "detect_workers")
               if k in kwargs}
    settings = AnonymizeSettings(**{"steps": STEPS, "seed": 0, "batch_size": 4, **kwargs})
    return Anonymizer(model, int(cfg.data.image_size), template, settings, **options)


def audit_crop(photo: np.ndarray, landmarks: np.ndarray, template: np.ndarray, size: int = 160) -> torch.Tensor:
    matrix = estimate_similarity(landmarks, scale_points(template, 32, size))
    return torch.from_numpy(crop_face(photo, matrix, size).copy()).permute(2, 0, 1).float() / 127.5 - 1


# ------------------------------------------------------------------------------ tests
def test_scenes_every_face_replaced_nothing_else_touched_and_audited(tmp_path, loaded, dlib, monkeypatch):
    detector = GroundTruthDetector()
    scene_a, truth_a = compose(detector, skimage_data.coffee(), [(0, 0, 30, 40), (1, 0, 200, 60), (2, 0, 340, 150)])
    scene_b, truth_b = compose(detector, skimage_data.chelsea(), [(3, 0, 40, 30), (4, 0, 300, 100)], size=100)
    source = tmp_path / "in"
    (source / "sub").mkdir(parents=True)
    Image.fromarray(scene_a).save(source / "coffee.png")
    Image.fromarray(scene_b).save(source / "sub" / "chelsea.png")
    before = {p: (sha(p), p.stat().st_mtime_ns) for p in source.rglob("*.png")}

    engine = anonymizer(loaded, detector=detector, audit=dlib, batch_size=4)
    batches, model_anonymize = [], engine.model.anonymize

    def counted(images, masks, **kwargs):
        batches.append(len(images))
        return model_anonymize(images, masks, **kwargs)

    monkeypatch.setattr(engine.model, "anonymize", counted)
    summary = anonymize_files([source], tmp_path / "out", engine, info=loaded[2], progress=False)
    out = tmp_path / "out"

    assert batches == [4, 1]  # 5 faces from two photos: one full batch spans both photos
    assert before == {p: (sha(p), p.stat().st_mtime_ns) for p in source.rglob("*.png")}  # inputs untouched
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        SUMMARY_NAME, "coffee.png", "coffee.png.json", "sub/chelsea.png", "sub/chelsea.png.json"]  # no temp files
    assert summary["images"] == {"total": 2, "processed": 2, "skipped": 0, "written": 2, "failed": 0}
    assert summary["faces"] == {"total": 5, "anonymized": 5, "covered": 0, "covered_reasons": {}}
    assert exit_code(summary) == 0 and summary["faces_per_second"] > 0 and summary["seconds"] > 0
    busy = summary["stage_seconds"]  # stages in turn (pipeline depth 0): their sum is the call's time at most
    assert set(busy) == {"detect", "encode", "sample", "finish"} and all(seconds > 0 for seconds in busy.values())
    assert sum(busy.values()) <= summary["seconds"] + 0.01
    assert summary["audit_recognizer"].startswith("dlib")
    assert summary["model"]["ema_weights"] is True and "SynthFaces" in summary["model"]["template"]

    template = loaded[3]
    for name, photo, truth in (("coffee.png", scene_a, truth_a), ("sub/chelsea.png", scene_b, truth_b)):
        result = np.asarray(Image.open(out / name))
        sidecar = json.loads((out / f"{name}.json").read_text())
        assert sidecar["status"] == "anonymized" and sidecar["source_size"] == [480, 320]
        assert len(sidecar["faces"]) == len(truth)
        # identity control: the audit judge (dlib) on the source vs a JPEG copy of the source photo
        jpeg = tmp_path / "control.jpg"
        Image.fromarray(photo).save(jpeg, quality=80)
        copy = np.asarray(Image.open(jpeg))
        crops = [audit_crop(image, known["landmarks"], template) for known in truth for image in (photo, copy)]
        embeddings = dlib(torch.stack(crops))
        control = dlib.distance(embeddings[0::2], embeddings[1::2])
        for face, known, same in zip(sidecar["faces"], truth, control.tolist()):
            assert set(face) >= {"box", "score", "landmarks", "status", "reason", "region", "residual_similarity",
                                 "residual_distance", "residual_same_person"}
            assert face["status"] == "anonymized" and face["reason"] is None and face["score"] == 0.99
            # the region reported holds every changed pixel of this face, and those lie on the face:
            # within an inter-ocular distance of the renderer's identity region (the model's mask is
            # the template's united with the face's own, grown, then feathered outwards)
            x0, y0, x1, y1 = face["region"]
            ys, xs = np.nonzero(np.any(result[y0:y1, x0:x1] != photo[y0:y1, x0:x1], axis=-1))
            eyes = np.linalg.norm(known["landmarks"][1] - known["landmarks"][0])
            assert distance_transform_edt(~known["mask"])[y0 + ys, x0 + xs].max() < 1.0 * eyes  # 0.59-0.84 measured
            # the renderer's own identity region (eyes, brows, nose, mouth) is replaced, all of it
            difference = np.abs(result.astype(int) - photo.astype(int))[known["mask"]]
            assert difference.mean() > 20 and np.any(difference > 0, axis=-1).mean() > 0.99
            # identity: the judge (dlib) puts the anonymized face about as far from its source as
            # another person (distinct SynthFaces people: 0.28-0.8, mean 0.52) and 3x further than a
            # JPEG copy of the source (measured: 0.54-0.70 vs 0.11-0.16)
            assert face["residual_distance"] > max(0.45, 3 * same), (face["residual_distance"], same)
        # everything outside the faces' regions is bit-identical
        keep = outside([f["region"] for f in sidecar["faces"]], photo.shape)
        assert keep.mean() > 0.7 and np.array_equal(result[keep], photo[keep])

    outputs = {p: sha(p) for p in out.rglob("*.png")}
    again = anonymize_files([source], out, engine, info=loaded[2], progress=False)  # resume: nothing to do
    assert again["images"]["skipped"] == 2 and again["images"]["processed"] == 0
    assert again["faces"]["anonymized"] == 5 and outputs == {p: sha(p) for p in out.rglob("*.png")}


def test_io_threads_write_what_one_thread_writes_and_report_a_failed_write(tmp_path, loaded, monkeypatch):
    """Photos decoded and written by threads beside the model: the same files and sidecars as in
    one thread, warnings in input order, and a write that fails (here: the disk) is the photo's
    status, not a crash, with its traceback in the error log."""
    import threading
    import time as clock

    import id2face.anonymize.files as anonymize_module

    detector = GroundTruthDetector()
    source = tmp_path / "in"
    source.mkdir()
    for index, background in enumerate((skimage_data.coffee(), skimage_data.chelsea(), skimage_data.astronaut())):
        scene, _ = compose(detector, background, [(index, 0, 30 + 20 * index, 40), (index + 5, 1, 300, 120)])
        Image.fromarray(scene).save(source / f"p{index}.png")
    (source / "p1b.png").write_text("not a picture")
    write_photo = anonymize_module.write_photo

    writers = []

    def slow_then_failing_write(pixels, path):
        writers.append(threading.current_thread().name)
        if path.name == "p2.png":
            raise OSError(28, "No space left on device")
        clock.sleep(0.3 if path.name == "p0.png" else 0.0)  # the first write finishes last
        write_photo(pixels, path)

    monkeypatch.setattr(anonymize_module, "write_photo", slow_then_failing_write)
    runs = {}
    for workers in (0, 3):
        warned, writers[:] = [], []
        summary = anonymize_files([source], tmp_path / f"out{workers}", anonymizer(loaded, detector=detector),
                                  progress=False, warn=warned.append, io_workers=workers)
        out = tmp_path / f"out{workers}"
        files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                 if p.is_file() and p.name not in (SUMMARY_NAME, "anonymize_errors.log")}
        runs[workers] = (summary, warned, files, (out / "anonymize_errors.log").read_text())
        assert len(writers) == 3 and all(name.startswith("id2face-io") == (workers > 0) for name in writers)
    (one, warned_one, files_one, log_one), (threaded, warned, files, log) = runs[0], runs[3]
    assert files == files_one and set(files) == {"p0.png", "p0.png.json", "p1.png", "p1.png.json", "p1b.png.json",
                                                 "p2.png.json"}
    assert len(warned) == 2 and "p1b.png: not_an_image" in warned[0] and "p2.png: write_error" in warned[1]
    assert warned == warned_one
    sidecar = json.loads(files["p2.png.json"])
    assert sidecar["output"] is None and "No space left on device" in sidecar["message"]
    assert "p2.png: write" in log and "OSError" in log and "OSError" in log_one
    assert threaded["statuses"] == one["statuses"] == {"anonymized": 2, "not_an_image": 1, "write_error": 1}


def one_face_photos(detector: GroundTruthDetector, folder: Path, names) -> None:
    """A small photo of one SynthFaces face for each of ``names`` (paths relative to ``folder``)."""
    for index, name in enumerate(names):
        photo, _ = compose(detector, skimage_data.coffee(), [(index, 0, 20 + 10 * index, 20)], size=64,
                           shape=(120, 160))
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).save(folder / name)


def test_a_rerun_with_other_detection_or_cover_settings_is_refused(tmp_path, loaded, checkpoint, capsys):
    """--min-face-size and --detect-max-side decide which faces are found, --cover-if-recognized
    which are covered: a rerun into the same folder must repeat them, as the other fixed settings."""
    detector = GroundTruthDetector()
    detector.min_face_size, detector.max_side = 600, 2048  # the attributes of the command's FaceDetector
    one_face_photos(detector, tmp_path / "in", ["a.png"])
    out = tmp_path / "out"
    assert anonymize_files([tmp_path / "in"], out, anonymizer(loaded, detector=detector), progress=False)[
        "images"]["written"] == 1
    for min_face_size, max_side, cover_if_recognized, message in (
            (20, 2048, False, "min_face_size=600 (now 20)"), (600, 64, False, "detect_max_side=2048 (now 64)"),
            (600, 2048, True, "cover_if_recognized=False (now True)")):
        other = GroundTruthDetector()
        other.faces, other.min_face_size, other.max_side = detector.faces, min_face_size, max_side
        with pytest.raises(UserError, match=re.escape(f"holds a run with other settings: {message};")):
            judge = SimpleNamespace(threshold=0.6, description="a judge that decides")  # the flag needs one
            anonymize_files([tmp_path / "in"], out, progress=False, anonymizer=anonymizer(
                loaded, detector=other, cover_if_recognized=cover_if_recognized, audit=judge))
    again = anonymize_files([tmp_path / "in"], out, anonymizer(loaded, detector=detector), progress=False)
    assert again["images"]["skipped"] == 1 and again["settings"]["min_face_size"] == 600

    # the command's flags are the detector's: a face MTCNN cannot find at 300 px is found at 20 px
    Image.fromarray(skimage_data.astronaut()).save(tmp_path / "astronaut.png")
    command = ["anonymize", "--checkpoint", str(checkpoint), "-i", str(tmp_path / "astronaut.png"), "-o",
               str(tmp_path / "cli"), "--device", "cpu", "--audit-recognizer", "none", "--quiet", "--steps", "2"]
    assert main([*command, "--min-face-size", "300"]) == 0
    assert json.loads((tmp_path / "cli" / "astronaut.png.json").read_text())["status"] == "no_face"
    capsys.readouterr()
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a run with other settings: min_face_size=300 (now 20)" in err


def test_a_rerun_after_a_killed_run_with_other_settings_is_refused(tmp_path, loaded):
    """A run killed mid-way has written sidecars but not its final summary: its settings are on disk
    from the start, so a rerun with others is refused as after a finished run, not mixed in."""
    detector = GroundTruthDetector()
    one_face_photos(detector, tmp_path / "in", ["p0.png", "p1.png", "p2.png"])
    out = tmp_path / "out"

    def killed_at_the_third(pixels):
        if detector.calls == 2:
            raise KeyboardInterrupt  # nothing after it runs, as after SIGKILL
        return detector(pixels)

    with pytest.raises(KeyboardInterrupt):
        anonymize_files([tmp_path / "in"], out, anonymizer(loaded, detector=killed_at_the_third, batch_size=1),
                        progress=False, io_workers=0)
    finished = sorted(p.name for p in out.glob("*.png.json"))
    assert finished and "p2.png.json" not in finished
    with pytest.raises(UserError, match=r"holds a run with other settings: keyed=False \(now True\)"):
        anonymize_files([tmp_path / "in"], out, anonymizer(loaded, detector=detector, key="secret"), progress=False)
    (out / SUMMARY_NAME).unlink()  # each sidecar records them too
    with pytest.raises(UserError, match=r"holds a run with other settings: steps=3 \(now 2\)"):
        anonymize_files([tmp_path / "in"], out, anonymizer(loaded, detector=detector, steps=2), progress=False)
    resumed = anonymize_files([tmp_path / "in"], out, anonymizer(loaded, detector=detector), progress=False)
    assert resumed["finished"] and resumed["images"]["skipped"] == len(finished)
    assert resumed["images"]["written"] == 3 and resumed["settings"]["keyed"] is False
    # a keyed run records its noise seed too: with it and the key, the run repeats
    keyed = anonymize_files([tmp_path / "in"], tmp_path / "keyed", progress=False,
                            anonymizer=anonymizer(loaded, detector=detector, key="secret", seed=7))
    assert keyed["seed"] == 7 and keyed["settings"]["keyed"] is True


def test_a_link_out_of_the_output_folder_is_never_written_through(tmp_path, loaded):
    """A folder link inside the output that leads into the input (or anywhere outside): the photo
    that would be written there fails, and nothing is written, its original least of all."""
    detector = GroundTruthDetector()
    source, out, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    one_face_photos(detector, source, ["sub/a.png", "deep/b.png", "c.png"])
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(source / "sub")
    (out / "deep").symlink_to(elsewhere)
    before = {p: (sha(p), p.stat().st_mtime_ns) for p in source.rglob("*") if p.is_file()}
    warned = []
    summary = anonymize_files([source], out, anonymizer(loaded, detector=detector), progress=False,
                              warn=warned.append)
    assert before == {p: (sha(p), p.stat().st_mtime_ns) for p in source.rglob("*") if p.is_file()}
    assert list(elsewhere.iterdir()) == [] and exit_code(summary) == 1
    assert summary["statuses"] == {"anonymized": 1, "write_error": 2} and (out / "c.png.json").is_file()
    assert len(warned) == 2 and all("leads outside the output folder" in line for line in warned)
    assert "sub/a.png: folder sub leads outside the output folder" in warned[1]


def test_a_photo_that_writes_nothing_now_leaves_no_earlier_output(tmp_path, loaded, monkeypatch):
    """A rerun whose status for a photo writes no output (unreadable now, a failed write) removes the
    earlier run's output; a link there is removed, not what it leads to."""
    import id2face.anonymize.files as anonymize_module

    detector = GroundTruthDetector()
    source, out = tmp_path / "in", tmp_path / "out"
    one_face_photos(detector, source, ["a.png", "b.png"])
    engine = anonymizer(loaded, detector=detector)
    assert anonymize_files([source], out, engine, progress=False)["images"]["written"] == 2
    kept = tmp_path / "kept.png"
    kept.write_bytes(b"not ours")
    (out / "b.png").unlink()
    (out / "b.png").symlink_to(kept)
    (source / "a.png").write_text("not a picture")  # unreadable now
    os.utime(source / "b.png", ns=(1, 1))  # changed: processed again, and its write fails
    write_photo = anonymize_module.write_photo

    def failing_b(pixels, path):
        if path.name == "b.png":
            raise OSError(28, "No space left on device")
        write_photo(pixels, path)

    monkeypatch.setattr(anonymize_module, "write_photo", failing_b)
    summary = anonymize_files([source], out, engine, progress=False, warn=lambda line: None)
    assert summary["images"]["written"] == 0 and summary["statuses"] == {"not_an_image": 1, "write_error": 1}
    assert not os.path.lexists(out / "a.png") and not os.path.lexists(out / "b.png")
    assert kept.read_bytes() == b"not ours"
    for name in ("a.png", "b.png"):
        assert json.loads((out / f"{name}.json").read_text())["output"] is None


def test_a_file_where_an_output_folder_or_sidecar_goes_fails_that_photo_only(tmp_path, loaded):
    detector = GroundTruthDetector()
    source, out = tmp_path / "in", tmp_path / "out"
    one_face_photos(detector, source, ["sub/a.png", "sub/deeper/b.png", "c.png", "d.png"])
    out.mkdir()
    (out / "sub").write_text("a file of someone's")
    (out / "c.png.json").mkdir()  # no sidecar can replace a folder
    warned = []
    summary = anonymize_files([source], out, anonymizer(loaded, detector=detector), progress=False,
                              warn=warned.append)
    assert summary["statuses"] == {"anonymized": 1, "write_error": 3} and exit_code(summary) == 1
    assert (out / "sub").read_text() == "a file of someone's"
    messages = [line.split(": write_error: ")[1] for line in warned]
    assert messages[:2] == ["cannot write sub/a.png: sub in the output folder is a file, not a folder",
                            "cannot write sub/deeper/b.png: sub in the output folder is a file, not a folder"]
    assert len(messages) == 3 and messages[2].startswith("cannot write c.png: IsADirectoryError")
    assert not (out / "c.png").exists() and (out / "d.png").is_file() and (out / "d.png.json").is_file()
    assert "c.png: sidecar" in (out / "anonymize_errors.log").read_text()


@pytest.mark.parametrize("key", [None, "secret"])
def test_pipeline_stages_in_worker_threads_give_what_in_turn_gives(loaded, key):
    """Detection (stage 1) ahead, in one or three threads, and paste-back + audit (stage 3) behind,
    in worker threads, while the caller's thread samples: the same pixels, faces, clusters,
    substitutes and audit figures, photos in order, and a detector failure is still that photo's
    error."""
    import threading


    truth = GroundTruthDetector()
    photos = [compose(truth, background, [(index % 3, 0, 30, 40), (index % 3 + 5, 1, 300, 120)])[0]
              for index, background in enumerate((skimage_data.coffee(), skimage_data.chelsea(),
                                                  skimage_data.astronaut(), skimage_data.rocket()))]
    broken = np.zeros_like(photos[0])  # the detector has no entry for it: KeyError, a detection failure
    threads = {"detect": [], "audit": []}

    def detector(pixels):
        threads["detect"].append(threading.current_thread().name)
        return truth(pixels)

    audit = build_audit_recognizer("encoder", loaded[1])
    audit.register_forward_pre_hook(lambda module, args: threads["audit"].append(threading.current_thread().name))
    runs = {}
    for depth, workers in ((0, 1), (3, 1), (4, 3)):
        threads["detect"].clear(), threads["audit"].clear()
        engine = anonymizer(loaded, detector=detector, audit=audit, key=key, batch_size=3, pipeline_depth=depth,
                            detect_workers=workers)
        runs[depth, workers] = list(engine.process(enumerate([*photos[:2], broken, *photos[2:]])))
        assert {name.startswith("id2face-detect") for name in threads["detect"]} == {depth > 0}
        assert len(set(threads["detect"])) <= workers
        assert {name.startswith("id2face-finish") for name in threads["audit"]} == {depth > 0}
    in_turn = runs[0, 1]
    for threaded in (runs[3, 1], runs[4, 3]):
        assert [tag for tag, _ in threaded] == [0, 1, 2, 3, 4]
        assert threaded[2][1].status == in_turn[2][1].status == "error"
        assert "face detection failed" in threaded[2][1].message
        for (_, a), (_, b) in zip(in_turn, threaded):
            assert a.status == b.status and a.faces == b.faces  # records: clusters, regions, audit residuals
            if a.pixels is not None:
                assert np.array_equal(a.pixels, b.pixels)
    faces = [face for _, result in runs[4, 3] for face in result.faces]
    assert [face["status"] for face in faces] == ["anonymized"] * 8
    assert all(face["residual_similarity"] is not None and (face["cluster"] is None) == (key is None) for face in faces)


@pytest.mark.parametrize("failure", ["raise", "nan", "unchanged", "blur", "shape"])
def test_fail_closed_covers_every_face_the_model_cannot_anonymize(loaded, failure, monkeypatch):
    detector = GroundTruthDetector()
    photo, truth = compose(detector, skimage_data.coffee(), [(0, 0, 30, 40), (1, 0, 200, 60), (2, 0, 340, 150)])
    engine = anonymizer(loaded, detector=detector, cover="blur" if failure == "blur" else "fill")

    def broken(images, masks, **kwargs):
        if failure in ("raise", "blur"):
            raise RuntimeError("sampler exploded")
        if failure == "shape":  # a face short, whatever the batch
            return images[1:].clone()
        return images.clone() if failure == "unchanged" else torch.full_like(images, float("nan"))

    monkeypatch.setattr(engine.model, "anonymize", broken)
    (result,) = engine.anonymize_photos([photo])
    reason = {"raise": "sampling_error", "blur": "sampling_error", "nan": "non_finite",
              "unchanged": "unchanged", "shape": "sampling_error"}[failure]
    assert result.status == "covered" and result.pixels is not None
    assert [f["status"] for f in result.faces] == ["covered"] * 3 and {f["reason"] for f in result.faces} == {reason}
    for known in truth:
        original, covered = photo[known["mask"]].astype(float), result.pixels[known["mask"]].astype(float)
        if failure == "blur":
            # no facial detail left: local contrast (neighbour differences) inside the face collapses
            def detail(image):
                return np.abs(np.diff(image.astype(float), axis=1)).sum(-1)[known["mask"][:, 1:]].mean()
            assert detail(result.pixels) < 0.2 * detail(photo)
        else:  # a solid fill where the face had all its structure
            assert covered.std(0).max() < 1.0 and original.std(0).max() > 20
            assert np.abs(covered - original).mean() > 10
    keep = outside([f["region"] for f in result.faces], photo.shape)
    assert np.array_equal(result.pixels[keep], photo[keep])


def test_a_face_whose_inner_face_reaches_past_its_crop_is_covered(loaded):
    """Aligned to a tight template (the largest scale allowed), a face with a long eye-to-mouth
    distance (an open mouth, a long face) has its lower lip past the crop: the model would leave it
    original, so the face is covered."""
    from id2face.data.align import MAX_FACE_SCALE

    model, cfg, _, _ = loaded
    size = int(cfg.data.image_size)
    detector = GroundTruthDetector()
    photo, truth = compose(detector, skimage_data.coffee(), [(0, 0, 30, 40), (1, 0, 200, 60)])
    boxes, scores, points = detector(photo)
    long_face = points[1].copy()
    long_face[3:] += (long_face[3:].mean(0) - long_face[:2].mean(0)) * 1.2  # mouth 2.2x as far below the eyes
    detector.add(photo, boxes, [points[0], long_face])
    engine = Anonymizer(model, size, template_landmarks(size, MAX_FACE_SCALE), AnonymizeSettings(steps=STEPS, seed=0),
                        detector=detector)
    (result,) = engine.anonymize_photos([photo])
    assert [(f["status"], f["reason"]) for f in result.faces] == [
        ("anonymized", None), ("covered", "identity_region_outside_crop")]
    covered = result.pixels[truth[1]["mask"]].astype(float)
    assert covered.std(0).max() < 1.0  # filled


def test_a_template_that_puts_the_inner_face_past_the_crop_is_refused(loaded, tmp_path, capsys):
    from id2face.data.align import MAX_FACE_SCALE

    model, cfg, _, _ = loaded
    size = int(cfg.data.image_size)
    Anonymizer(model, size, template_landmarks(size, MAX_FACE_SCALE), AnonymizeSettings(steps=STEPS, seed=0))
    with pytest.raises(UserError, match=r"inner face \(brows to lower lip\) past the .* crop.*at most 1\.14"):
        Anonymizer(model, size, template_landmarks(size, 1.2), AnonymizeSettings(steps=STEPS, seed=0))
    with pytest.raises(UserError, match=r"--face-scale must be between 0\.1 and 1\.14"):
        AnonymizeSettings(face_scale=1.3).check()
    photos = tmp_path / "in"
    photos.mkdir()
    Image.fromarray(skimage_data.astronaut()).save(photos / "a.png")
    assert main(["prepare", "-i", str(photos), "-o", str(tmp_path / "out"), "--face-scale", "1.3"]) == 2
    assert "--face-scale must be between 0.1 and 1.14" in capsys.readouterr().err


def test_faces_too_small_or_degenerate_are_covered_and_failed_detection_writes_nothing(tmp_path, loaded):
    detector = GroundTruthDetector()
    photo, truth = compose(detector, skimage_data.coffee(), [(1, 0, 200, 60)])
    boxes, scores, points = detector(photo)
    tiny = np.array([[40, 40], [44, 40], [42, 42], [40, 44], [44, 44]], np.float64)  # a 6 px "face"
    same_point = np.full((5, 2), 100.0)  # landmarks that define no alignment
    detector.add(photo, [*boxes, [39, 38, 45, 46], [90, 90, 110, 110]], [*points, tiny, same_point])
    engine = anonymizer(loaded, detector=detector)
    (result,) = engine.anonymize_photos([photo])
    assert [(f["status"], f["reason"]) for f in result.faces] == [
        ("anonymized", None), ("covered", "too_small"), ("covered", "alignment_failed")]
    for face in result.faces[1:]:
        x0, y0, x1, y1 = (int(round(v)) for v in face["box"])
        assert result.pixels[y0 + 1:y1 - 1, x0 + 1:x1 - 1].reshape(-1, 3).std(0).max() < 1.0  # filled
    assert result.status == "covered"

    def broken_detector(pixels):
        raise RuntimeError("detector crashed")

    source = tmp_path / "in"
    source.mkdir()
    Image.fromarray(photo).save(source / "photo.png")
    engine = anonymizer(loaded, detector=broken_detector)
    summary = anonymize_files([source], tmp_path / "out", engine, progress=False, warn=lambda line: None)
    assert not (tmp_path / "out" / "photo.png").exists() and exit_code(summary) == 1
    sidecar = json.loads((tmp_path / "out" / "photo.png.json").read_text())
    assert sidecar["status"] == "error" and "detector crashed" in sidecar["message"] and sidecar["output"] is None
    assert "RuntimeError: detector crashed" in (tmp_path / "out" / "anonymize_errors.log").read_text()


@pytest.mark.parametrize("pad", [False, True], ids=["ragged", "padded"])
def test_last_batch_padded_on_request_and_out_of_memory_splits_the_batch_instead_of_failing(loaded, monkeypatch,
                                                                                            pad):
    detector = GroundTruthDetector()
    boxes = [(0, 0, 30, 40), (1, 0, 200, 60), (2, 0, 340, 150)]
    photos = [compose(detector, skimage_data.coffee(), boxes)[0] for _ in range(2)]  # 6 faces
    engine = anonymizer(loaded, detector=detector, batch_size=4, pad_last_batch=pad)
    sizes, real = [], engine.model.anonymize

    def recorded(images, masks, **kwargs):
        sizes.append(len(images))
        return real(images, masks, **kwargs)

    monkeypatch.setattr(engine.model, "anonymize", recorded)
    results = engine.anonymize_photos(photos)
    assert sizes == ([4, 4] if pad else [4, 2])
    assert [f["status"] for r in results for f in r.faces] == ["anonymized"] * 6

    sizes.clear()

    def small_only(images, masks, **kwargs):
        sizes.append(len(images))
        if len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(images, masks, **kwargs)

    monkeypatch.setattr(engine.model, "anonymize", small_only)
    (result,) = engine.anonymize_photos(photos[:1])
    assert sizes == ([4, 1, 2, 1, 1] if pad else [3, 1, 2, 1, 1])  # the halves are not padded back
    assert [f["status"] for f in result.faces] == ["anonymized"] * 3


def test_cudnn_searches_the_convolutions_at_each_batch_sizes_first_call_only(loaded, monkeypatch):
    """cuDNN keeps the plans it searched in its cache, read whatever the flag: the search runs in the
    first call at each batch size, and the process-wide flag is back as it was around every other."""
    detector = GroundTruthDetector()
    boxes = [(0, 0, 30, 40), (1, 0, 200, 60), (2, 0, 340, 150)]
    photos = [compose(detector, skimage_data.coffee(), boxes)[0] for _ in range(2)]  # 6 faces: batches 4, 2
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    searched, real = [], loaded[0].anonymize

    def recorded(images, masks, **kwargs):
        searched.append((len(images), torch.backends.cudnn.benchmark))
        return real(images, masks, **kwargs)

    monkeypatch.setattr(loaded[0], "anonymize", recorded)
    engine = anonymizer(loaded, detector=detector, batch_size=4, cudnn_benchmark=True)
    engine.anonymize_photos(photos)
    engine.anonymize_photos(photos)
    assert searched == [(4, True), (2, True), (4, False), (2, False)] and torch.backends.cudnn.benchmark is False
    anonymizer(loaded, detector=detector, batch_size=4).anonymize_photos(photos[:1])  # off by default
    assert searched[-1] == (3, False)


def test_sampling_runs_in_the_chosen_precision_and_pseudonyms_do_not_depend_on_it(loaded):
    detector = GroundTruthDetector()
    photo, _ = compose(detector, skimage_data.coffee(), [(0, 0, 30, 40), (1, 0, 300, 120)])
    model, seen, runs = loaded[0], [], {}
    handle = model.backbone.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        for precision in ("32-true", "bf16-mixed"):
            seen.clear()
            engine = anonymizer(loaded, detector=detector, key="alpha", precision=precision)
            (result,) = engine.anonymize_photos([photo])
            runs[precision] = (set(seen), engine.clusters.substitutes, result)
    finally:
        handle.remove()
    assert runs["32-true"][0] == {torch.float32} and runs["bf16-mixed"][0] == {torch.bfloat16}
    for _, substitutes, result in runs.values():
        assert [f["status"] for f in result.faces] == ["anonymized", "anonymized"]
        assert result.pixels.dtype == np.uint8
    # substitutes come from the fp32 identity path: the same person, the same pseudonym
    assert all(torch.equal(a, b) for a, b in zip(runs["32-true"][1], runs["bf16-mixed"][1], strict=True))
    fp32, bf16 = (runs[p][2].pixels.astype(np.int16) for p in ("32-true", "bf16-mixed"))
    assert 0 < np.abs(fp32 - bf16).max()
    with pytest.raises(UserError, match="--precision"):
        anonymizer(loaded, precision="fp8")


def test_compile_switches_the_loaded_model_without_touching_its_weights(checkpoint, loaded):
    model, _, info = load_model(checkpoint, compile=True)
    unet = model.backbone.unet
    assert info["compiled"] and unet._compiled_call_impl is not None  # nn.Module.compile, in place
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    eager = loaded[0].state_dict()
    assert all(torch.equal(v, eager[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def sd_vae_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny-profile checkpoint whose first stage is a toy-width SD VAE (downscale 2)."""
    from omegaconf import OmegaConf

    from id2face.config import load_config
    from id2face.lit_module import ID2FaceModule

    toy_vae = ["model.first_stage.name=sd_vae", "model.first_stage.params.random_init=true",
               "model.first_stage.params.config={block_out_channels: [8, 16], layers_per_block: 1, "
               "down_block_types: [DownEncoderBlock2D, DownEncoderBlock2D], norm_num_groups: 4, "
               "up_block_types: [UpDecoderBlock2D, UpDecoderBlock2D]}"]
    torch.manual_seed(0)
    cfg = load_config(["tiny"], toy_vae)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = ID2FaceModule(cfg)
    path = tmp_path_factory.mktemp("sd_vae") / "sd_vae.ckpt"
    torch.save({"state_dict": module.state_dict(),
                "hyper_parameters": {"config": OmegaConf.to_container(cfg, resolve=True)}}, path)
    return path


def anonymize_two_faces(*models) -> list[torch.Tensor]:
    from torch.utils.data import default_collate

    batch = default_collate([render_sample(i, 0, 32) for i in range(2)])
    return [m.anonymize(batch["image"], batch["mask"], generator=torch.Generator().manual_seed(0),
                        num_inference_steps=3) for m in models]


def test_vae_dtype_runs_an_sd_vae_in_it_and_a_pixel_first_stage_refuses_it(tmp_path, checkpoint, sd_vae_checkpoint,
                                                                            capsys):
    path = sd_vae_checkpoint
    reference, _, _ = load_model(path)
    model, _, info = load_model(path, first_stage_dtype="bfloat16")
    assert info["first_stage_dtype"] == "bfloat16"
    assert {p.dtype for p in model.first_stage.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.backbone.parameters()} == {torch.float32}
    faces = anonymize_two_faces(reference, model)
    assert faces[1].dtype == torch.float32
    assert 0 < (faces[0] - faces[1]).abs().max() < 0.1  # bf16 rounding in the VAE, nothing else

    photo = tmp_path / "face.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    assert main(["anonymize", "--checkpoint", str(checkpoint), "-i", str(photo), "-o", str(tmp_path / "out"),
                 "--vae-dtype", "bfloat16", "--device", "cpu", "--audit-recognizer", "none", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "first stage (pixel) has no dtype" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_checkpoint_from_another_machine_brings_its_frozen_weights(tmp_path, checkpoint, loaded):
    """Its config names an identity-encoder weights file that is not here; the checkpoint's state
    carries the encoder's weights, so it loads (and says so, with no "untrained init" warning), and
    the `encoder` audit judges with those weights; without them the error stays."""
    from id2face.errors import MissingWeightsError, UntrainedWeightsWarning

    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    payload["hyper_parameters"]["config"]["model"]["identity_encoder"]["params"]["weights"] = "/elsewhere/encoder.pt"
    trained = {k: v + 0.01 if v.is_floating_point() else v for k, v in payload["state_dict"].items()
               if ".identity_encoder." in k}  # weights the encoder's untrained init does not have
    payload["state_dict"].update(trained)
    moved = tmp_path / "moved.ckpt"
    torch.save(payload, moved)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedWeightsWarning)
        model, cfg, info = load_model(moved)
    assert info["frozen_weights_from_checkpoint"] and not loaded[2]["frozen_weights_from_checkpoint"]
    expected = {k.split(".identity_encoder.", 1)[1]: v for k, v in trained.items() if k.startswith("model.")}
    assert expected and all(torch.equal(v, expected[k]) for k, v in model.identity_encoder.state_dict().items())
    judge = build_audit_recognizer("encoder", cfg, model)
    assert all(torch.equal(v, expected[k]) for k, v in judge.encoder.state_dict().items())
    with pytest.warns(UntrainedWeightsWarning):  # from the config alone: the untrained init, and it says so
        untrained = build_audit_recognizer("encoder", cfg)
    assert not torch.equal(untrained.encoder.head.weight, judge.encoder.head.weight)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if ".identity_encoder." not in k}
    torch.save(payload, moved)
    with pytest.raises(MissingWeightsError, match="/elsewhere/encoder.pt"):
        load_model(moved)


def test_harmonizer_attention_path_is_chosen_at_load_and_changes_no_face(checkpoint, loaded):
    from id2face.components.harmonizer import DecoupledCrossAttnProcessor

    model, _, info = load_model(checkpoint, harmonizer_attention="sdpa")
    processors = [p for p in model.backbone.unet.attn_processors.values() if isinstance(p, DecoupledCrossAttnProcessor)]
    assert info["harmonizer_attention"] == "sdpa" and loaded[2]["harmonizer_attention"] == "weights"
    assert processors and {p.attention for p in processors} == {"sdpa"}
    faces = anonymize_two_faces(loaded[0], model)
    torch.testing.assert_close(faces[1], faces[0], rtol=1e-4, atol=1e-4)


def test_attention_backends_are_chosen_at_load_and_change_no_face(checkpoint, loaded, tmp_path):
    from torch.nn.attention import SDPBackend

    model, _, info = load_model(checkpoint, attention_backends=["math", "flash_attention"])
    assert info["attention_backends"] == ["math", "flash_attention"] and loaded[2]["attention_backends"] is None
    assert model.backbone.sdpa_backends == [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    faces = anonymize_two_faces(loaded[0], model)
    torch.testing.assert_close(faces[1], faces[0], rtol=1e-4, atol=1e-4)

    Image.fromarray(skimage_data.astronaut()).save(tmp_path / "face.png")
    assert main(["anonymize", "--checkpoint", str(checkpoint), "-i", str(tmp_path / "face.png"), "-o",
                 str(tmp_path / "out"), "--device", "cpu", "--audit-recognizer", "none", "--steps", "2", "--quiet",
                 "--attention-backends", "flash_attention", "math"]) == 0
    summary = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert summary["model"]["attention_backends"] == ["flash_attention", "math"] and summary["faces"]["anonymized"] == 1


def test_unet_dtype_loads_the_checkpoint_into_a_bf16_unet(checkpoint, loaded):
    model, _, info = load_model(checkpoint, unet_dtype="bfloat16")
    assert info["unet_dtype"] == "bfloat16"
    assert {p.dtype for p in model.backbone.parameters()} == {p.dtype for p in model.harmonizer.parameters()} \
        == {torch.bfloat16}
    eager = loaded[0].state_dict()  # the checkpoint's (EMA) weights, rounded to bf16
    for name, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, eager[f"backbone.{name}"].to(torch.bfloat16), rtol=0, atol=0)
    faces = anonymize_two_faces(loaded[0], model)
    assert faces[1].dtype == torch.float32 and torch.isfinite(faces[1]).all()
    assert 0 < (faces[0] - faces[1]).abs().mean() < 0.05


def save_toy_taesd(folder: Path):
    """A random AutoencoderTiny of the toy SD VAE's latent space (4 channels, downscale 2), saved as
    diffusers saves TAESD; returns its first stage."""
    from id2face.components.backbone import TinyVAEFirstStage

    torch.manual_seed(1)
    tiny = TinyVAEFirstStage(random_init=True, config=dict(
        encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8], num_encoder_blocks=[1, 1],
        num_decoder_blocks=[1, 1]))
    tiny.vae.save_pretrained(folder)
    return tiny


def test_tiny_decoder_decodes_instead_of_the_checkpoints_vae(tmp_path, checkpoint, sd_vae_checkpoint, capsys):
    from id2face.components.backbone import DecoderSwap

    tiny = save_toy_taesd(tmp_path / "taesd")
    reference, _, _ = load_model(sd_vae_checkpoint)
    model, _, info = load_model(sd_vae_checkpoint, tiny_decoder=tmp_path / "taesd")
    assert isinstance(model.first_stage, DecoderSwap) and info["tiny_decoder"] == str(tmp_path / "taesd")
    # the trained weights are the checkpoint's; only the decoder is new
    expected = reference.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items()
               if not k.startswith("first_stage."))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = model.first_stage.encode(images)
        torch.testing.assert_close(latents, reference.first_stage.encode(images))
        torch.testing.assert_close(model.first_stage.decode(latents), tiny.decode(latents))
    faces = anonymize_two_faces(reference, model)
    assert faces[1].shape == faces[0].shape and not torch.allclose(faces[1], faces[0])

    photo = tmp_path / "face.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    for ckpt, folder, message in [(sd_vae_checkpoint, tmp_path / "missing", "AutoencoderTiny) weights not found"),
                                  (checkpoint, tmp_path / "taesd", "latent channels (4) differs")]:
        assert main(["anonymize", "--checkpoint", str(ckpt), "-i", str(photo), "-o", str(tmp_path / "out"),
                     "--tiny-decoder", str(folder), "--device", "cpu", "--audit-recognizer", "none", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_tiny_encoder_encodes_with_the_tiny_decoders_autoencoder(tmp_path, sd_vae_checkpoint, capsys):
    from id2face.components.backbone import TinyVAEFirstStage

    tiny = save_toy_taesd(tmp_path / "taesd")
    reference, _, _ = load_model(sd_vae_checkpoint)
    model, _, info = load_model(sd_vae_checkpoint, tiny_decoder=tmp_path / "taesd", tiny_encoder=True)
    assert isinstance(model.first_stage, TinyVAEFirstStage) and info["tiny_encoder"] is True
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = model.first_stage.encode(images)
        torch.testing.assert_close(latents, tiny.encode(images))
        assert latents.shape == reference.first_stage.encode(images).shape
        assert not torch.allclose(latents, reference.first_stage.encode(images))
        torch.testing.assert_close(model.first_stage.decode(latents), tiny.decode(latents))
    faces = anonymize_two_faces(reference, model)
    assert faces[1].shape == faces[0].shape and torch.isfinite(faces[1]).all()

    photo, out = tmp_path / "face.png", tmp_path / "out"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    command = ["anonymize", "--checkpoint", str(sd_vae_checkpoint), "-i", str(photo), "-o", str(out), "--device",
               "cpu", "--audit-recognizer", "none", "--steps", "2", "--quiet", "--tiny-encoder"]
    assert main(command) == 2  # which autoencoder would encode?
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--tiny-decoder DIR" in err, err
    assert not out.exists()
    assert main([*command, "--tiny-decoder", str(tmp_path / "taesd")]) == 0
    assert "faces/s (busy s: detect " in capsys.readouterr().err.strip().splitlines()[-1]
    summary = json.loads((out / "anonymize_summary.json").read_text())
    assert summary["model"]["tiny_encoder"] is True and summary["faces"]["anonymized"] == 1
    assert (out / "face.png").is_file()


def test_compile_keeps_its_kernels_in_the_user_cache_unless_told_otherwise(tmp_path, monkeypatch, checkpoint,
                                                                          capsys):
    """A node's /tmp rarely outlives a cluster job: compiled kernels (minutes at SD size) go to
    $ID2FACE_CACHE/torchinductor, where the next job finds them."""
    seen = []

    def stop_before_loading(*args, **kwargs):
        seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        raise UserError("stopped before loading")

    monkeypatch.setattr("id2face.inference.load_model", stop_before_loading)
    monkeypatch.setenv("ID2FACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    photo = tmp_path / "face.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    command = ["anonymize", "--checkpoint", str(checkpoint), "-i", str(photo), "-o", str(tmp_path / "out"),
               "--device", "cpu", "--audit-recognizer", "none", "--quiet"]
    assert main(command) == 2 and seen == [None]  # eager: nothing to cache
    assert main([*command, "--compile"]) == 2 and seen[-1] == str(tmp_path / "cache" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert main([*command, "--compile"]) == 2 and seen[-1] == str(tmp_path / "mine")
    assert capsys.readouterr().err.count("stopped before loading") == 3


def stopped_at(target: str, monkeypatch, tmp_path, checkpoint) -> tuple[list[dict], list[str]]:
    """(the keyword arguments of each call of ``target``, its positional ones under "args", an
    anonymize command line on one photo): ``target`` is replaced by a recorder that stops the
    command there, with exit status 2."""
    built = []

    def recorded(*args, **kwargs):
        built.append({**kwargs, "args": args})
        raise UserError(f"stopped at {target}")

    monkeypatch.setattr(target, recorded)
    photo = tmp_path / "face.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    return built, ["anonymize", "--checkpoint", str(checkpoint), "-i", str(photo), "-o", str(tmp_path / "out"),
                   "--device", "cpu", "--audit-recognizer", "none", "--quiet"]


def test_detection_downscales_group_photos_to_the_commands_side_only(tmp_path, monkeypatch, checkpoint, loaded,
                                                                      capsys):
    """The command's detector (default 2048 px, for the small faces of group photos) and the
    engine's own are the same; nonsense values are one-line errors."""
    from id2face.anonymize import DETECT_MAX_SIDE

    built, command = stopped_at("id2face.data.prepare.FaceDetector", monkeypatch, tmp_path, checkpoint)
    assert main(command) == 2 and built[-1]["max_side"] == DETECT_MAX_SIDE == 2048
    assert main([*command, "--detect-max-side", "1024"]) == 2 and built[-1]["max_side"] == 1024
    assert main([*command, "--detect-max-side", "16"]) == 2 and len(built) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--detect-max-side >= 32")
    with pytest.raises(UserError, match="stopped at id2face.data.prepare.FaceDetector"):
        anonymizer(loaded).detector_fn  # the engine's own, where the caller gives none
    assert built[-1] == {"max_side": DETECT_MAX_SIDE, "device": "cpu", "args": ()}
    assert main([*command, "--detect-device", "cpu:0"]) == 2 and built[-1]["device"] == "cpu:0"  # else --device's


def test_the_command_detects_in_up_to_four_threads_unless_told(tmp_path, monkeypatch, checkpoint):
    import os

    from id2face.anonymize import DEFAULT_DETECT_WORKERS

    built, command = stopped_at("id2face.anonymize.Anonymizer", monkeypatch, tmp_path, checkpoint)
    assert main(command) == 2 and built[-1]["detect_workers"] == DEFAULT_DETECT_WORKERS == min(4, os.cpu_count())
    assert main([*command, "--detect-workers", "3"]) == 2 and built[-1]["detect_workers"] == 3


def test_the_command_searches_convolutions_only_when_told(tmp_path, monkeypatch, checkpoint):
    built, command = stopped_at("id2face.anonymize.Anonymizer", monkeypatch, tmp_path, checkpoint)
    assert main(command) == 2 and built[-1]["args"][3].cudnn_benchmark is False
    assert main([*command, "--cudnn-benchmark"]) == 2 and built[-1]["args"][3].cudnn_benchmark is True


@pytest.mark.slow
def test_compiled_anonymization_gives_the_eager_faces(checkpoint, loaded, fresh_dynamo):
    """One CPU compile of the tiny UNet's forward: 30 s to 95 s on the CPUs measured."""
    detector = GroundTruthDetector()
    photo, _ = compose(detector, skimage_data.coffee(), [(0, 0, 30, 40), (1, 0, 300, 120)])
    compiled_model, cfg, info = load_model(checkpoint, compile=True)
    engines = (anonymizer(loaded, detector=detector),
               anonymizer((compiled_model, cfg, info, loaded[3]), detector=detector))
    results = [engine.anonymize_photos([photo])[0] for engine in engines]  # both seed 0: the same noise
    assert [f["status"] for r in results for f in r.faces] == ["anonymized"] * 4
    difference = np.abs(results[0].pixels.astype(np.int16) - results[1].pixels.astype(np.int16))
    assert difference.max() <= 2  # same numbers up to float reassociation, after uint8 rounding


def test_keyed_pseudonyms_follow_the_person_across_photos(loaded, dlib):
    """Identity 0 appears in two photos (other background, place and size): one cluster, one
    substitute latent. Clustering uses dlib (the tiny test encoder, untrained, maps every face to
    nearly the same embedding); its threshold 0.25 sits between this same render at two sizes and
    distinct cartoon people."""
    detector = GroundTruthDetector()
    first, _ = compose(detector, skimage_data.coffee(), [(0, 0, 30, 40), (1, 0, 300, 120)])
    second, _ = compose(detector, skimage_data.chelsea(), [(0, 0, 260, 90), (2, 0, 40, 30)], size=100)

    def run(key, photos):
        engine = anonymizer(loaded, detector=detector, key=key, cluster_by=dlib, cluster_threshold=0.25)
        results = engine.anonymize_photos(photos)
        clusters = [[f["cluster"] for f in r.faces] for r in results]
        return clusters, engine.clusters.substitutes, results

    clusters, substitutes, results = run("alpha", [first, second])
    assert clusters == [[0, 1], [0, 2]]
    assert all(f["status"] == "anonymized" for r in results for f in r.faces)
    unit = torch.nn.functional.normalize(torch.stack(substitutes), dim=-1)
    assert (unit @ unit.T - torch.eye(3)).abs().max() < 0.99  # three persons, three substitutes

    # a new run with the same key gives person 0 the same substitute: the same keyed draw (same LSH
    # cell, first in it), orthogonalised against this run's representative of the person
    later_clusters, later, _ = run("alpha", [second])
    assert later_clusters == [[0, 1]]
    assert torch.nn.functional.cosine_similarity(later[0], substitutes[0], dim=0) > 0.99
    # another key: unrelated substitutes for the same people
    _, other, _ = run("beta", [first, second])
    cosine = torch.nn.functional.cosine_similarity(other[0], substitutes[0], dim=0)
    assert not torch.allclose(other[0], substitutes[0]) and cosine.abs() < 0.9


def test_astronaut_photo_end_to_end(tmp_path, loaded, mtcnn, dlib):
    """MTCNN -> alignment -> model -> paste-back on a real photo: the changed pixels sit on her face."""
    photo = skimage_data.astronaut()
    source = tmp_path / "in"
    source.mkdir()
    Image.fromarray(photo).save(source / "astronaut.png")
    engine = anonymizer(loaded, detector=mtcnn, audit=dlib)
    summary = anonymize_files([source / "astronaut.png"], tmp_path / "out", engine, progress=False)
    assert summary["faces"]["anonymized"] == 1 and exit_code(summary) == 0
    sidecar = json.loads((tmp_path / "out" / "astronaut.png.json").read_text())
    (face,) = sidecar["faces"]
    x0, y0, x1, y1 = face["box"]
    assert face["score"] > 0.99 and 160 < x0 < x1 < 290 and 40 < y0 < y1 < 195  # her face: x 180-270, y 60-175

    result = np.asarray(Image.open(tmp_path / "out" / "astronaut.png"))
    changed = np.any(result != photo, axis=-1)
    ys, xs = np.nonzero(changed)
    landmarks = np.array(face["landmarks"])
    # the pasted region is centred on the face's identity region (brows to lower lip, computed
    # from the detected landmarks in the photo)
    expected = np.argwhere(inner_face_mask(landmarks, max(photo.shape[:2])) > 0)[:, ::-1].mean(0)
    centroid = np.array([xs.mean(), ys.mean()])
    assert np.linalg.norm(centroid - expected) < 0.03 * (x1 - x0), (centroid, expected)
    # ... and stays on the face: the feather band (8% of the crop) reaches past MTCNN's tight box
    # by up to a fifth of its width (16 px here)
    grow = 0.25 * (x1 - x0)
    assert x0 - grow <= xs.min() and xs.max() <= x1 + grow and y0 - grow <= ys.min() and ys.max() <= y1 + grow
    assert changed[int(landmarks[2, 1]), int(landmarks[2, 0])]  # the nose tip is replaced
    rx0, ry0, rx1, ry1 = face["region"]
    assert rx0 <= xs.min() and xs.max() < rx1 and ry0 <= ys.min() and ys.max() < ry1
    assert changed.sum() > 0.25 * (x1 - x0) * (y1 - y0)
    # dlib recognises her in a JPEG copy, not in the output
    jpeg = tmp_path / "copy.jpg"
    Image.fromarray(photo).save(jpeg, quality=80)
    template = loaded[3]
    control = dlib(torch.stack([audit_crop(photo, landmarks, template),
                                audit_crop(np.asarray(Image.open(jpeg)), landmarks, template)]))
    assert dlib.same_person(control[:1], control[1:]).item()
    assert face["residual_same_person"] is False and face["residual_distance"] > 0.6


def test_faces_still_recognized_are_covered_on_request(loaded, mtcnn, dlib, monkeypatch):
    """A model that barely changes the face (a faint tint) passes the unchanged-output check, but
    dlib still recognises her: with cover_if_recognized the face is covered and dlib no longer does."""
    photo = skimage_data.astronaut()
    engine = anonymizer(loaded, detector=mtcnn, audit=dlib, cover_if_recognized=True)
    monkeypatch.setattr(engine.model, "anonymize", lambda images, masks, **kw: (images + 0.04 * masks).clamp(-1, 1))
    (result,) = engine.anonymize_photos([photo])
    (face,) = result.faces
    assert result.status == "covered" and face["status"] == "covered" and face["reason"] == "still_recognized"
    assert face["residual_same_person"] is False


def test_cover_if_recognized_without_a_judge_that_decides_is_refused(loaded, checkpoint, tmp_path, capsys):
    """The oracle and encoder judges have no same-person threshold, and no audit has none: the flag
    covered nothing, silently."""
    for audit, said in [(None, "no audit recognizer"),
                        (SimpleNamespace(threshold=None, description="oracle"), "(oracle) has none")]:
        with pytest.raises(UserError, match=re.escape(said)):
            anonymizer(loaded, audit=audit, cover_if_recognized=True)
    Image.fromarray(skimage_data.astronaut()).save(tmp_path / "a.png")
    assert main(["anonymize", "--checkpoint", str(checkpoint), "-i", str(tmp_path / "a.png"), "-o",
                 str(tmp_path / "out"), "--audit-recognizer", "none", "--cover-if-recognized", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--cover-if-recognized needs an audit recognizer" in err and "Traceback" not in err


def test_cover_if_recognized_covers_the_faces_an_audit_failed_to_judge(loaded, mtcnn, dlib, monkeypatch):
    engine = anonymizer(loaded, detector=mtcnn, audit=dlib, cover_if_recognized=True)

    def broken(*args, **kwargs):
        raise RuntimeError("dlib worker died")

    monkeypatch.setattr(engine, "_measure", broken)
    (result,) = engine.anonymize_photos([skimage_data.astronaut()])
    assert [(f["status"], f["reason"]) for f in result.faces] == [("covered", "audit_failed")]
    assert result.status == "covered" and any("audit failed" in note for note in result.notes)


def test_output_names_mirror_the_inputs_and_collisions_are_refused(tmp_path):
    from id2face.anonymize import plan_jobs

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / ".hidden").mkdir()
    for name in ("a.jpg", "a.png", "sub/b.jpg", ".hidden/c.png", "notes.txt"):
        (photos / name).write_bytes(b"x")
    out = tmp_path / "out"
    assert [j.relative for j in plan_jobs([photos], out)] == ["a.jpg", "a.png", "sub/b.jpg"]
    png = plan_jobs([photos], out, "png")
    assert [j.relative for j in png] == ["a.jpg.png", "a.png.png", "sub/b.png"]
    assert png[2].output == out / "sub" / "b.png" and png[2].sidecar == out / "sub" / "b.png.json"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="would both be written"):
        plan_jobs([photos / "a.jpg", tmp_path / "other" / "a.jpg"], out)


def test_checkpoint_without_stored_config_uses_the_run_folder_config(tmp_path, checkpoint):
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    payload.pop("hyper_parameters")
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(payload, folder / "last.ckpt")
    with pytest.raises(UserError, match="stores no config"):
        read_checkpoint_config(folder / "last.ckpt")
    (tmp_path / "run" / "config.yaml").write_text((checkpoint.parent.parent / "config.yaml").read_text())
    cfg, state, source = read_checkpoint_config(folder / "last.ckpt")
    assert source.endswith("config.yaml") and cfg.data.image_size == 32 and cfg.model.context_dim == 32
    assert state.keys() == payload["state_dict"].keys()

    # settings renamed since training: dropped outside `model` (named in the source), refused inside
    stored = torch.load(checkpoint, map_location="cpu", weights_only=False)
    stored["hyper_parameters"]["config"]["eval"]["retired_setting"] = 1
    stored["hyper_parameters"]["config"]["trainer"]["old_flag"] = True
    torch.save(stored, folder / "stale.ckpt")
    cfg, _, source = read_checkpoint_config(folder / "stale.ckpt")
    assert "eval.retired_setting" in source and "trainer.old_flag" in source and "retired_setting" not in cfg.eval
    stored["hyper_parameters"]["config"]["model"]["retired_width"] = 3
    torch.save(stored, folder / "stale.ckpt")
    # named by the checkpoint, not by a temporary copy of its config
    with pytest.raises(UserError, match=r"^\S*stale\.ckpt's config: unknown key 'model\.retired_width'"):
        read_checkpoint_config(folder / "stale.ckpt")


def test_clusters_join_the_closest_person_but_never_merge_two_faces_of_one_photo():
    from id2face.anonymize.engine import _Clusters

    made = []
    clusters = _Clusters(threshold=0.6, metric="euclidean")  # dlib-style: same person iff distance < 0.6
    a, b = torch.zeros(4), torch.tensor([1.0, 0, 0, 0])
    assert clusters.assign([a, b], lambda row: made.append(row) or torch.tensor([float(row)])) == [0, 1]
    # next photo: a near-copy of a, then a closer one in the same photo (b is too far for either):
    # the closer one is a, the other a new person, whatever the detector's order
    assert clusters.assign([a + 0.1, a + 0.05], lambda row: made.append(row) or torch.tensor([9.0])) == [2, 0]
    assert made == [0, 1, 0] and len(clusters.substitutes) == 3
    # a stranger who merely passes the threshold, listed first (the larger face), does not take
    # Alice's pseudonym from Alice
    known = _Clusters(threshold=0.5, metric="cosine")
    alice, bob, alice_again = torch.tensor([1.0, 0, 0]), torch.tensor([0.55, 0.835, 0]), torch.tensor([0.98, 0, 0.2])
    known.assign([alice], lambda row: torch.zeros(1))
    assert known.assign([bob, alice_again], lambda row: torch.zeros(1)) == [1, 0]
    cosine = _Clusters(threshold=0.9, metric="cosine")
    assert cosine.assign([torch.tensor([1.0, 0]), torch.tensor([0.0, 1])], lambda row: torch.zeros(1)) == [0, 1]
    assert cosine.assign([torch.tensor([0.1, 1.0])], lambda row: torch.zeros(1)) == [1]


def test_feathered_mask_is_one_on_the_mask_and_exactly_zero_beyond_the_band():
    mask = np.zeros((32, 32), np.float32)
    mask[10:20, 12:22] = 1
    weight = feathered_mask(mask, band=3.0)
    assert (weight[mask > 0] == 1).all()
    assert weight[10, 10] == pytest.approx(1 - 2 / 3) and weight[10, 9] == 0 and weight[5:8, :].max() == 0
    assert weight[:, :8].max() == 0 and weight.max() == 1


def test_bad_arguments_give_one_line_and_exit_2(tmp_path, checkpoint, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skimage_data.astronaut()).save(photos / "a.png")
    keyed = ["-i", str(photos), "-o", str(tmp_path / "o"), "--key", "k", "--audit-recognizer", "none"]
    cases = [
        (["-i", str(tmp_path / "missing"), "-o", str(tmp_path / "o")], "does not exist"),
        (["-i", str(photos), "-o", str(photos / "out")], "inside the input"),
        (["-i", str(photos), "-o", str(photos)], "is the input"),
        (["-i", str(photos / "a.png"), "-o", str(photos / "a.png")], "is the input"),
        (["-i", str(photos), "-o", str(tmp_path / "o"), "--batch-size", "0"], "--batch-size"),
        (["-i", str(photos), "-o", str(tmp_path / "o"), "--key", ""], "--key is empty"),
        (["-i", str(photos), "-o", str(tmp_path / "o"), "--io-workers", "-1"], "--io-workers must be >= 0"),
        (["-i", str(photos), "-o", str(tmp_path / "o"), "--pipeline-depth", "-2"], "--pipeline-depth must be >= 0"),
        (["-i", str(photos), "-o", str(tmp_path / "o"), "--audit-workers", "-1"], "--audit-workers must be >= 0"),
        (["-i", str(photos), "-o", str(tmp_path / "o"), "--detect-workers", "0"], "--detect-workers must be >= 1"),
        (["-i", str(photos), "-o", str(tmp_path / "o"), "--attention-backends", "flash", "--device", "cpu"],
         "unknown ['flash']; valid: math, flash_attention"),
        (["-i", str(photos), "-o", str(tmp_path / "o"), "--detect-device", "gpu"],
         "--detect-device gpu is not a torch device"),
        (["-i", str(photos), "-o", str(tmp_path / "o"), "--steps", "1001", "--device", "cpu"],
         "--steps must be <= 1000 (the model's training timesteps), got 1001"),
        (["-i", str(photos), "-o", str(tmp_path / "o"), "--cluster-threshold", "0.7"],
         "--cluster-threshold groups faces into persons for --key"),
        ([*keyed, "--cluster-threshold", "5"],
         "--cluster-threshold 5.0 groups no faces by cosine (a similarity in [-1, 1])"),
        ([*keyed, "--cluster-threshold", "nan"], "--cluster-threshold nan groups no faces by cosine"),
        ([*keyed, "--cluster-by", "dlib", "--cluster-threshold", "0"],
         "--cluster-threshold 0.0 groups no faces by euclidean (a distance > 0)"),
    ]
    for extra, message in cases:
        assert main(["anonymize", "--checkpoint", str(checkpoint), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and err.startswith("id2face anonymize: error:"), err
    assert main(["anonymize", "--checkpoint", str(tmp_path / "nope.ckpt"), "-i", str(photos), "-o",
                 str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and sorted(os.listdir(photos)) == ["a.png"]


def test_cli_covers_faces_when_sampling_fails_and_exits_3(tmp_path, checkpoint, monkeypatch, capsys):
    from id2face.model import ID2Face

    def broken(self, images, masks, **kwargs):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(ID2Face, "anonymize", broken)
    photo = skimage_data.astronaut()
    Image.fromarray(photo).save(tmp_path / "astronaut.png")
    code = main(["anonymize", "--checkpoint", str(checkpoint), "-i", str(tmp_path / "astronaut.png"), "-o",
                 str(tmp_path / "out"), "--device", "cpu", "--audit-recognizer", "none", "--quiet"])
    assert code == 3
    (face,) = json.loads((tmp_path / "out" / "astronaut.png.json").read_text())["faces"]
    assert face["status"] == "covered" and face["reason"] == "sampling_error"
    x0, y0, x1, y1 = (int(v) for v in face["box"])
    result = np.asarray(Image.open(tmp_path / "out" / "astronaut.png"))
    inner = (slice(y0 + 10, y1 - 10), slice(x0 + 10, x1 - 10))
    assert np.abs(result[inner].astype(int) - photo[inner].astype(int)).mean() > 25
    summary = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert summary["faces"]["covered_reasons"] == {"sampling_error": 1}
    assert "1 covered" in capsys.readouterr().err


def test_cli_subprocess_reports_unreadable_inputs_and_continues(tmp_path, checkpoint):
    """A real process: unreadable files get a one-line message and a status, the run goes on,
    a photo without faces is written unchanged, exit status 1, no traceback anywhere."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "notes.png").write_text("not a picture")
    (photos / "empty.jpg").write_bytes(b"")
    ramp = np.tile(np.linspace(0, 255, 96, dtype=np.uint8)[None, :, None], (64, 1, 3))
    Image.fromarray(ramp).save(photos / "sky.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "id2face.cli", "anonymize", "--checkpoint", str(checkpoint), "-i", str(photos),
               "-o", str(tmp_path / "out"), "--audit-recognizer", "none", "--device", "cpu", "--quiet",
               "--pipeline-depth", "2"]  # detection in a worker thread, as on a GPU
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "notes.png" in line or "empty.jpg" in line]
    assert len(lines) == 2 and any("not_an_image" in line for line in lines) and any("empty_file" in line
                                                                                     for line in lines)
    summary = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert summary["statuses"] == {"empty_file": 1, "no_face": 1, "not_an_image": 1}
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "sky.png")), ramp)
    assert not (tmp_path / "out" / "notes.png").exists()

    missing = subprocess.run([*command[:7], str(tmp_path / "nowhere"), *command[8:]], capture_output=True, text=True,
                             env=env, cwd=REPO, timeout=300)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    expected = f"id2face anonymize: error: input {tmp_path / 'nowhere'} does not exist"
    assert missing.stderr.strip().splitlines() == [expected]


def test_a_gpu_run_audited_by_dlib_is_told_what_sets_its_pace(dlib):
    from id2face.commands.anonymize import audit_pace_note
    from id2face.metrics.recognizers import build_recognizer

    assert "--audit-recognizer encoder" in audit_pace_note(dlib, "cuda:0")
    assert "in this process" in audit_pace_note(dlib, "cuda:0") and "--audit-workers" in audit_pace_note(dlib, "cuda")
    assert audit_pace_note(dlib, "cpu") is None  # there everything shares the CPU anyway
    encoder = build_recognizer({"name": "encoder", "params": {"encoder": "tiny"}})
    assert audit_pace_note(encoder, "cuda") is None and audit_pace_note(None, "cuda") is None


def test_audit_workers_reach_a_dlib_judge_unless_its_node_sets_them(loaded, dlib, capsys):
    from id2face.commands.anonymize import audit_pace_note

    cfg = loaded[1]
    assert build_audit_recognizer("dlib", cfg, dlib_workers=3).workers == 3
    assert build_audit_recognizer({"name": "dlib", "params": {"workers": 1}}, cfg, dlib_workers=3).workers == 1
    assert build_audit_recognizer("dlib", cfg).workers == 0
    assert build_audit_recognizer("encoder", cfg, dlib_workers=3) is not None  # other judges ignore it
    assert "in 3 processes" in audit_pace_note(build_audit_recognizer("dlib", cfg, dlib_workers=3), "cuda")
