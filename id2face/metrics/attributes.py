"""Attribute preservation: does the anonymized face keep the source's pose and expression?

Estimators map images to a vector of named attributes; ``AttributePreservation`` compares the
estimates of original and anonymized faces. Two estimators:

- ``LandmarkAttributeEstimator`` (real faces): MTCNN's 5 points -> head pose and an expression
  proxy, by the closed-form geometry below. No training, no weights beyond MTCNN's (in the wheel).
- ``OracleAttributeEstimator`` (SynthFaces, ``oracle.py``): regressors trained on the renderer's
  ground-truth factors.

Pose from 5 points (``landmark_pose``). Image coordinates: x to the right, y down; landmarks in
the dataset order (left eye, right eye, nose, left mouth corner, right mouth corner, image-left/
right as seen). A rigid mean face in units of the inter-ocular distance (y up, z towards the
camera; frontal 2D layout from the ArcFace 5-point template, depths of a typical adult face):
eyes (+-0.5, 0, -0.5), nose tip (0, -0.57, 0), mouth corners (+-0.414, -1.155, -0.45).
Under orthographic projection:
  roll  = angle of the eye line (positive: right eye lower, i.e. clockwise as seen); removed
          first by rotating the points about the eye midpoint;
  yaw   = atan(dx / 0.475) with dx = horizontal offset of the nose from the midline between
          eye midpoint and mouth midpoint, in projected inter-ocular units (positive: the face
          turns towards image-right);
  pitch = from where the nose sits between the eye line and the mouth line (positive: chin up).
Yaw and pitch are exact for a pure rotation of the mean face and approximate when combined or on
real faces (whose proportions differ from the mean face): good for comparing a face with its
anonymization, not an absolute head-pose measurement. Angles in degrees.

Expression proxy (``landmark_expression``), both pose-normalised ratios:
  mouth_width  = mouth-corner distance / inter-ocular distance (a smile widens the mouth);
  mouth_height = (mouth midpoint - nose) / (mouth midpoint - eye midpoint) vertically after roll
                 removal (a smile lifts the corners towards the nose).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

# mean face, inter-ocular units: x right, y up, z towards the camera
MEAN_FACE_5PT = torch.tensor([
    [-0.5, 0.0, -0.5],      # left eye (image-left)
    [0.5, 0.0, -0.5],       # right eye
    [0.0, -0.57, 0.0],      # nose tip
    [-0.414, -1.155, -0.45],  # left mouth corner
    [0.414, -1.155, -0.45],   # right mouth corner
])
_EYE_DEPTH = 0.5
_NOSE_DROP = 0.57
_MOUTH_DROP = 1.155
_MOUTH_DEPTH = 0.45
_MIDLINE_DEPTH = (_EYE_DEPTH + _MOUTH_DEPTH) / 2

POSE_NAMES = ("yaw", "pitch", "roll")
EXPRESSION_NAMES = ("mouth_width", "mouth_height")


def _rotation(yaw: float, pitch: float, roll: float) -> Tensor:
    """Model-frame (y up) rotation for the conventions above: in-plane roll applied last."""
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    ry = torch.tensor([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    # chin up = the nose moves up = rotation about x with the sign below
    rx = torch.tensor([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
    # clockwise as seen in the image (y down) = counter-clockwise-negative in the y-up frame
    rz = torch.tensor([[math.cos(r), math.sin(r), 0], [-math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def project_mean_face(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0, scale: float = 40.0,
                      center: Sequence[float] = (64.0, 64.0)) -> Tensor:
    """(5, 2) pixel landmarks of the mean face rotated by (yaw, pitch, roll) degrees, orthographic.

    The forward model that ``landmark_pose`` inverts; it pins down the sign conventions.
    """
    points = MEAN_FACE_5PT @ _rotation(yaw, pitch, roll).T
    return torch.stack([center[0] + scale * points[:, 0], center[1] - scale * points[:, 1]], dim=-1)


def _derolled(landmarks: Tensor) -> tuple[Tensor, Tensor]:
    """(N, 5, 2) image points -> (roll degrees (N,), points rotated so the eye line is level, y up)."""
    pts = landmarks.double()
    eye_vector = pts[:, 1] - pts[:, 0]
    roll = torch.atan2(eye_vector[:, 1], eye_vector[:, 0])
    centred = pts - (pts[:, 0:1] + pts[:, 1:2]) / 2
    cos, sin = torch.cos(roll)[:, None], torch.sin(roll)[:, None]
    x = cos * centred[..., 0] + sin * centred[..., 1]
    y_down = -sin * centred[..., 0] + cos * centred[..., 1]
    return torch.rad2deg(roll), torch.stack([x, -y_down], dim=-1)


def landmark_pose(landmarks: Tensor) -> Tensor:
    """(N, 5, 2) pixel landmarks -> (N, 3) [yaw, pitch, roll] in degrees (see the module docstring)."""
    roll, pts = _derolled(landmarks)
    inter_ocular = (pts[:, 1, 0] - pts[:, 0, 0]).clamp_min(1e-9)
    eye_mid, nose, mouth_mid = (pts[:, 0] + pts[:, 1]) / 2, pts[:, 2], (pts[:, 3] + pts[:, 4]) / 2
    midline_x = (eye_mid[:, 0] + mouth_mid[:, 0]) / 2
    yaw = torch.atan((nose[:, 0] - midline_x) / inter_ocular / _MIDLINE_DEPTH)
    # v = where the nose sits between the eye line (0) and the mouth line (1); invert
    # v = (N + E tan(phi)) / (M + (E - Md) tan(phi)) for the tilt phi (positive = chin down)
    v = (eye_mid[:, 1] - nose[:, 1]) / (eye_mid[:, 1] - mouth_mid[:, 1]).clamp_min(1e-9)
    tan_down = (v * _MOUTH_DROP - _NOSE_DROP) / (_EYE_DEPTH - v * (_EYE_DEPTH - _MOUTH_DEPTH))
    pitch = -torch.atan(tan_down)
    return torch.stack([torch.rad2deg(yaw), torch.rad2deg(pitch), roll], dim=-1).to(landmarks.dtype)


def landmark_expression(landmarks: Tensor) -> Tensor:
    """(N, 5, 2) pixel landmarks -> (N, 2) [mouth_width, mouth_height] ratios (module docstring)."""
    _, pts = _derolled(landmarks)
    inter_ocular = (pts[:, 1, 0] - pts[:, 0, 0]).clamp_min(1e-9)
    mouth_width = (pts[:, 4] - pts[:, 3]).norm(dim=-1) / inter_ocular
    eye_y, nose_y, mouth_y = (pts[:, 0, 1] + pts[:, 1, 1]) / 2, pts[:, 2, 1], (pts[:, 3, 1] + pts[:, 4, 1]) / 2
    mouth_height = (nose_y - mouth_y) / (eye_y - mouth_y).clamp_min(1e-9)
    return torch.stack([mouth_width, mouth_height], dim=-1).to(landmarks.dtype)


class MTCNNLandmarks(nn.Module):
    """facenet-pytorch MTCNN (weights ship in its wheel): images -> (N, 5, 2) pixel landmarks.

    Input RGB NCHW in [-1, 1]. Images are padded by ``pad_fraction`` of their size first, because
    MTCNN misses faces that fill the whole frame (aligned crops). Rows are NaN where no face is
    found; the most confident face is kept.
    """

    def __init__(self, pad_fraction: float = 0.25, min_face_size: int = 20, device: str | None = None):
        super().__init__()
        from facenet_pytorch import MTCNN

        self.pad_fraction = pad_fraction
        self.detector = MTCNN(keep_all=True, select_largest=False, min_face_size=min_face_size,
                              device=device or "cpu")

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        n, _, h, w = images.shape
        pad = int(round(self.pad_fraction * max(h, w)))
        padded = torch.nn.functional.pad((images.detach().float().cpu() + 1) * 127.5, (pad, pad, pad, pad))
        frames = padded.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()
        out = torch.full((n, 5, 2), math.nan)
        _, _, points = self.detector.detect(list(frames), landmarks=True)
        for i, p in enumerate(points):
            if p is not None and len(p):
                out[i] = torch.as_tensor(p[0].astype("float32")) - pad  # sorted by probability
        return out.to(images.device)


class LandmarkAttributeEstimator(nn.Module):
    """images [-1, 1] NCHW -> (N, 5) [yaw, pitch, roll, mouth_width, mouth_height]; NaN rows where
    no face is detected. ``landmarks`` may be passed instead of detecting (e.g. dataset landmarks)."""

    attribute_names = POSE_NAMES + EXPRESSION_NAMES
    groups = {"pose": POSE_NAMES, "expression": EXPRESSION_NAMES}
    periodic = ("roll",)

    def __init__(self, detector: nn.Module | None = None):
        super().__init__()
        self._detector = detector

    @property
    def detector(self) -> nn.Module:
        if self._detector is None:
            self._detector = MTCNNLandmarks()
        return self._detector

    def forward(self, images: Tensor | None = None, landmarks: Tensor | None = None) -> Tensor:
        if landmarks is None:
            landmarks = self.detector(images)
        return torch.cat([landmark_pose(landmarks), landmark_expression(landmarks)], dim=-1)


class AttributePreservation(Metric):
    """Mean absolute error between attributes of originals and their anonymizations.

    ``update(original (N, K), anonymized (N, K))`` with columns ``attribute_names``; rows with a NaN
    on either side (face not detected) are left out and reported through ``valid``.
    ``compute()`` -> ``{<name>: MAE, <group>: mean MAE of the group's attributes, "valid": share
    of usable rows}``. Differences of ``periodic`` attributes (degrees) wrap into [-180, 180).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, attribute_names: Sequence[str], groups: Mapping[str, Sequence[str]] | None = None,
                 periodic: Sequence[str] = (), **kwargs):
        super().__init__(**kwargs)
        self.attribute_names = tuple(attribute_names)
        self.groups = {g: tuple(names) for g, names in (groups or {}).items()}
        for group, names in self.groups.items():
            unknown = set(names) - set(self.attribute_names)
            if unknown:
                raise ValueError(f"group '{group}' names unknown attributes {sorted(unknown)}")
        self.periodic = torch.tensor([name in periodic for name in self.attribute_names])
        self.add_state("differences", default=[], dist_reduce_fx="cat")

    def update(self, original: Tensor, anonymized: Tensor) -> None:
        if original.shape != anonymized.shape or original.shape[-1] != len(self.attribute_names):
            raise ValueError(f"expected aligned (N, {len(self.attribute_names)}) attributes, got "
                             f"{tuple(original.shape)} and {tuple(anonymized.shape)}")
        difference = (anonymized.detach().double() - original.detach().double())
        periodic = self.periodic.to(difference.device)
        wrapped = torch.remainder(difference + 180, 360) - 180
        self.differences.append(torch.where(periodic, wrapped, difference).abs())

    def compute(self) -> dict[str, Tensor]:
        differences = dim_zero_cat(self.differences).reshape(-1, len(self.attribute_names))
        usable = torch.isfinite(differences).all(dim=1)
        errors = differences[usable].mean(dim=0) if usable.any() else torch.full((len(self.attribute_names),), math.nan)
        out = {name: errors[i].float() for i, name in enumerate(self.attribute_names)}
        for group, names in self.groups.items():
            out[group] = torch.stack([out[name] for name in names]).mean()
        out["valid"] = usable.float().mean()
        return out
