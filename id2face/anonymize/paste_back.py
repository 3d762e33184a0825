"""Paste-back geometry: the identity mask grown and feathered at crop scale, and a crop warped back
into its photo and blended there; pixels whose warped weight is 0 are never written."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..data.align import invert_affine, transform_points, warp_tensor


def grow_mask(mask: np.ndarray, margin: float) -> np.ndarray:
    """(S, S) float32 {0, 1}: ``mask`` plus every pixel within ``margin`` pixels of it."""
    mask = np.asarray(mask) > 0.5
    if margin <= 0:
        return mask.astype(np.float32)
    from scipy.ndimage import distance_transform_edt

    return (distance_transform_edt(~mask) <= margin).astype(np.float32)


def feathered_mask(mask: np.ndarray, band: float) -> np.ndarray:
    """(S, S) weight: 1 on ``mask``, falling linearly to exactly 0 at ``band`` pixels outside it."""
    mask = np.asarray(mask) > 0.5
    if band <= 0:
        return mask.astype(np.float32)
    from scipy.ndimage import distance_transform_edt

    distance = distance_transform_edt(~mask)
    return np.clip(1.0 - distance / band, 0.0, 1.0).astype(np.float32)


def crop_weight_region(weight: np.ndarray, matrix: np.ndarray, shape: tuple[int, int]) -> list[int] | None:
    """[x0, y0, x1, y1) of the photo pixels that the crop's non-zero weight can reach, or None."""
    ys, xs = np.nonzero(weight > 0)
    if len(xs) == 0:
        return None
    # the support's pixels grown by one crop pixel (bilinear sampling reaches that far), in the photo
    support = np.stack([xs, ys], 1).astype(np.float64)
    grown = (support[:, None, :] + np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]], np.float64)).reshape(-1, 2)
    photo = transform_points(grown, invert_affine(matrix))
    x0, y0 = np.floor(photo.min(0)).astype(int) - 1
    x1, y1 = np.ceil(photo.max(0)).astype(int) + 2
    height, width = shape
    x0, y0, x1, y1 = max(int(x0), 0), max(int(y0), 0), min(int(x1), width), min(int(y1), height)
    return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None


def _warp_to_region(channels: torch.Tensor, matrix: np.ndarray, region: Sequence[int]) -> torch.Tensor:
    """Warp crop ``channels`` (C, S, S) into the photo ``region`` [x0, y0, x1, y1): (C, h, w)."""
    x0, y0, x1, y1 = region
    to_crop = np.asarray(matrix, dtype=np.float64).copy()
    to_crop[:, 2] = to_crop[:, 2] + to_crop[:, :2] @ np.array([x0, y0], dtype=np.float64)  # region -> crop
    crop_to_region = invert_affine(to_crop)
    return warp_tensor(channels[None].double(), crop_to_region, (y1 - y0, x1 - x0))[0]


def warp_weight(weight: np.ndarray, matrix: np.ndarray, region: Sequence[int]) -> np.ndarray:
    warped = _warp_to_region(torch.from_numpy(np.asarray(weight, np.float32))[None], matrix, region)[0]
    return warped.clamp(0, 1).float().numpy()


def blend_crop(out: np.ndarray, channels: torch.Tensor, matrix: np.ndarray) -> list[int] | None:
    """Blend crop ``channels`` (RGB 0-255 + weight, (4, S, S)) into ``out`` in place; pixels whose
    warped weight is 0 are left untouched (bit-exact). Returns the region [x0, y0, x1, y1)."""
    region = crop_weight_region(channels[3].numpy(), matrix, out.shape[:2])
    if region is None:
        return None
    x0, y0, x1, y1 = region
    warped = _warp_to_region(channels, matrix, region).numpy()
    rgb, alpha = np.moveaxis(warped[:3], 0, -1), np.clip(warped[3], 0, 1)[..., None]
    current = out[y0:y1, x0:x1].astype(np.float64)
    blended = current * (1 - alpha) + rgb * alpha
    out[y0:y1, x0:x1] = np.where(alpha > 0, np.clip(np.rint(blended), 0, 255), current).astype(np.uint8)
    return region


def union_box(a: list[int] | None, b: list[int] | None) -> list[int] | None:
    if a is None or b is None:
        return a if b is None else b
    return [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
