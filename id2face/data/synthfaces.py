"""SynthFaces: procedural faces with known identity and non-identity factors.

Each identity is a fixed vector of geometry and colour factors (``IDENTITY_FACTORS``); each sample
of an identity draws the non-identity factors (``ATTRIBUTE_FACTORS``: head pose, expression,
lighting, hair, background, framing). Rendering is a ray-cast textured ellipsoid head: facial
features live in the head's surface coordinates (u, v), so yaw and pitch shift and foreshorten them
and roll rotates the whole face, exactly as the 5 landmarks and the inner-face mask do. Edges are
anti-aliased with signed distances measured in pixels (one-pixel soft edges), so any size from 32
to 256 px renders from the same description.

Identity is mostly geometry (face outline, jaw, chin, eye layout and size, nose, mouth, lips,
brows); skin tone and iris colour are two factors of fourteen, and per-sample light intensity and
colour temperature blur them, so colour statistics do not identify a face. Hair, background and
framing vary per sample, so pixel matching does not either (see
``benchmarks/synthfaces_identifiability.py``: a small CNN retrieves held-out identities at ~50-90x
chance, pixels and colour histograms at ~1-3x).

Everything is deterministic in (dataset seed, identity index, sample index); nothing is cached.
Factor vectors are normalised (identity factors in [0, 1]; attribute factors in [0, 1] or
[-1, 1], see ``SIGNED_ATTRIBUTES``), so ``render(id_factors, attr_factors, size)`` is a pure
function that can recompose any identity with any attributes: the ground truth for factor-level
identity and attribute metrics. (``background_clutter`` seeds the out-of-focus background blobs.)
"""
from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
import torch

from ..registry import DATASETS

MIN_SIZE, MAX_SIZE = 32, 256

IDENTITY_FACTORS = (
    "face_width",      # face outline half-width (relative to the head)
    "jaw_shape",       # lower-face superellipse exponent: pointed chin .. square jaw
    "chin_length",     # how far the chin reaches below the eye line
    "eye_spacing",     # distance between the eye centres
    "eye_size",        # eye width (height follows with the eye-openness expression)
    "eye_height",      # vertical position of the eye line on the face
    "nose_length",     # eye line to nose tip (the mouth sits below the tip)
    "nose_width",
    "mouth_width",
    "lip_thickness",
    "brow_thickness",
    "brow_arch",       # flat .. strongly arched brows
    "skin_tone",       # position on a light .. dark skin ramp
    "eye_colour",      # position on a brown .. hazel .. green .. blue iris ramp
)
ATTRIBUTE_FACTORS = (
    "yaw", "pitch", "roll",                       # head pose, [-1, 1] -> +-35, +-20, +-20 degrees
    "smile", "mouth_open", "eye_open", "brow_raise", "gaze_x",   # expression and gaze
    "light_azimuth", "light_elevation", "light_intensity", "light_warmth",
    "hair_colour", "hair_length", "hair_volume", "hairline", "hair_part",
    "background_hue_a", "background_hue_b", "background_value", "background_angle", "background_clutter",
    "clothing_hue",
    "scale", "shift_x", "shift_y",                # framing of the head in the crop
)
SIGNED_ATTRIBUTES = frozenset({"yaw", "pitch", "roll", "smile", "brow_raise", "gaze_x", "light_azimuth",
                               "light_warmth", "hair_part", "scale", "shift_x", "shift_y"})
POSE_DEGREES = {"yaw": 35.0, "pitch": 20.0, "roll": 20.0}

_ID_TAG, _ATTR_TAG = 0x1D, 0xA7  # keep identity and sample random streams apart

# light .. dark skin albedo anchors (linear interpolation along the ramp)
_SKIN = np.array([[0.97, 0.82, 0.72], [0.90, 0.70, 0.56], [0.78, 0.57, 0.42],
                  [0.62, 0.43, 0.29], [0.47, 0.31, 0.20]], np.float32)
_IRIS = np.array([[0.22, 0.12, 0.06], [0.42, 0.28, 0.12], [0.35, 0.42, 0.22],
                  [0.28, 0.45, 0.62], [0.45, 0.55, 0.65]], np.float32)
_HAIR = np.array([[0.06, 0.05, 0.05], [0.22, 0.13, 0.07], [0.42, 0.25, 0.12], [0.60, 0.25, 0.10],
                  [0.80, 0.64, 0.36], [0.72, 0.70, 0.68]], np.float32)


def _ramp(anchors: np.ndarray, t: float) -> np.ndarray:
    x = float(np.clip(t, 0.0, 1.0)) * (len(anchors) - 1)
    i = min(int(x), len(anchors) - 2)
    return anchors[i] + (x - i) * (anchors[i + 1] - anchors[i])


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * float(t)


def identity_factors(identity: int, seed: int = 0) -> np.ndarray:
    """The normalised identity factor vector (len(IDENTITY_FACTORS),) in [0, 1] of one identity."""
    if identity < 0:
        raise ValueError(f"identity index must be >= 0, got {identity}")
    rng = np.random.default_rng([_ID_TAG, int(seed), int(identity)])
    return rng.random(len(IDENTITY_FACTORS)).astype(np.float32)


def attribute_factors(identity: int, sample: int, seed: int = 0) -> np.ndarray:
    """The normalised attribute vector of one sample: [-1, 1] for SIGNED_ATTRIBUTES, else [0, 1]."""
    rng = np.random.default_rng([_ATTR_TAG, int(seed), int(identity), int(sample)])
    values = rng.random(len(ATTRIBUTE_FACTORS))
    signed = np.array([name in SIGNED_ATTRIBUTES for name in ATTRIBUTE_FACTORS])
    return np.where(signed, 2.0 * values - 1.0, values).astype(np.float32)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head-to-camera rotation. +yaw turns the face towards image-right, +pitch looks up, +roll
    tilts the head clockwise as seen. Camera frame: x right, y down, z towards the viewer."""
    cy, sy, cp, sp, cr, sr = (math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch),
                              math.cos(roll), math.sin(roll))
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    r_roll = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return r_roll @ r_pitch @ r_yaw


class _Canvas:
    """Pixel grid in normalised coordinates (x, y in [-1, 1], y down) plus soft-edge helpers."""

    def __init__(self, size: int):
        self.size = size
        self.pixel = 2.0 / size  # one pixel in normalised units
        grid = (np.arange(size, dtype=np.float32) + 0.5) * self.pixel - 1.0
        self.y, self.x = np.meshgrid(grid, grid, indexing="ij")

    def gradient_norm(self, field: np.ndarray) -> np.ndarray:
        """|grad field| per pixel."""
        gy, gx = np.gradient(field)
        return np.sqrt(gx * gx + gy * gy)


def _coverage(distance_px: np.ndarray) -> np.ndarray:
    """Signed distance in pixels (negative inside) -> anti-aliased coverage in [0, 1]."""
    return np.clip(0.5 - distance_px, 0.0, 1.0)


def _blend(image: np.ndarray, alpha: np.ndarray, colour) -> None:
    image += alpha[..., None] * (np.asarray(colour, np.float32) - image)


def _ellipse_distance(du: np.ndarray, dv: np.ndarray, ru, rv) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse (first-order, accurate near the edge)."""
    k = np.sqrt((du / ru) ** 2 + (dv / rv) ** 2) + 1e-6
    grad = np.sqrt((du / ru ** 2) ** 2 + (dv / rv ** 2) ** 2) / k + 1e-6
    return (k - 1.0) / grad


class _Ellipsoid:
    """Orthographic ray cast of a rotated ellipsoid: surface coordinates, normals, silhouette."""

    def __init__(self, canvas: _Canvas, rotation: np.ndarray, centre, axes):
        # Python floats keep the per-pixel arrays float32 (numpy scalars would promote to float64)
        axes = [float(x) for x in axes]
        r = np.asarray(rotation, np.float64).tolist()
        dx, dy = canvas.x - float(centre[0]), canvas.y - float(centre[1])
        # canonical ray: q(t) = q0 + t d with q0 = R^T (dx, dy, 0), d = R^T e_z
        q0 = [(r[0][i] * dx + r[1][i] * dy) * (1.0 / axes[i]) for i in range(3)]
        d = [r[2][i] / axes[i] for i in range(3)]
        a = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
        b = 2.0 * (q0[0] * d[0] + q0[1] * d[1] + q0[2] * d[2])
        c = q0[0] ** 2 + q0[1] ** 2 + q0[2] ** 2 - 1.0
        disc = b * b - 4.0 * a * c
        # projected-ellipse radius (1 on the silhouette), continued smoothly outside it
        radius = np.sqrt(np.maximum(1.0 - disc / (4.0 * a), 0.0))
        grad = canvas.gradient_norm(radius) / canvas.pixel + 1e-6
        self.coverage = _coverage((radius - 1.0) / (grad * canvas.pixel))
        t = (-b + np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)  # the intersection nearest the viewer
        self.u, self.v, self.w = (q0[i] + t * d[i] for i in range(3))  # unit-sphere coordinates
        normal = [self.u / axes[0], self.v / axes[1], self.w / axes[2]]
        norm = np.sqrt(sum(n * n for n in normal)) + 1e-9
        self.normal = [sum(r[i][j] * normal[j] for j in range(3)) / norm for i in range(3)]


def _lambert(normal, light: np.ndarray, ambient: float) -> np.ndarray:
    dot = normal[0] * light[0] + normal[1] * light[1] + normal[2] * light[2]
    return ambient + (1.0 - ambient) * np.clip(dot, 0.0, 1.0)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


class _Face:
    """Identity geometry in head-surface coordinates (u right, v down; the eye line near v = 0)."""

    def __init__(self, f: dict, a: dict):
        self.face_w = _lerp(0.62, 0.90, f["face_width"])
        self.jaw_exp = _lerp(1.5, 3.6, f["jaw_shape"])
        self.eye_v = _lerp(-0.18, 0.0, f["eye_height"])
        self.chin_v = self.eye_v + _lerp(0.74, 1.0, f["chin_length"])
        self.eye_x = _lerp(0.25, 0.42, f["eye_spacing"])
        self.eye_w = _lerp(0.11, 0.19, f["eye_size"])
        self.nose_len = _lerp(0.22, 0.42, f["nose_length"])
        self.nose_w = _lerp(0.06, 0.15, f["nose_width"])
        self.mouth_w = _lerp(0.15, 0.32, f["mouth_width"])
        self.lip = _lerp(0.018, 0.06, f["lip_thickness"])
        self.brow_th = _lerp(0.018, 0.07, f["brow_thickness"])
        self.brow_arch = _lerp(0.0, 0.09, f["brow_arch"])
        self.skin = _ramp(_SKIN, f["skin_tone"])
        self.iris = _ramp(_IRIS, f["eye_colour"])
        # expression
        self.smile = a["smile"]
        self.mouth_open = max(0.0, _lerp(-0.35, 1.0, a["mouth_open"]))  # a third of samples closed
        self.eye_open = _lerp(0.45, 1.0, a["eye_open"]) * (1.0 - 0.15 * max(self.smile, 0.0))
        self.brow_raise = a["brow_raise"]
        self.gaze = a["gaze_x"]
        self.nose_tip_v = self.eye_v + self.nose_len
        self.mouth_v = self.nose_tip_v + 0.13 + 0.2 * (self.chin_v - self.nose_tip_v - 0.4)

    def outline_distance(self, u, v):
        """Signed distance (surface units) to the face outline: an ellipse above the eye line, a
        superellipse (jaw) below it."""
        top = 0.95
        upper = _ellipse_distance(u, v, self.face_w, top)
        n = self.jaw_exp
        k = (np.abs(u / self.face_w) ** n + np.abs(v / self.chin_v) ** n) ** (1.0 / n)
        lower = (k - 1.0) * 0.5 * (self.face_w + self.chin_v)
        return np.where(v < 0, upper, lower)

    def mouth_curves(self, x):
        """Upper-lip top, upper inner, lower inner and lower-lip bottom v at x = u / mouth_w."""
        centre = self.mouth_v - self.smile * 0.055 * x * x
        bulge = np.clip(1.0 - x * x, 0.0, 1.0)
        upper_in = centre - self.mouth_open * 0.035 * bulge
        lower_in = centre + self.mouth_open * 0.10 * bulge
        upper_out = upper_in - self.lip * (0.45 + 0.55 * np.sqrt(bulge)) + 0.25 * self.lip * np.exp(-(x / 0.18) ** 2)
        lower_out = lower_in + self.lip * 1.35 * np.sqrt(bulge)
        return upper_out, upper_in, lower_in, lower_out

    def inner_region_distance(self, u, v):
        """Signed distance to the identity-bearing inner face (brows, eyes, nose, mouth)."""
        top = self.eye_v - 0.16 - self.brow_arch - self.brow_th - 0.05  # above the highest brow
        _, _, _, lower_out = self.mouth_curves(np.float32(0.0))
        bottom = float(lower_out) + 0.06
        half_h = 0.5 * (bottom - top)
        half_w_top = self.eye_x + self.eye_w * 1.35 + 0.05
        half_w_bottom = self.mouth_w + 0.08
        t = np.clip((v - top) / (bottom - top), 0.0, 1.0)
        half_w = half_w_top + (half_w_bottom - half_w_top) * t * t
        k = (np.abs(u / half_w) ** 4 + np.abs((v - top - half_h) / half_h) ** 4) ** 0.25
        return (k - 1.0) * half_h

    def landmarks_uv(self):
        corner_v = self.mouth_v - self.smile * 0.055  # mouth_curves' centre line at x = +-1
        return np.array([[-self.eye_x, self.eye_v], [self.eye_x, self.eye_v], [0.0, self.nose_tip_v],
                         [-self.mouth_w, corner_v], [self.mouth_w, corner_v]], np.float64)


def render(id_factors, attr_factors, size: int) -> dict:
    """Render one face from normalised factor vectors.

    Returns numpy arrays: ``image`` (S, S, 3) float32 in [0, 1], ``mask`` (S, S) float32 in {0, 1}
    (identity-bearing inner face, follows pose), ``landmarks`` (5, 2) float32 pixel (x, y) with the
    top-left pixel covering [0, 1) x [0, 1) (left eye, right eye, nose tip, left and right mouth
    corner, as seen in the image).
    """
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"SynthFaces size must be in {MIN_SIZE}..{MAX_SIZE}, got {size}")
    size = int(size)
    f = dict(zip(IDENTITY_FACTORS, np.asarray(id_factors, np.float64).tolist()))
    a = dict(zip(ATTRIBUTE_FACTORS, np.asarray(attr_factors, np.float64).tolist()))
    canvas = _Canvas(size)
    face = _Face(f, a)

    yaw, pitch, roll = (math.radians(a[k] * POSE_DEGREES[k]) for k in ("yaw", "pitch", "roll"))
    rotation = _rotation(yaw, pitch, roll)
    scale = 1.0 + 0.07 * a["scale"]
    centre = (0.07 * a["shift_x"], 0.06 + 0.05 * a["shift_y"])
    head_axes = np.array([0.90, 1.04, 0.92]) * scale

    # light (camera frame, y down), colour temperature and strength
    azimuth, elevation = math.radians(50.0 * a["light_azimuth"]), math.radians(_lerp(-5.0, 50.0, a["light_elevation"]))
    light = [math.sin(azimuth) * math.cos(elevation), -math.sin(elevation), math.cos(azimuth) * math.cos(elevation)]
    warmth = 0.12 * a["light_warmth"]
    light_rgb = _lerp(0.7, 1.3, a["light_intensity"]) * np.array([1 + warmth, 1.0, 1 - warmth], np.float32)

    # background: a two-colour linear gradient in a random direction
    colour_a = _hsv(a["background_hue_a"], 0.45, _lerp(0.2, 0.95, a["background_value"]))
    colour_b = _hsv(a["background_hue_b"], 0.35, _lerp(0.95, 0.3, a["background_value"]))
    angle = 2 * math.pi * a["background_angle"]
    ramp = np.clip(0.5 + 0.5 * (math.cos(angle) * canvas.x + math.sin(angle) * canvas.y), 0, 1)
    image = colour_a + ramp[..., None] * (colour_b - colour_a)
    # out-of-focus clutter: soft blobs drawn from the clutter factor (render stays a pure function)
    clutter = np.random.default_rng(int(a["background_clutter"] * 2 ** 24))
    for _ in range(3):
        cx, cy = clutter.uniform(-1.0, 1.0, 2)
        radius_x, radius_y = clutter.uniform(0.2, 0.6, 2)
        colour = _hsv(clutter.random(), clutter.uniform(0.2, 0.6), clutter.uniform(0.25, 0.95))
        blob = _ellipse_distance(canvas.x - cx, canvas.y - cy, radius_x, radius_y)
        _blend(image, clutter.uniform(0.35, 0.75) * np.clip(0.5 - blob / 0.15, 0.0, 1.0), colour)

    # shoulders and neck (behind the head)
    roll_c, roll_s = math.cos(roll), math.sin(roll)
    lx = roll_c * (canvas.x - centre[0]) + roll_s * (canvas.y - centre[1])
    ly = -roll_s * (canvas.x - centre[0]) + roll_c * (canvas.y - centre[1])
    shoulder_d = _ellipse_distance(canvas.x - centre[0] * 0.5, canvas.y - 1.55 * scale, 1.3, 0.6)
    cloth_shade = 0.75 + 0.35 * np.clip(0.5 - 0.5 * canvas.x * light[0], 0, 1)
    cloth = _hsv(a["clothing_hue"], 0.5, 0.55) * cloth_shade[..., None]
    image += _coverage(shoulder_d / canvas.pixel)[..., None] * (cloth * light_rgb - image)
    neck_half = 0.36 * scale * (face.face_w / 0.76)
    neck_d = np.maximum(np.abs(lx - 0.2 * math.sin(yaw)) - neck_half, 0.3 * scale - ly)
    neck_shade = (0.55 + 0.2 * np.clip(lx * light[0] / neck_half, -1, 1))[..., None]
    image += _coverage(neck_d / canvas.pixel)[..., None] * (face.skin * light_rgb * neck_shade - image)

    # hair volume behind the head (an ellipsoid cut at the hair length)
    hair_colour = _ramp(_HAIR, a["hair_colour"])
    length = a["hair_length"]
    volume = _lerp(1.02, 1.22, a["hair_volume"])
    back_axes = head_axes * np.array([volume * 0.98, (volume + 0.35 * length) * 0.95, 0.9])
    back_centre = (centre[0] - roll_s * 0.25 * length * 0.7, centre[1] + (0.25 * length - 0.08) * 0.7 * roll_c)
    back = _Ellipsoid(canvas, rotation, back_centre, back_axes)
    cut = (back.v - _lerp(-0.05, 0.9, length)) / (canvas.gradient_norm(back.v) + 1e-6)
    # hair strands, faded where a pixel spans more than a stripe (no aliasing at 32 px)
    strands = 1.0 + 0.06 * np.sin(70.0 * back.u) * np.exp(-(70.0 * canvas.gradient_norm(back.u)) ** 2)
    back_alpha = back.coverage * _coverage(cut)
    back_col = hair_colour * light_rgb * (0.55 * _lambert(back.normal, light, 0.45) * strands)[..., None]
    image += back_alpha[..., None] * (back_col - image)

    # the head shell: features live in its surface coordinates (u, v)
    head = _Ellipsoid(canvas, rotation, centre, head_axes)
    u, v = head.u, head.v
    uv_pixel = np.clip(np.sqrt(0.5 * (canvas.gradient_norm(u) ** 2 + canvas.gradient_norm(v) ** 2)), 1e-4, 0.5)

    def cover(distance_uv):
        return _coverage(distance_uv / uv_pixel)

    albedo = np.empty_like(image)
    albedo[:] = face.skin
    outline = face.outline_distance(u, v)
    ear_d = _ellipse_distance(np.abs(u) - (face.face_w + 0.035), v - (face.eye_v + 0.14), 0.07, 0.17)
    skin_alpha = np.maximum(cover(outline), cover(ear_d))
    _blend(albedo, cover(ear_d) * (1 - cover(outline)) * 0.35, face.skin * 0.6)

    # eye sockets, eyes, brows
    for side in (-1.0, 1.0):
        du, dv = u - side * face.eye_x, v - face.eye_v
        _blend(albedo, 0.25 * cover(_ellipse_distance(du, dv - 0.01, face.eye_w * 1.45, face.eye_w * 0.85)),
               face.skin * 0.72)
        eye_h = face.eye_w * 0.52 * face.eye_open
        eye_d = _ellipse_distance(du, dv, face.eye_w, np.where(dv < 0, eye_h * 1.15, eye_h * 0.8))
        eye_alpha = cover(eye_d)
        _blend(albedo, eye_alpha, (0.93, 0.91, 0.88))
        iris_r = 0.45 * face.eye_w
        iris_d = np.sqrt((du - 0.3 * face.eye_w * face.gaze) ** 2 + dv ** 2)
        _blend(albedo, eye_alpha * cover(iris_d - iris_r), face.iris)
        _blend(albedo, eye_alpha * cover(iris_d - 0.42 * iris_r), (0.03, 0.03, 0.03))
        lid = cover(np.abs(eye_d) - 0.014) * np.clip(0.5 - dv / (0.5 * eye_h + 1e-3), 0, 1)
        _blend(albedo, lid, (0.12, 0.08, 0.07))
        _blend(albedo, 0.4 * cover(np.abs(eye_d + 0.004) - 0.008) * (dv > 0), face.skin * 0.55)
        # brow: a tapered arc above the eye, raised by the expression
        brow_len = face.eye_w * 1.3
        t = side * (u - side * (face.eye_x + 0.02)) / brow_len
        curve = face.eye_v - 0.13 - 0.03 * face.brow_raise - face.brow_arch * (1 - t * t) + 0.015 * t
        thickness = face.brow_th * (1.0 - 0.45 * np.clip(t, 0, 1))
        brow_d = np.maximum(np.abs(v - curve) - 0.5 * thickness, (np.abs(t) - 1.0) * brow_len)
        _blend(albedo, cover(brow_d), hair_colour * 0.55 + 0.04)

    # nose: a height bump (shaded below) plus nostrils and the shadow under the tip
    v0, v1 = face.eye_v + 0.05, face.nose_tip_v
    along = np.clip((v - v0) / (v1 - v0), 0.0, 1.0)
    width = face.nose_w * (0.35 + 0.65 * along * along)
    rise = np.clip((v - v0) / 0.08, 0.0, 1.0) * np.clip(1.0 - (v - v1) / 0.05, 0.0, 1.0)
    nose_height = 0.09 * np.exp(-(u / width) ** 2) * rise * (0.5 + 0.5 * along)
    for side in (-1.0, 1.0):
        _blend(albedo, 0.85 * cover(_ellipse_distance(u - side * 0.5 * face.nose_w, v - v1 - 0.012,
                                                      0.32 * face.nose_w, 0.016)), face.skin * 0.35)
    _blend(albedo, 0.3 * cover(_ellipse_distance(u, v - v1 - 0.035, face.nose_w * 1.1, 0.02)), face.skin * 0.7)

    # mouth
    x = u / face.mouth_w
    upper_out, upper_in, lower_in, lower_out = face.mouth_curves(x)
    side_d = (np.abs(x) - 1.0) * face.mouth_w
    lips_colour = face.skin * np.array([0.86, 0.55, 0.55], np.float32) + np.array([0.08, 0.0, 0.01], np.float32)
    _blend(albedo, cover(np.maximum(np.maximum(upper_out - v, v - lower_out), side_d)), lips_colour)
    gap_centre, gap_half = 0.5 * (upper_in + lower_in), np.maximum(0.5 * (lower_in - upper_in), 0.007)
    mouth_alpha = cover(np.maximum(np.abs(v - gap_centre) - gap_half, (np.abs(x) - 1.02) * face.mouth_w))
    _blend(albedo, mouth_alpha, (0.25, 0.06, 0.06))
    teeth = cover(np.maximum(v - upper_in - 0.022 * min(face.mouth_open * 3, 1.0), (np.abs(x) - 0.75) * face.mouth_w))
    _blend(albedo, mouth_alpha * teeth * min(face.mouth_open * 4, 1.0), (0.92, 0.9, 0.84))

    # front hair: above the hairline, and over the temples beyond the face outline
    hairline = (_lerp(-0.78, -0.46, a["hairline"]) + 0.12 * np.clip(1 - (u / 0.9) ** 2, 0, 1)
                - 0.12 * a["hair_part"] * u)
    side_bottom = _lerp(-0.05, 0.6, length)
    hair_alpha = np.maximum(cover(v - hairline), (1 - cover(outline)) * cover(v - side_bottom))
    if length < 0.35:  # short hair leaves the ears uncovered
        hair_alpha *= 1.0 - cover(ear_d)
    albedo_hair = hair_colour * (1.0 + 0.10 * np.sin(60.0 * u + 9.0 * v) * np.exp(-(60.0 * uv_pixel) ** 2))[..., None]
    albedo += hair_alpha[..., None] * (albedo_hair - albedo)

    # shading: Lambert on the shell with the nose bump (screen-space bump mapping) + a soft highlight
    gy, gx = np.gradient(nose_height * head.coverage)
    bump = 0.44 * size / 2.0  # bump strength 0.44, per-pixel gradient -> per normalised unit
    nx, ny, nz = head.normal[0] - bump * gx, head.normal[1] - bump * gy, head.normal[2]
    norm = np.sqrt(nx * nx + ny * ny + nz * nz) + 1e-9
    normal = (nx / norm, ny / norm, nz / norm)
    shade = _lambert(normal, light, 0.5)
    half = np.array([light[0], light[1], light[2] + 1.0])
    half = (half / np.linalg.norm(half)).tolist()  # Blinn half vector (viewer along +z)
    highlight = 0.12 * np.clip(normal[0] * half[0] + normal[1] * half[1] + normal[2] * half[2], 0, 1) ** 24
    head_rgb = albedo * light_rgb * shade[..., None] + (highlight * (1 - hair_alpha))[..., None]
    head_alpha = head.coverage * np.maximum(skin_alpha, hair_alpha) * (head.w > -0.2)
    image += head_alpha[..., None] * (head_rgb - image)

    mask = (head.coverage * cover(face.inner_region_distance(u, v)) > 0.5).astype(np.float32)

    # landmarks: surface points of the (u, v) feature positions, rotated and projected
    uv = face.landmarks_uv()
    depth = np.sqrt(np.clip(1.0 - uv[:, 0] ** 2 - uv[:, 1] ** 2, 0.0, None))
    points = np.stack([uv[:, 0], uv[:, 1], depth], 1) * head_axes
    projected = points @ rotation.T
    landmarks = np.stack([(projected[:, 0] + centre[0] + 1.0) / 2.0 * size,
                          (projected[:, 1] + centre[1] + 1.0) / 2.0 * size], 1)
    return {"image": np.clip(image, 0.0, 1.0).astype(np.float32), "mask": mask,
            "landmarks": landmarks.astype(np.float32)}


def render_sample(identity: int, sample: int, size: int, seed: int = 0) -> dict:
    """Dataset item (torch tensors) for ``sample`` of ``identity``; see the package docstring."""
    id_f = identity_factors(identity, seed)
    attr_f = attribute_factors(identity, sample, seed)
    out = render(id_f, attr_f, size)
    return {
        # numpy, not torch ops: small torch ops pay thread-pool overhead in every DataLoader worker
        "image": torch.from_numpy(np.ascontiguousarray((out["image"] * 2.0 - 1.0).transpose(2, 0, 1))),
        "mask": torch.from_numpy(out["mask"])[None],
        "landmarks": torch.from_numpy(out["landmarks"]),
        "identity": int(identity),
        "id_factors": torch.from_numpy(id_f),
        "attr_factors": torch.from_numpy(attr_f),
    }


@DATASETS.register("synthfaces")
class SynthFaces(torch.utils.data.Dataset):
    """``num_identities`` identities x ``samples_per_identity`` rendered views, item-major by identity.

    Item ``i`` is sample ``i % samples_per_identity`` of identity
    ``identity_offset + i // samples_per_identity``; identity indices are global, so datasets with
    disjoint ``[identity_offset, identity_offset + num_identities)`` ranges share no identity and
    equal (seed, identity) pairs render the same person in any dataset.
    """

    def __init__(self, image_size: int = 64, num_identities: int = 200, samples_per_identity: int = 8,
                 seed: int = 0, identity_offset: int = 0):
        if not MIN_SIZE <= int(image_size) <= MAX_SIZE:
            raise ValueError(f"SynthFaces image_size must be in {MIN_SIZE}..{MAX_SIZE}, got {image_size}")
        if num_identities < 1 or samples_per_identity < 1 or identity_offset < 0:
            raise ValueError("SynthFaces needs num_identities >= 1, samples_per_identity >= 1, identity_offset >= 0")
        self.image_size = int(image_size)
        self.num_identities = int(num_identities)
        self.samples_per_identity = int(samples_per_identity)
        self.seed = int(seed)
        self.identity_offset = int(identity_offset)
        self.identity_labels = np.repeat(np.arange(self.num_identities) + self.identity_offset,
                                         self.samples_per_identity).astype(np.int64)

    def __len__(self) -> int:
        return self.num_identities * self.samples_per_identity

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"SynthFaces index {index} out of range for {len(self)} items")
        index %= len(self)
        identity, sample = divmod(index, self.samples_per_identity)
        return render_sample(identity + self.identity_offset, sample, self.image_size, self.seed)


def grid_tensor(identities: int = 8, samples: int = 8, size: int = 64, seed: int = 0,
                identity_offset: int = 0) -> torch.Tensor:
    """(3, H, W) image grid in [0, 1]: rows = identities, columns = samples."""
    from torchvision.utils import make_grid

    images = [render_sample(identity_offset + i, s, size, seed)["image"]
              for i in range(identities) for s in range(samples)]
    return make_grid(torch.stack(images).add(1.0).div(2.0), nrow=samples, padding=2, pad_value=1.0)


def save_grid(path, identities: int = 8, samples: int = 8, size: int = 64, seed: int = 0,
              identity_offset: int = 0) -> Path:
    """Write the grid of ``grid_tensor`` as a PNG; same arguments give the same bytes."""
    from torchvision.utils import save_image

    path = Path(path)
    save_image(grid_tensor(identities, samples, size, seed, identity_offset), path, format="PNG")
    return path
