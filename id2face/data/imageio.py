"""Robust photo reading for `prepare` and `anonymize`: any common file -> RGB uint8, or one reason.

``read_image(path)`` returns the pixels as the photo is meant to be seen (EXIF orientation
applied) in RGB uint8, whatever the stored mode (L, LA, P, PA, CMYK, YCbCr, I;16, I, F, RGBA...),
or raises ``ImageReadError`` whose ``status`` is a manifest status (``empty_file``,
``not_an_image``, ``truncated``, ``too_large``, ``unreadable``) and whose message is one line.
The file is only ever opened for reading.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError, describe, one_line

# Extensions treated as photos when scanning folders (lower case). A file with one of these
# names that is not an image is reported (not_an_image), never silently skipped.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm"}
)
# Refuse to decode above this many pixels (a 10000 x 10000 photo): the header is read first, so
# a decompression bomb costs nothing. Big-but-allowed photos are downscaled for detection only.
DEFAULT_MAX_PIXELS = 100_000_000
# Alpha is composited on white: the usual look of cut-out portraits in viewers and documents.
ALPHA_BACKGROUND = (255, 255, 255)

# EXIF orientation -> what had to be done to show the photo upright.
_ORIENTATION_NAMES = {
    2: "mirrored", 3: "rotated 180", 4: "flipped", 5: "transposed",
    6: "rotated 90 clockwise", 7: "transversed", 8: "rotated 90 counter-clockwise",
}


class ImageReadError(UserError):
    """A photo that cannot be used; ``status`` is the manifest status, ``str()`` one line."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class LoadedImage:
    """Pixels ``(H, W, 3)`` uint8 RGB, upright; what was done to get them is in ``notes``."""

    pixels: np.ndarray
    stored_mode: str
    stored_size: tuple[int, int]  # (width, height) as stored, before EXIF orientation
    exif_orientation: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of ``pixels``."""
        return self.pixels.shape[1], self.pixels.shape[0]


def is_image_name(path: str | Path) -> bool:
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


_LIMIT_LOCK = threading.Lock()
_LIMIT_USERS = 0
_LIMIT_SAVED: int | None = None
_LIMIT_RAISED = False


@contextlib.contextmanager
def _pillow_limit(max_pixels: int):
    """Pillow's own bomb limit (``Image.MAX_IMAGE_PIXELS``; it refuses above twice that, 179 Mpx
    by default) raised to ``max_pixels`` while the block runs, so that our cap, checked on the
    header before decoding, is what decides. Pillow checks at open and again while loading (GIF
    frames, TIFF tiles), hence a block around both. Concurrent readers (anonymize's threads)
    share one raise, to the largest cap asked, undone when the last one leaves (so the default cap
    leaves Pillow's limit as it is)."""
    global _LIMIT_USERS, _LIMIT_SAVED, _LIMIT_RAISED
    with _LIMIT_LOCK:
        if _LIMIT_USERS == 0:
            _LIMIT_SAVED, _LIMIT_RAISED = Image.MAX_IMAGE_PIXELS, False
        _LIMIT_USERS += 1
        if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < max_pixels:
            Image.MAX_IMAGE_PIXELS, _LIMIT_RAISED = max_pixels, True
    try:
        yield
    finally:
        with _LIMIT_LOCK:
            _LIMIT_USERS -= 1
            if _LIMIT_USERS == 0 and _LIMIT_RAISED:
                Image.MAX_IMAGE_PIXELS = _LIMIT_SAVED


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode ``path`` to upright RGB uint8. Raises ``ImageReadError`` (never anything else for
    a bad file; a missing file is ``unreadable``)."""
    path = Path(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageReadError("empty_file", "file is empty (0 bytes)")
    except OSError as err:
        raise ImageReadError("unreadable", f"cannot access file: {err.strerror or err}") from None
    with _pillow_limit(max_pixels):
        return _read_image(path, max_pixels)


def _read_image(path: Path, max_pixels: int) -> LoadedImage:
    with warnings.catch_warnings():
        # We enforce our own pixel cap below; PIL's warning would only repeat it. (Readers in
        # threads, as `anonymize`'s: at worst their races leave this one filter installed.)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            raise ImageReadError("not_an_image", f"not an image file ({_sniff(path)})") from None
        except Image.DecompressionBombError as err:
            raise ImageReadError("too_large", f"refused unread: {one_line(err)}") from None
        except Exception as err:  # noqa: BLE001 - any decoder complaint is a reason, not a crash
            raise ImageReadError("unreadable", f"cannot open image: {describe(err)}") from None

    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageReadError("unreadable", f"image header gives an empty size {width}x{height}")
        if width * height > max_pixels:
            raise ImageReadError(
                "too_large",
                f"{width}x{height} = {width * height / 1e6:.0f} Mpx exceeds the cap of "
                f"{max_pixels / 1e6:.0f} Mpx (--max-pixels)",
            )
        stored_mode, notes = image.mode, []
        if getattr(image, "n_frames", 1) > 1:
            notes.append(f"first of {image.n_frames} frames used")
        try:
            image.load()
        except MemoryError:
            raise ImageReadError("too_large", f"out of memory decoding {width}x{height}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            text = describe(err)
            status = "truncated" if "truncat" in text.lower() or isinstance(err, EOFError) else "unreadable"
            raise ImageReadError(status, f"cannot decode image data: {text}") from None

        orientation = _exif_orientation(image, notes)
        if orientation not in (1, 0):
            try:
                image = ImageOps.exif_transpose(image)
                notes.append(f"EXIF orientation {orientation} applied ({_ORIENTATION_NAMES.get(orientation, '?')})")
            except Exception as err:  # noqa: BLE001 - a broken tag must not lose the photo
                notes.append(f"EXIF orientation {orientation} ignored: {describe(err)}")
                orientation = 1
        try:
            pixels = _to_rgb_uint8(image, notes)
        except MemoryError:
            raise ImageReadError("too_large", f"out of memory converting {width}x{height}") from None
        except (OSError, ValueError) as err:
            raise ImageReadError("unreadable", f"cannot convert mode {stored_mode} to RGB: {describe(err)}") from None
    return LoadedImage(np.ascontiguousarray(pixels), stored_mode, (width, height), orientation or 1, notes)


def _exif_orientation(image: Image.Image, notes: list[str]) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception as err:  # noqa: BLE001 - corrupt EXIF blocks are common in the wild
        notes.append(f"EXIF unreadable, orientation ignored: {describe(err)}")
        return 1


def _to_rgb_uint8(image: Image.Image, notes: list[str]) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode in ("I", "F") or mode.startswith("I;16"):
        # PIL's own convert("RGB") clips 16-bit values at 255 (a white image): rescale instead.
        values = np.asarray(image).astype(np.float64)
        top = float(values.max()) if values.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and 255 < top <= 65535):
            values, what = values / 257.0, "16-bit"
        elif mode == "F" and top <= 1.0:
            values, what = values * 255.0, "float [0, 1]"
        elif top > 255:
            low = float(values.min())
            values, what = (values - low) * (255.0 / max(top - low, 1e-12)), f"{mode} min-max"
        else:
            what = mode
        notes.append(f"{what} grayscale scaled to 8-bit RGB")
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append(f"{mode} alpha composited on white")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode != "RGB":
        notes.append(f"{mode} converted to RGB")
    return np.asarray(image.convert("RGB"))


def _sniff(path: Path) -> str:
    """A short hint of what the file really is, for the not_an_image message."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError:
        return "unreadable header"
    if not head.strip():
        return "blank content"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"unknown binary format, starts with {head[:4].hex()}"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"text content: {first!r}"
