"""Five-point face alignment: template, similarity fit, crop warp, paste-back, inner-face mask.

Coordinates are pixel-index (x, y): the centre of pixel (row 0, column 0) is (0, 0), as in
OpenCV/skimage and MTCNN. Landmark order: left eye, right eye, nose tip, left mouth corner,
right mouth corner, left/right as seen in the image. A ``matrix`` is a (2, 3) float array that
maps source-image points to crop points: ``crop_xy = matrix[:, :2] @ src_xy + matrix[:, 2]``.

The crop is the standard ArcFace 112 x 112 template scaled to the crop size; ``face_scale`` < 1
shrinks the face about the crop centre to keep more hair and background in the crop.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# insightface's 5-point template for 112 x 112 ArcFace crops (pixel-index coordinates).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")


def scale_points(points: np.ndarray, from_size: float, to_size: float) -> np.ndarray:
    """Map pixel-index points between two resolutions of the same square image."""
    return (np.asarray(points, dtype=np.float64) + 0.5) * (to_size / from_size) - 0.5


def template_landmarks(size: int, face_scale: float = 1.0) -> np.ndarray:
    """The 5 template points (5, 2) in a ``size`` x ``size`` crop."""
    points = scale_points(ARCFACE_TEMPLATE_112, 112, size)
    centre = (size - 1) / 2.0
    return centre + (points - centre) * face_scale


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) taking
    ``src`` (K, 2) to ``dst`` (K, 2), K >= 2 (Umeyama 1991). Returns the (2, 3) matrix."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need matching (K>=2, 2) point sets, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best fit would mirror the face: forbid it
        sign[1, 1] = -1
    rotation = u @ sign @ vt
    variance = (src_c ** 2).sum() / len(src)
    if variance <= 1e-12:
        raise ValueError("source points coincide: no similarity transform")
    scale = float(np.trace(np.diag(singular) @ sign)) / variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - matrix[:, :2] @ src_mean
    return matrix


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return points @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine matrix (crop -> source for an alignment matrix)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    linear_inv = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear_inv, -linear_inv @ matrix[:, 2:]], axis=1)


def matrix_scale(matrix: np.ndarray) -> float:
    """Crop pixels per source pixel of a similarity matrix."""
    return math.sqrt(abs(np.linalg.det(np.asarray(matrix)[:, :2])))


def alignment_matrix(landmarks: np.ndarray, size: int, face_scale: float = 1.0) -> np.ndarray:
    """Source -> crop matrix that brings 5 source ``landmarks`` onto the template."""
    return estimate_similarity(landmarks, template_landmarks(size, face_scale))


def crop_face(image: np.ndarray | Image.Image, matrix: np.ndarray, size: int) -> np.ndarray:
    """Warp a photo (H, W, 3) uint8 into the ``size`` x ``size`` crop of ``matrix`` (bicubic,
    black outside the photo). Large downscales are box-filtered first, so faces from big photos
    do not alias."""
    matrix = np.asarray(matrix, dtype=np.float64)
    inverse = invert_affine(matrix)
    factor = int(1.0 / matrix_scale(matrix))
    # Only the region the crop sees (plus the resampling's reach) is converted and warped: a 512 px
    # crop of a 12 MP photo otherwise copied all 36 MB of it twice: ~85 ms a face on the CI machine.
    corners = transform_points(np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]]), inverse)
    margin = 2 * factor if factor >= 2 else 4
    x0, y0 = (np.floor(corners.min(0)).astype(int) - margin).tolist()
    x1, y1 = (np.ceil(corners.max(0)).astype(int) + margin).tolist()
    if factor >= 2:
        # Box-reduce the cut by `factor` and fold the cut + reduction into the matrix:
        # src = x0 + factor * reduced + (factor - 1) / 2.
        pil = _photo_region(image, (x0, y0, x1, y1)).reduce(factor)
        offset = np.array([x0, y0], dtype=np.float64) + (factor - 1) / 2.0
        inverse = np.concatenate([inverse[:, :2] / factor, ((inverse[:, 2] - offset) / factor)[:, None]], axis=1)
    else:
        # Cut within the photo only: outside it the warp fills black, at its edges bicubic clamps
        # to the photo's own edge pixels, exactly as on the whole photo.
        width, height = image.size if isinstance(image, Image.Image) else np.asarray(image).shape[1::-1]
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if x1 <= x0 or y1 <= y0:
            return np.zeros((size, size, 3), dtype=np.uint8)
        pil = _photo_region(image, (x0, y0, x1, y1))
        inverse = np.concatenate([inverse[:, :2], (inverse[:, 2] - np.array([x0, y0], np.float64))[:, None]], axis=1)
    out = pil.convert("RGB").transform((size, size), Image.AFFINE, pil_affine(inverse), resample=Image.BICUBIC,
                                       fillcolor=(0, 0, 0))
    return np.asarray(out)


def pil_affine(inverse: np.ndarray) -> tuple[float, ...]:
    """``Image.transform(..., Image.AFFINE, data)``'s data for a pixel-index output -> input matrix:
    PIL samples in continuous coordinates (pixel centres at i + 0.5)."""
    linear, shift = inverse[:, :2], inverse[:, 2] + 0.5 - inverse[:, :2] @ np.array([0.5, 0.5])
    return (linear[0, 0], linear[0, 1], shift[0], linear[1, 0], linear[1, 1], shift[1])


def _photo_region(image: np.ndarray | Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """``image.crop(box)`` of the photo as a PIL image (black where ``box`` leaves the photo),
    converting only the part of an array inside ``box``."""
    if isinstance(image, Image.Image):
        return image.crop(box)
    array = np.asarray(image)
    height, width = array.shape[:2]
    x0, y0, x1, y1 = box
    inside = (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))
    if inside[2] <= inside[0] or inside[3] <= inside[1]:
        return Image.new("RGB", (x1 - x0, y1 - y0))
    part = Image.fromarray(np.ascontiguousarray(array[inside[1]:inside[3], inside[0]:inside[2]]))
    return part.crop((x0 - inside[0], y0 - inside[1], x1 - inside[0], y1 - inside[1]))


def warp_tensor(images: torch.Tensor, matrices: torch.Tensor | np.ndarray, out_size: tuple[int, int],
                mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Differentiable batched warp: ``images`` (N, C, H, W), ``matrices`` (N, 2, 3) or (2, 3)
    mapping input pixel coordinates to output ones; returns (N, C, out_h, out_w)."""
    n, _, height, width = images.shape
    matrices = torch.as_tensor(matrices, dtype=torch.float64, device=images.device)
    if matrices.dim() == 2:
        matrices = matrices.expand(n, 2, 3)
    linear = matrices[:, :, :2]
    inverse_linear = torch.linalg.inv(linear)
    inverse_shift = -(inverse_linear @ matrices[:, :, 2:]).squeeze(-1)
    out_h, out_w = out_size
    ys, xs = torch.meshgrid(
        torch.arange(out_h, dtype=torch.float64, device=images.device),
        torch.arange(out_w, dtype=torch.float64, device=images.device), indexing="ij")
    grid = torch.stack([xs, ys], dim=-1).reshape(1, -1, 2)  # output pixel coordinates
    source = grid @ inverse_linear.transpose(1, 2) + inverse_shift[:, None, :]
    # pixel index -> grid_sample's normalised coordinates (align_corners=False)
    normalised = torch.stack([(2 * source[..., 0] + 1) / width - 1, (2 * source[..., 1] + 1) / height - 1], dim=-1)
    normalised = normalised.reshape(n, out_h, out_w, 2).to(images.dtype)
    return F.grid_sample(images, normalised, mode=mode, padding_mode=padding_mode, align_corners=False)


def feathered_square(size: int, feather: float = 0.08) -> torch.Tensor:
    """(1, 1, size, size) weight: 1 inside the crop, falling linearly to 0 over ``feather`` x size
    pixels at the border, so a pasted crop leaves no seam."""
    if feather <= 0:
        return torch.ones(1, 1, size, size)
    coords = torch.arange(size, dtype=torch.float32)
    to_edge = torch.minimum(coords, size - 1 - coords)
    ramp = ((to_edge + 0.5) / (feather * size)).clamp(0, 1)
    return (ramp[None, :] * ramp[:, None])[None, None]


def paste_back(image: torch.Tensor, crop: torch.Tensor, matrices: torch.Tensor | np.ndarray,
               crop_weight: torch.Tensor | None = None, feather: float = 0.08) -> torch.Tensor:
    """Put aligned crops back into their photos.

    ``image`` (N, C, H, W) the photos, ``crop`` (N, C, S, S) crops made with ``matrices`` (N, 2, 3)
    photo -> crop. ``crop_weight`` (N or 1, 1, S, S) in [0, 1] selects what to paste (e.g. a
    feathered inner-face mask); default: the whole crop with a feathered border. Returns the
    blended photos (N, C, H, W); outside the crop the photo is unchanged.
    """
    size = crop.shape[-1]
    matrices = torch.as_tensor(matrices, dtype=torch.float64, device=image.device)
    if matrices.dim() == 2:
        matrices = matrices.expand(image.shape[0], 2, 3)
    inverse = torch.linalg.inv(torch.cat([matrices, matrices.new_tensor([0, 0, 1]).expand(len(matrices), 1, 3)], 1))[:, :2]
    weight = feathered_square(size, feather) if crop_weight is None else crop_weight
    weight = weight.to(image.dtype).to(image.device).expand(image.shape[0], 1, size, size)
    out_size = (image.shape[-2], image.shape[-1])
    warped = warp_tensor(torch.cat([crop.to(image.dtype), weight], 1), inverse, out_size)
    pasted, alpha = warped[:, :-1], warped[:, -1:]
    return image * (1 - alpha) + pasted * alpha


# The largest ArcFace-template scale whose inner face (``inner_face_extent``) lies on the crop:
# 1.1429, bisected, at every crop size. Larger, the lower lip or brows of a typical face lie past
# the crop, where a model neither sees nor regenerates them.
MAX_FACE_SCALE = 1.14


def _inner_face_shape(landmarks: np.ndarray):
    """(centre, u, v, half_width, half_height) of the inner face's superellipse, or None for
    landmarks without an eye line (``inner_face_mask``)."""
    points = np.asarray(landmarks, dtype=np.float64)
    left_eye, right_eye, _, left_mouth, right_mouth = points
    eye_mid, mouth_mid = (left_eye + right_eye) / 2, (left_mouth + right_mouth) / 2
    across = right_eye - left_eye
    eye_distance = float(np.linalg.norm(across))
    if eye_distance < 1e-6:
        return None
    u = across / eye_distance
    v = np.array([-u[1], u[0]])  # image y points down: v points from the eyes to the mouth
    eye_to_mouth = max(float((mouth_mid - eye_mid) @ v), 0.5 * eye_distance)
    top, bottom = -0.6 * eye_to_mouth, 1.3 * eye_to_mouth
    return eye_mid + v * (top + bottom) / 2, u, v, 0.85 * eye_distance, (bottom - top) / 2


def inner_face_mask(landmarks: np.ndarray, size: int) -> np.ndarray:
    """The identity-bearing inner face (brows, eyes, nose, mouth) of a ``size`` x ``size`` image
    with 5 ``landmarks`` (5, 2): a superellipse in the eye-line frame, (size, size) float32 {0, 1}.

    Extents are proportional to the inter-ocular distance (width) and the eye-to-mouth distance
    (height): from 0.6 of it above the eyes (brows) to 0.3 of it below the mouth (lower lip),
    half-width 0.85 x inter-ocular; exponent 3 keeps the brow ends inside.
    """
    shape = _inner_face_shape(landmarks)
    if shape is None:
        return np.zeros((size, size), dtype=np.float32)
    centre, u, v, half_width, half_height = shape
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xs - centre[0], ys - centre[1]
    along, down = dx * u[0] + dy * u[1], dx * v[0] + dy * v[1]
    inside = np.abs(along / half_width) ** 3 + np.abs(down / half_height) ** 3 <= 1.0
    return inside.astype(np.float32)


def inner_face_extent(landmarks: np.ndarray) -> np.ndarray:
    """[x0, y0, x1, y1]: the bounds of ``inner_face_mask``'s region, unclipped (it may reach past
    the image), exactly: the superellipse's support function, exponent 3/2 dual to its 3."""
    shape = _inner_face_shape(landmarks)
    if shape is None:
        return np.full(4, np.nan)
    centre, u, v, half_width, half_height = shape
    reach = [(abs(axis @ u * half_width) ** 1.5 + abs(axis @ v * half_height) ** 1.5) ** (2 / 3)
             for axis in np.eye(2)]
    return np.concatenate([centre - reach, centre + reach])


def template_mask(size: int, face_scale: float = 1.0) -> np.ndarray:
    """``inner_face_mask`` of the template: the mask of every crop aligned to it."""
    return inner_face_mask(template_landmarks(size, face_scale), size)


def hflip_landmarks(landmarks: np.ndarray, width: int) -> np.ndarray:
    """Landmarks of the mirrored image, re-ordered so left/right still mean image-left/right."""
    flipped = np.asarray(landmarks, dtype=np.float64).copy()
    flipped[:, 0] = width - 1 - flipped[:, 0]
    return flipped[[1, 0, 2, 4, 3]]
