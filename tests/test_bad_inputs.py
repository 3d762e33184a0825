"""`prepare` on a corpus of bad and awkward files, generated here (nothing binary is committed).

Every file gets a manifest status and a one-line message, nothing prints a traceback, inputs are
byte-identical afterwards, EXIF rotation is applied before detection, and the run exits 0
because some files were usable.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

ASTRONAUT = skimage_data.astronaut()
ORIENTATION = 0x0112
KNOWN_STATUSES = {"ok", "multiple_faces", "no_face", "too_small", "empty_file", "not_an_image", "truncated",
                  "unreadable", "too_large", "error"}


def _face(side: int = 240) -> Image.Image:
    return Image.fromarray(ASTRONAUT[20:320, 80:380]).resize((side, side), Image.BILINEAR)


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_bomb(side: int) -> bytes:
    """A valid PNG header claiming side x side RGB pixels, with almost no data behind it."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (PIL cannot write one): rows of big-endian uint16, filter type 0."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def _exif_rotated(image: Image.Image, orientation: int) -> bytes:
    """Stored pixels turned so that a viewer honouring ``orientation`` shows ``image`` upright."""
    stored = image.transpose(Image.ROTATE_90 if orientation == 6 else Image.ROTATE_270)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return _jpeg_bytes(stored, exif=exif.tobytes())


def make_corpus(root: Path) -> dict[str, str]:
    """Write the corpus; returns {relative path: expected status}."""
    face = _face()
    files: dict[str, tuple[bytes, str]] = {}
    files["person/upright.jpg"] = (_jpeg_bytes(face), "ok")
    files["empty.jpg"] = (b"", "empty_file")
    files["truncated.jpg"] = (_jpeg_bytes(face)[:6000], "truncated")
    files["text.jpg"] = (b"this is a shopping list, not a photo\n", "not_an_image")
    files["gray.jpg"] = (_jpeg_bytes(face.convert("L")), "ok")
    files["cmyk.jpg"] = (_jpeg_bytes(face.convert("CMYK")), "ok")
    buffer = io.BytesIO()
    gray16 = (np.asarray(face.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(buffer, format="PNG")
    files["gray16.png"] = (buffer.getvalue(), "ok")
    files["rgb16.png"] = (_png_rgb16(np.asarray(face).astype(np.uint16) * 257), "ok")
    rgba = face.convert("RGBA")
    alpha = np.full((face.height, face.width), 255, np.uint8)
    alpha[:, :30] = 0  # a transparent strip, as in a cut-out portrait
    rgba.putalpha(Image.fromarray(alpha))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    files["rgba.png"] = (buffer.getvalue(), "ok")
    buffer = io.BytesIO()
    face.convert("P", palette=Image.ADAPTIVE).save(buffer, format="GIF")
    files["palette.gif"] = (buffer.getvalue(), "ok")
    files["rotated6.jpg"] = (_exif_rotated(face, 6), "ok")
    files["rotated8.jpg"] = (_exif_rotated(face, 8), "ok")
    large = Image.new("RGB", (8000, 6000), (90, 100, 110))
    large.paste(_face(2400), (3000, 1500))
    files["large.jpg"] = (_jpeg_bytes(large), "ok")
    files["bomb.png"] = (_png_bomb(30000), "too_large")
    buffer = io.BytesIO()
    Image.fromarray(skimage_data.coffee()).save(buffer, format="PNG")
    files["coffee.png"] = (buffer.getvalue(), "no_face")
    pair = Image.new("RGB", (420, 260), (200, 200, 200))
    pair.paste(_face(250), (0, 0))
    pair.paste(_face(150), (260, 60))
    files["two_faces.jpg"] = (_jpeg_bytes(pair), "multiple_faces")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="PNG")
    files["tiny.png"] = (buffer.getvalue(), "too_small")
    for rel, (data, _) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "notes.txt").write_text("not an image name: ignored, not in the manifest\n")
    return {rel: status for rel, (_, status) in files.items()}


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    source, output = root / "in", root / "out"
    source.mkdir()
    expected = make_corpus(source)
    before = _hashes(source)
    modes = {p: os.stat(source / p).st_mode for p in before}
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "id2face.cli", "prepare", "-i", str(source), "-o", str(output),
                             "--threads", "1"], capture_output=True, text=True, env=env, timeout=600)
    entries = {e["source"]: e for e in map(json.loads, (output / "manifest.jsonl").read_text().splitlines())}
    return dict(source=source, output=output, expected=expected, before=before, modes=modes, result=result,
                entries=entries)


def test_every_file_gets_its_status_and_a_one_line_message(corpus_run):
    result, entries, expected = corpus_run["result"], corpus_run["entries"], corpus_run["expected"]
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode == 0, result.stderr
    assert set(entries) == set(expected)  # notes.txt is not an image name: not listed
    assert {s: entries[s]["status"] for s in expected} == expected
    for entry in entries.values():
        assert entry["status"] in KNOWN_STATUSES
        assert isinstance(entry["message"], str) and "\n" not in entry["message"] and len(entry["message"]) < 400
        if entry["status"] not in ("ok", "multiple_faces"):
            assert entry["message"] and entry["output"] is None
    assert "1 other files" in result.stdout


def test_inputs_are_byte_identical_and_nothing_was_added(corpus_run):
    source = corpus_run["source"]
    assert _hashes(source) == corpus_run["before"]
    assert {p: os.stat(source / p).st_mode for p in corpus_run["before"]} == corpus_run["modes"]


def test_messages_say_what_was_wrong_or_converted(corpus_run):
    entries = corpus_run["entries"]
    assert "0 bytes" in entries["empty.jpg"]["message"]
    assert "truncated" in entries["truncated.jpg"]["message"]
    assert "text content" in entries["text.jpg"]["message"]
    assert "Mpx" in entries["bomb.png"]["message"] or "pixels" in entries["bomb.png"]["message"]
    assert "CMYK" in entries["cmyk.jpg"]["message"]
    assert "16-bit" in entries["gray16.png"]["message"]
    assert "alpha" in entries["rgba.png"]["message"]
    assert "EXIF orientation 6" in entries["rotated6.jpg"]["message"]
    assert "downscaled" in entries["large.jpg"]["message"]
    assert entries["two_faces.jpg"]["num_faces"] == 2 and "largest" in entries["two_faces.jpg"]["message"]
    assert entries["person/upright.jpg"]["identity"] == "person" and entries["gray.jpg"]["identity"] is None


def test_usable_crops_exist_and_are_faces_at_the_template(corpus_run):
    from id2face.data.align import template_landmarks

    output, entries = corpus_run["output"], corpus_run["entries"]
    template = template_landmarks(256)
    for source, entry in entries.items():
        if entry["status"] in ("ok", "multiple_faces"):
            crop = Image.open(output / entry["output"])
            assert crop.size == (256, 256) and crop.mode == "RGB"
            eyes = np.array(entry["landmarks_crop"])[:2]
            assert np.linalg.norm(eyes - template[:2], axis=1).max() < 12, source
    # The larger of the two faces was kept (the left copy, 250 px of 420).
    assert entries["two_faces.jpg"]["box"][2] < 260


def test_exif_rotation_is_applied_before_detection(corpus_run):
    entries = corpus_run["entries"]
    upright = np.array(entries["person/upright.jpg"]["landmarks"])
    for name in ("rotated6.jpg", "rotated8.jpg"):
        entry = entries[name]
        assert entry["source_size"] == [240, 240]
        # Landmarks are reported in the upright photo: where they are in the upright copy.
        assert np.abs(np.array(entry["landmarks"]) - upright).max() < 3.0, name


def test_large_photo_is_cropped_from_full_resolution(corpus_run):
    entry = corpus_run["entries"]["large.jpg"]
    assert entry["source_size"] == [8000, 6000]
    x0, y0, x1, y1 = entry["box"]
    assert 3000 < x0 < x1 < 5400 and 1500 < y0 < y1 < 3900  # the face pasted at (3000, 1500), 2400 px
    crop = np.asarray(Image.open(corpus_run["output"] / entry["output"]), dtype=np.float64)
    small = np.asarray(Image.open(corpus_run["output"] / corpus_run["entries"]["person/upright.jpg"]["output"]),
                       dtype=np.float64)
    assert np.abs(crop - small).mean() < 12  # the same face, no aliasing from the 10x downscale


def test_nothing_usable_exits_one_with_every_file_reported(tmp_path, capsys):
    source = tmp_path / "in"
    source.mkdir()
    (source / "empty.png").write_bytes(b"")
    (source / "text.png").write_text("x")
    (source / "bomb.png").write_bytes(_png_bomb(30000))
    from id2face.cli import main

    assert main(["prepare", "-i", str(source), "-o", str(tmp_path / "out"), "--quiet"]) == 1
    assert "no usable face" in capsys.readouterr().err
    statuses = {e["source"]: e["status"] for e in
                map(json.loads, (tmp_path / "out/manifest.jsonl").read_text().splitlines())}
    assert statuses == {"empty.png": "empty_file", "text.png": "not_an_image", "bomb.png": "too_large"}


def test_read_image_converts_every_mode_to_rgb_uint8():
    from id2face.data.imageio import read_image

    face = _face(64)
    cases = {"L": face.convert("L"), "LA": face.convert("LA"), "P": face.convert("P"), "CMYK": face.convert("CMYK"),
             "I;16": Image.fromarray((np.asarray(face.convert("L"), np.uint16) * 257)), "I": face.convert("I"),
             "F": Image.fromarray(np.asarray(face.convert("L"), np.float32) / 255.0), "1": face.convert("1"),
             "RGBA": face.convert("RGBA"), "YCbCr": face.convert("YCbCr")}
    reference = np.asarray(face.convert("L"), np.float64)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for mode, image in cases.items():
            path = Path(folder) / f"{mode.replace(';', '_')}.tif"
            image.save(path)
            loaded = read_image(path)
            assert loaded.pixels.dtype == np.uint8 and loaded.pixels.shape == (64, 64, 3), mode
            if mode != "1":  # every other mode keeps the brightness pattern of the face
                gray = loaded.pixels.astype(np.float64).mean(-1)
                assert np.corrcoef(gray.ravel(), reference.ravel())[0, 1] > 0.95, mode


@pytest.mark.parametrize("command", [
    lambda blocker: ["table", str(blocker.parent / "run"), "-o", str(blocker / "t.md")],
    lambda blocker: ["train", "tiny", f"run.root={blocker}", "trainer.max_steps=1"],
], ids=["table", "train"])
def test_an_output_path_the_file_system_refuses_is_one_line(tmp_path, capsys, command):
    """A file where an output folder goes: the file system's refusal, in one line, exit 2."""
    from id2face.cli import main
    from id2face.metrics.table import save_metrics

    save_metrics(tmp_path / "run", {"fid": 1.0}, {})
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(command(blocker)) == 2
    err = capsys.readouterr().err.strip()  # (Lightning's INFO lines may come first)
    last = err.splitlines()[-1]  # (main returned 2: nothing escaped it)
    assert last.startswith("id2face ") and ": error: " in last and str(blocker) in last
    assert blocker.read_text() == "not a folder"


def test_an_eval_run_dir_the_file_system_refuses_fails_before_the_evaluation(tmp_path, capsys, monkeypatch):
    from id2face.cli import main
    from id2face.commands import eval as eval_command

    monkeypatch.setattr(eval_command, "evaluate", lambda *a, **k: pytest.fail("evaluated before the run dir was made"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    checkpoint = Path(__file__).resolve().parents[1] / "checkpoints" / "demo-tiny.pt"
    assert main(["eval", "--checkpoint", str(checkpoint), "--run-dir", str(blocker / "run"), "--device", "cpu"]) == 2
    assert str(blocker) in capsys.readouterr().err.strip().splitlines()[-1]
