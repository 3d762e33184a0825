"""`id2face prepare`: MTCNN alignment on a real photo, manifest, resume, refusals, exit codes."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from id2face.cli import main  # noqa: E402
from id2face.data.align import template_landmarks, transform_points  # noqa: E402
from id2face.data.imageio import ImageReadError, read_image  # noqa: E402
from id2face.data.prepare import (FaceDetector, PrepareSettings, output_paths, prepare)  # noqa: E402
from id2face.errors import UserError  # noqa: E402

ASTRONAUT = skimage_data.astronaut()  # public-domain NASA portrait, one face


def face_photo(side: int = 200, flip: bool = False, shift: int = 0) -> Image.Image:
    """A square cut of the astronaut around her face, resized to ``side``."""
    image = Image.fromarray(ASTRONAUT[20 + shift:320 + shift, 80:380])
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image.resize((side, side), Image.BILINEAR)


def read_entries(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "manifest.jsonl").read_text().splitlines()]


def run_quiet(input_dir, output_dir, **settings):
    return prepare(input_dir, output_dir, PrepareSettings(**settings), threads=1, progress=False)


def test_astronaut_face_is_found_and_its_eyes_land_on_the_template(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    Image.fromarray(ASTRONAUT).save(source / "astronaut.png")
    summary = run_quiet(source, tmp_path / "out", size=112)
    assert summary.usable == 1 and summary.statuses == {"ok": 1}
    (entry,) = read_entries(tmp_path / "out")
    assert entry["status"] == "ok" and entry["score"] > 0.99 and entry["identity"] is None
    # The detected face is the astronaut's (her face spans about x 180-270, y 60-175).
    x0, y0, x1, y1 = entry["box"]
    assert 160 < x0 < x1 < 290 and 40 < y0 < y1 < 195
    template = template_landmarks(112)
    crop_landmarks = np.array(entry["landmarks_crop"])
    np.testing.assert_allclose(transform_points(entry["landmarks"], entry["matrix"]), crop_landmarks, atol=0.02)
    # Least squares over all 5 points (and her smile widens the mouth), so the eyes sit a few
    # pixels off the template: measured 2.6 and 2.3 px at 112 px.
    assert np.linalg.norm(crop_landmarks[:2] - template[:2], axis=1).max() < 3.5
    # Independent check: MTCNN run again on the written crop finds the eyes at the template.
    crop = np.asarray(Image.open(tmp_path / "out" / entry["output"]).convert("RGB"))
    assert crop.shape == (112, 112, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # oversubscribed threads on a shared machine slow MTCNN 30x
    try:
        boxes, scores, points = FaceDetector()(crop)
    finally:
        torch.set_num_threads(threads)
    assert len(scores) >= 1 and scores[0] > 0.95
    assert np.linalg.norm(points[0][:2] - template[:2], axis=1).max() < 4.5  # measured 3.7 px


def test_the_photo_mtcnn_sees_is_pils_bilinear_within_one_level():
    photo = np.asarray(Image.fromarray(ASTRONAUT).resize((1100, 700), Image.BICUBIC))  # read-only, as decoded
    before = photo.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" notice must not reach the user
        small, scale_x, scale_y = FaceDetector(max_side=300).downscaled(photo)
    assert small.shape == (191, 300, 3) and small.dtype == np.uint8 and small.flags.c_contiguous
    assert (scale_x, scale_y) == (300 / 1100, 191 / 700)
    pils = np.asarray(Image.fromarray(photo).resize((300, 191), Image.BILINEAR)).astype(int)
    difference = np.abs(small.astype(int) - pils)
    assert difference.max() <= 1 and difference.mean() < 0.03  # rounding: measured 1 % of values a level off
    np.testing.assert_array_equal(photo, before)
    assert FaceDetector(max_side=1100).downscaled(photo)[0] is photo  # not larger: as it is


def test_faces_found_on_the_downscaled_photo_come_back_in_the_photos_pixels():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # oversubscribed threads on a shared machine slow MTCNN 30x
    try:
        boxes, _, points = FaceDetector(max_side=512)(ASTRONAUT)
        big = np.asarray(Image.fromarray(ASTRONAUT).resize((1536, 1536), Image.BICUBIC))
        big_boxes, big_scores, big_points = FaceDetector(max_side=512)(big)
    finally:
        torch.set_num_threads(threads)
    assert len(big_scores) == len(boxes) >= 1 and big_scores[0] > 0.99
    # pixel centres: x in the 512 px photo is 3 (x + 0.5) - 0.5 in the 1536 px one
    np.testing.assert_allclose(big_boxes, 3 * (boxes + 0.5) - 0.5, atol=3.0)  # 1 px of the 512 px photo
    np.testing.assert_allclose(big_points, 3 * (points + 0.5) - 0.5, atol=3.0)


def test_rerun_skips_what_is_done_and_redoes_what_is_missing_or_changed(tmp_path):
    source, output = tmp_path / "in", tmp_path / "out"
    for rel, photo in {"alice/1.png": face_photo(), "alice/2.jpg": face_photo(flip=True),
                       "bob/1.png": face_photo(shift=20)}.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        photo.save(source / rel)
    first = run_quiet(source, output)
    assert (first.processed, first.skipped, first.usable) == (3, 0, 3)
    entries = read_entries(output)
    assert [e["source"] for e in entries] == ["alice/1.png", "alice/2.jpg", "bob/1.png"]
    assert [e["identity"] for e in entries] == ["alice", "alice", "bob"]
    assert [e["output"] for e in entries] == ["images/alice/1.png", "images/alice/2.png", "images/bob/1.png"]
    kept_crop = output / "images/alice/1.png"
    kept_stamp = kept_crop.stat().st_mtime_ns

    second = run_quiet(source, output)
    assert (second.processed, second.skipped) == (0, 3)
    assert read_entries(output) == entries

    (output / "images/alice/2.png").unlink()                       # a lost crop
    face_photo(side=180, shift=20).save(source / "bob/1.png")      # a source replaced by the user
    face_photo(side=220).save(source / "bob/3.png")                 # a new source
    with open(output / "manifest.jsonl", "a") as manifest:         # a run killed mid-line
        manifest.write('{"source": "bob/9.png", "stat')
    third = run_quiet(source, output)
    assert (third.processed, third.skipped, third.usable) == (3, 1, 4)
    assert kept_crop.stat().st_mtime_ns == kept_stamp
    entries = read_entries(output)
    assert [e["source"] for e in entries] == ["alice/1.png", "alice/2.jpg", "bob/1.png", "bob/3.png"]
    assert all(e["status"] == "ok" and (output / e["output"]).is_file() for e in entries)
    assert entries[2]["source_size"] == [180, 180]
    assert not list(output.rglob("*.tmp"))


def test_workers_give_the_same_manifest_as_one_process(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for i in range(4):
        face_photo(side=160 + 20 * i, flip=bool(i % 2)).save(source / f"{i}.png")
    (source / "broken.jpg").write_text("not a photo")
    run_quiet(source, tmp_path / "one")
    summary = prepare(source, tmp_path / "two", PrepareSettings(), workers=2, progress=False)
    assert summary.processed == 5 and summary.usable == 4
    one, two = read_entries(tmp_path / "one"), read_entries(tmp_path / "two")
    drop = ("source_mtime_ns",)
    assert [{k: v for k, v in e.items() if k not in drop} for e in one] == \
           [{k: v for k, v in e.items() if k not in drop} for e in two]
    for a, b in zip(one, two):
        if a["output"]:
            assert (tmp_path / "one" / a["output"]).read_bytes() == (tmp_path / "two" / b["output"]).read_bytes()


def test_output_paths_never_collide():
    sources = ["a/x.jpg", "a/x.png", "a/y.jpg", "b/x.jpg"]
    assert output_paths(sources) == ["images/a/x.jpg.png", "images/a/x.png.png", "images/a/y.png", "images/b/x.png"]
    assert len(set(output_paths(sources))) == len(sources)
    # a.jpg keeps its suffix (a.png shares its stem): images/a.jpg.png, the name a.jpg.png's stem gives
    sources = ["p/a.jpg", "p/a.jpg.png", "p/a.png", "p/b.jpg", "p/b.jpg.png", "q/c.png.png", "q/c.png"]
    assert output_paths(sources) == ["images/p/a.jpg.png", "images/p/a.jpg.png.png", "images/p/a.png.png",
                                     "images/p/b.png", "images/p/b.jpg.png.png", "images/q/c.png.png.png",
                                     "images/q/c.png"]
    assert len(set(output_paths(sources))) == len(sources)


def test_a_source_named_like_a_siblings_crop_gets_its_own_crop_and_reruns_settle(tmp_path):
    # a.jpg and a.jpg.png both had the crop images/a.jpg.png: the manifest pointed both at one file,
    # and each rerun redid the one whose crop the other had overwritten.
    source, output = tmp_path / "in", tmp_path / "out"
    (source / "p").mkdir(parents=True)
    face_photo(side=180).save(source / "p/a.jpg.png")
    first = run_quiet(source, output, size=64)
    assert first.usable == 1 and read_entries(output)[0]["output"] == "images/p/a.jpg.png"
    face_photo(side=200, flip=True).save(source / "p/a.jpg")
    face_photo(side=220, shift=20).save(source / "p/a.png")
    second = run_quiet(source, output, size=64)
    assert (second.processed, second.usable) == (3, 3)  # a.jpg.png renamed: redone under its new name
    entries = read_entries(output)
    assert [(e["source"], e["output"]) for e in entries] == [
        ("p/a.jpg", "images/p/a.jpg.png"), ("p/a.jpg.png", "images/p/a.jpg.png.png"), ("p/a.png", "images/p/a.png.png")]
    for entry in entries:
        assert (output / entry["output"]).stat().st_size == entry["output_bytes"]
    assert Image.open(output / "images/p/a.jpg.png").size == (64, 64)
    third = run_quiet(source, output, size=64)
    assert (third.processed, third.skipped) == (0, 3) and read_entries(output) == entries


def test_a_layout_folder_outside_the_input_is_refused_and_nothing_is_written(tmp_path, capsys):
    # subset=../.. scanned above INPUT, and the crop of ../../pics/face.png went to
    # OUTPUT/images/../../pics/face.png: onto the source photo itself.
    source, pics = tmp_path / "data/in", tmp_path / "pics"
    (source / "n0001").mkdir(parents=True)
    pics.mkdir()
    face_photo().save(source / "n0001/a.png")
    face_photo(flip=True).save(pics / "face.png")
    before = (pics / "face.png").read_bytes()
    assert main(["prepare", "-i", str(source), "-o", str(tmp_path / "data/out"), "--dataset", "vggface2",
                 "--dataset-param", "subset=../..", "--size", "64", "--quiet", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "subset='../..' must be a folder inside" in err and len(err.strip().splitlines()) == 1
    assert (pics / "face.png").read_bytes() == before
    assert not (tmp_path / "data/out").exists()


def test_a_crop_path_through_a_link_out_of_the_output_is_refused(tmp_path, capsys):
    # The second guard: whatever the layout gives, no crop is written outside OUTPUT; here
    # OUTPUT/images/p links to the input folder, where the crop images/p/a.png would replace p/a.png.
    source, output = tmp_path / "in", tmp_path / "out"
    (source / "p").mkdir(parents=True)
    face_photo().save(source / "p/a.png")
    before = (source / "p/a.png").read_bytes()
    (output / "images").mkdir(parents=True)
    (output / "prepare.json").write_text(json.dumps({"format": 1, **asdict(PrepareSettings(size=64))}))
    (output / "images/p").symlink_to(source / "p", target_is_directory=True)
    assert main(["prepare", "-i", str(source), "-o", str(output), "--size", "64", "--quiet", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "outside the output" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (source / "p/a.png").read_bytes() == before
    assert sorted(p.name for p in source.rglob("*")) == ["a.png", "p"]
    from id2face.data.prepare import check_outputs

    with pytest.raises(UserError, match="outside the output"):
        check_outputs(["images/../../in/p/a.png"], output.resolve())


def test_a_photo_whose_name_is_not_utf8_is_prepared_and_read(tmp_path):
    from id2face.data.datasets import IdentityFolder

    source = tmp_path / "in"
    (source / "p1").mkdir(parents=True)
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1: os.walk gives its \xe9 as a surrogate escape
    try:
        face_photo().save(source / "p1" / name)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    face_photo(flip=True).save(source / "p1/b.png")
    assert run_quiet(source, tmp_path / "out", size=64).usable == 2
    data = IdentityFolder(tmp_path / "out", image_size=64)
    assert data.paths == ["images/p1/b.png", f"images/p1/{name}"]
    assert data[1]["image"].shape == (3, 64, 64) and data.identity_labels.tolist() == [0, 0]


@pytest.mark.parametrize("where", ["same", "inside", "around", "foreign"])
def test_refuses_output_inside_input_and_foreign_folders(tmp_path, capsys, where):
    source = tmp_path / "photos"
    source.mkdir()
    face_photo().save(source / "a.png")
    output = {"same": source, "inside": source / "aligned", "around": tmp_path, "foreign": tmp_path / "mine"}[where]
    if where == "foreign":
        output.mkdir()
        (output / "notes.txt").write_text("my own file")
    before = sorted(p.name for p in source.rglob("*"))
    assert main(["prepare", "-i", str(source), "-o", str(output), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in source.rglob("*")) == before
    if where == "foreign":
        assert sorted(p.name for p in output.iterdir()) == ["notes.txt"]


def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    source = tmp_path / "in"
    source.mkdir()
    face_photo().save(source / "a.png")
    assert main(["prepare", "-i", str(source), "-o", str(tmp_path / "out"), "--size", "64", "--quiet",
                 "--threads", "1"]) == 0
    assert main(["prepare", "-i", str(source), "-o", str(tmp_path / "out"), "--size", "96", "--quiet"]) == 2
    assert "size=64" in capsys.readouterr().err
    assert Image.open(tmp_path / "out/images/a.png").size == (64, 64)


def test_exit_status_is_one_when_nothing_usable(tmp_path, capsys):
    source = tmp_path / "in"
    source.mkdir()
    Image.fromarray(skimage_data.coffee()).save(source / "coffee.jpg")
    (source / "readme.jpg").write_text("hello")
    (source / "labels.txt").write_text("not an image name: not listed")
    assert main(["prepare", "-i", str(source), "-o", str(tmp_path / "out"), "--quiet", "--threads", "1"]) == 1
    captured = capsys.readouterr()
    assert "no usable face" in captured.err and "Traceback" not in captured.err
    assert {e["source"]: e["status"] for e in read_entries(tmp_path / "out")} == {
        "coffee.jpg": "no_face", "readme.jpg": "not_an_image"}
    assert "1 other files" in captured.out


def test_multiple_faces_skip_policy_writes_no_crop(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    pair = Image.new("RGB", (400, 200))
    pair.paste(face_photo(), (0, 0))
    pair.paste(face_photo(flip=True), (200, 0))
    pair.save(source / "two.png")
    summary = run_quiet(source, tmp_path / "out", multiple_faces="skip")
    (entry,) = read_entries(tmp_path / "out")
    assert summary.usable == 0
    assert entry["status"] == "multiple_faces" and entry["output"] is None and entry["num_faces"] == 2
    assert "skipped" in entry["message"]


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["prepare", "-i", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["prepare", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2
    assert main(["prepare", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "--dataset", "nope"]) == 2
    assert main(["prepare", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "out"),
                 "--dataset-param", "subset"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 4 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path / "empty") == []


@pytest.mark.parametrize("flag, value", [("--max-pixels", "nan"), ("--max-pixels", "inf"), ("--max-pixels", "0"),
                                         ("--max-pixels", "-1e6"), ("--detect-max-side", "0"),
                                         ("--detect-max-side", "31")])
def test_bad_limits_are_one_line_errors(tmp_path, capsys, flag, value):
    # nan gave a traceback from int(); --detect-max-side 0 made every photo too_small, silently.
    source = tmp_path / "in"
    source.mkdir()
    face_photo().save(source / "a.png")
    assert main(["prepare", "-i", str(source), "-o", str(tmp_path / "out"), f"{flag}={value}", "--quiet",
                 "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_max_pixels_above_pillows_own_limit_is_what_decides(tmp_path, monkeypatch):
    # Pillow refuses above 2 x Image.MAX_IMAGE_PIXELS (179 Mpx) at open, before our header check:
    # --max-pixels 3e8 refused a 195 Mpx photo all the same. A lowered Pillow limit stands in here.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (60, 50), (10, 200, 30)).save(tmp_path / "big.png")  # 3000 px > 2 x 1000
    loaded = read_image(tmp_path / "big.png", max_pixels=5000)
    assert loaded.pixels.shape == (50, 60, 3) and (loaded.pixels[0, 0] == (10, 200, 30)).all()
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    with pytest.raises(ImageReadError, match=r"60x50 = .* exceeds the cap .*\(--max-pixels\)") as refused:
        read_image(tmp_path / "big.png", max_pixels=2500)  # our cap, on the header: never decoded
    assert refused.value.status == "too_large" and Image.MAX_IMAGE_PIXELS == 1000


def test_face_scale_keeps_more_context_and_datasets_follow_it(tmp_path):
    from id2face.data.align import template_mask
    from id2face.registry import DATASETS

    source = tmp_path / "in"
    source.mkdir()
    face_photo(side=300).save(source / "a.png")
    run_quiet(source, tmp_path / "out", size=128, face_scale=0.6, dataset="ffhq")
    (entry,) = read_entries(tmp_path / "out")
    eyes = np.array(entry["landmarks_crop"])[:2]
    loose, tight = template_landmarks(128, 0.6), template_landmarks(128)
    assert np.linalg.norm(eyes - loose[:2], axis=1).max() < 4.0
    assert np.linalg.norm(eyes[1] - eyes[0]) < 0.7 * np.linalg.norm(tight[1] - tight[0])
    assert json.loads((tmp_path / "out/prepare.json").read_text())["face_scale"] == 0.6
    item = DATASETS.build({"name": "ffhq", "params": {"root": str(tmp_path / "out")}}, image_size=64)[0]
    assert torch.equal(item["mask"][0], torch.from_numpy(template_mask(64, 0.6)))
    assert np.linalg.norm(item["landmarks"][:2].numpy() - template_landmarks(64, 0.6)[:2], axis=1).max() < 2.0
