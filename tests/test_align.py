"""Five-point alignment: similarity fit, crop warp conventions, paste-back, inner-face mask."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from id2face.data import align as A


def _similarity(angle: float, scale: float, shift) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])


def _dots(size: int, points: np.ndarray) -> np.ndarray:
    """Black RGB image with 3x3 white squares centred on integer ``points``."""
    image = np.zeros((size, size, 3), np.uint8)
    for x, y in np.rint(points).astype(int):
        image[y - 1:y + 2, x - 1:x + 2] = 255
    return image


def _centroids(image: np.ndarray, points: np.ndarray, radius: int = 6) -> np.ndarray:
    """Intensity centroid of ``image`` in a window around each expected point."""
    gray = image.astype(np.float64).mean(-1) if image.ndim == 3 else image.astype(np.float64)
    found = []
    for x, y in np.rint(points).astype(int):
        window = gray[y - radius:y + radius + 1, x - radius:x + radius + 1]
        ys, xs = np.mgrid[y - radius:y + radius + 1, x - radius:x + radius + 1]
        found.append([(xs * window).sum() / window.sum(), (ys * window).sum() / window.sum()])
    return np.array(found)


def test_template_is_arcface_at_112_and_scales_about_the_centre():
    np.testing.assert_allclose(A.template_landmarks(112), A.ARCFACE_TEMPLATE_112, atol=1e-9)
    big = A.template_landmarks(256)
    ratio = np.linalg.norm(big[1] - big[0]) / np.linalg.norm(A.ARCFACE_TEMPLATE_112[1] - A.ARCFACE_TEMPLATE_112[0])
    assert ratio == pytest.approx(256 / 112)
    small_face = A.template_landmarks(256, face_scale=0.5)
    centre = np.array([127.5, 127.5])
    np.testing.assert_allclose(small_face - centre, (big - centre) * 0.5, atol=1e-9)


def test_similarity_fit_recovers_a_known_transform_and_never_mirrors():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    truth = _similarity(0.4, 1.7, (12.0, -30.0))
    fitted = A.estimate_similarity(src, A.transform_points(src, truth))
    np.testing.assert_allclose(fitted, truth, atol=1e-9)
    # A mirrored target has no similarity: the fit stays a rotation (positive determinant).
    mirrored = A.transform_points(src, truth) * np.array([-1, 1])
    assert np.linalg.det(A.estimate_similarity(src, mirrored)[:, :2]) > 0
    np.testing.assert_allclose(A.transform_points(A.transform_points(src, truth), A.invert_affine(truth)), src, atol=1e-9)
    with pytest.raises(ValueError):
        A.estimate_similarity(np.ones((5, 2)), src)


@pytest.mark.parametrize("angle,scale", [(0.0, 1.0), (0.3, 2.0), (-0.5, 0.7), (0.2, 0.12)])
def test_crop_places_source_points_where_the_matrix_says(angle, scale):
    """PIL samples at pixel centres (i + 0.5); the index-coordinate matrix must be honoured
    exactly, including on the box-reduced path used for big downscales (scale 0.12)."""
    size_src = 400 if scale >= 0.5 else 1600
    spread = 50 / scale  # keeps the mapped points inside the crop
    centre = size_src / 2
    src_points = np.array([[centre - spread, centre - spread / 2], [centre + spread, centre - spread / 2],
                           [centre, centre + spread / 3]])
    dot_radius = 1 if scale >= 0.5 else 12  # dots must survive the reduction
    image = np.zeros((size_src, size_src, 3), np.uint8)
    for x, y in np.rint(src_points).astype(int):
        image[y - dot_radius:y + dot_radius + 1, x - dot_radius:x + dot_radius + 1] = 255
    # Rounded points are the true dot centres.
    src_points = np.rint(src_points)
    out_size = 160
    matrix = _similarity(angle, scale, (0.0, 0.0))
    mapped_centre = A.transform_points(np.array([[centre, centre]]), matrix)[0]
    matrix[:, 2] = (out_size - 1) / 2 - mapped_centre
    crop = A.crop_face(image, matrix, out_size)
    expected = A.transform_points(src_points, matrix)
    assert np.abs(_centroids(crop, expected) - expected).max() < 0.35


def _whole_photo_crop(photo: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """PIL's bicubic affine warp of the whole photo: what crop_face computes where it need not reduce."""
    coefficients = A.pil_affine(A.invert_affine(matrix))
    return np.asarray(Image.fromarray(photo).transform((size, size), Image.AFFINE, coefficients,
                                                       resample=Image.BICUBIC, fillcolor=(0, 0, 0)))


@pytest.mark.parametrize("centre, angle, face", [((600, 400), 0.0, 120), ((15, 30), 0.5, 150), ((1190, 890), -2.0, 90),
                                                 ((-400, 300), 0.3, 100), ((600, 400), 1.0, 480)])
def test_crop_face_converts_only_what_it_sees_and_equals_the_whole_photo_warp(monkeypatch, centre, angle, face):
    """A 512 px crop of a 12 MP photo used to convert the whole photo, twice (83 ms a face): now only
    the region the crop sees, with the same pixels as the whole photo's warp, at its edges and off it too."""
    rng = np.random.default_rng(0)
    photo = np.asarray(Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).resize((1200, 900)))
    size = 256
    template = A.template_landmarks(size)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = A.estimate_similarity((template - size / 2) / size * face @ rotation.T + np.array(centre), template)
    expected = _whole_photo_crop(photo, matrix, size)
    converted, fromarray = [], Image.fromarray

    def recording_fromarray(array, *args, **kwargs):
        converted.append(array.size)
        return fromarray(array, *args, **kwargs)

    monkeypatch.setattr(Image, "fromarray", recording_fromarray)
    crop = A.crop_face(photo, matrix, size)
    # PIL steps its source coordinates by repeated addition: from the cut's origin they round
    # differently, and a few pixels in ten thousand come out one level apart.
    difference = np.abs(crop.astype(int) - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    corners = A.transform_points(np.array([[0, 0], [size, 0], [0, size], [size, size]]), A.invert_affine(matrix))
    low, high = np.clip(corners.min(0) - 8, 0, None), np.clip(corners.max(0) + 8, None, photo.shape[1::-1])
    assert max(converted, default=0) <= 3 * np.prod(np.clip(high - low, 0, None))  # the crop's bounding box at most
    assert (crop.max() == 0) == (centre[0] < 0)  # a face off the photo is black


def test_tensor_warp_matches_the_pil_crop():
    rng = np.random.default_rng(1)
    image = (rng.uniform(0, 1, (96, 96, 1)) * np.linspace(0, 255, 96)[None, :, None]).repeat(3, 2).astype(np.uint8)
    image = np.asarray(torch.nn.functional.avg_pool2d(torch.from_numpy(image).permute(2, 0, 1)[None].float(), 5, 1, 2)[0]
                       .permute(1, 2, 0)).astype(np.uint8)  # smooth, so bilinear and bicubic agree
    matrix = _similarity(0.25, 1.3, (-10.0, 5.0))
    pil = A.crop_face(image, matrix, 64).astype(np.float64)
    tensor = A.warp_tensor(torch.from_numpy(image).permute(2, 0, 1)[None].double(), matrix, (64, 64))
    tensor = tensor[0].permute(1, 2, 0).numpy()
    inside = A.warp_tensor(torch.ones(1, 1, 96, 96, dtype=torch.float64), matrix, (64, 64))[0, 0].numpy() > 0.999
    assert inside.mean() > 0.5
    assert np.abs(pil - tensor)[inside].mean() < 1.5


def test_paste_back_restores_the_photo_and_leaves_the_rest_untouched():
    rng = np.random.default_rng(2)
    photo = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 80, 100))).float()
    for _ in range(3):  # smooth: two bilinear resamplings must be near-lossless
        photo = torch.nn.functional.avg_pool2d(photo, 5, 1, 2, count_include_pad=False)
    landmarks = np.array([[40, 30], [60, 31], [50, 42], [42, 52], [58, 52]], np.float64)
    matrix = A.alignment_matrix(landmarks, 64)
    crop = A.warp_tensor(photo, matrix, (64, 64))
    # Pasting the unchanged crop gives the photo back where the crop covers it ...
    back = A.paste_back(photo, crop, matrix)
    core = (slice(None), slice(None), slice(30, 50), slice(40, 60))
    assert (back - photo)[core].abs().max() < 0.15
    assert (back - photo)[core].abs().mean() < 0.03
    # ... and a changed crop changes only the pasted region.
    changed = A.paste_back(photo, torch.zeros_like(crop) + 1, matrix)
    assert torch.equal(changed[..., :, :5], photo[..., :, :5])  # far left: outside the crop
    assert (changed[core] - 1).abs().max() < 1e-4  # crop centre fully pasted


def test_feathered_square_is_one_inside_and_zero_at_the_border():
    weight = A.feathered_square(64, 0.1)[0, 0]
    assert weight[32, 32] == 1.0 and weight[0, 0] < 0.02 and weight[32, 0] < 0.1
    assert torch.all(weight[:, 1:32] >= weight[:, :31])  # rises monotonically towards the centre


def test_inner_face_mask_covers_the_features_and_not_the_surroundings():
    size = 112
    template = A.template_landmarks(size)
    mask = A.template_mask(size)
    assert set(np.unique(mask)) == {0.0, 1.0}
    for x, y in np.rint(template).astype(int):
        assert mask[y, x] == 1
    eyes_y = template[:2, 1].mean()
    eye_distance = template[1, 0] - template[0, 0]
    brow = np.rint([template[:2, 0].mean(), eyes_y - 0.3 * eye_distance]).astype(int)
    assert mask[brow[1], brow[0]] == 1  # brows are identity-bearing
    assert mask[:8].sum() == 0 and mask[-4:].sum() == 0 and mask[:, :10].sum() == 0 and mask[:, -10:].sum() == 0
    assert 0.2 < mask.mean() < 0.45


def test_inner_face_mask_follows_rotated_landmarks():
    size = 128
    template = A.template_landmarks(size)
    rotation = _similarity(0.35, 1.0, (0, 0))
    centre = np.array([(size - 1) / 2] * 2)
    rotation[:, 2] = centre - rotation[:, :2] @ centre
    rotated_mask = A.inner_face_mask(A.transform_points(template, rotation), size)
    warped_mask = A.warp_tensor(torch.from_numpy(A.template_mask(size))[None, None].double(), rotation,
                                (size, size))[0, 0].numpy() > 0.5
    intersection = np.logical_and(rotated_mask > 0, warped_mask).sum()
    union = np.logical_or(rotated_mask > 0, warped_mask).sum()
    assert intersection / union > 0.95


def test_hflip_landmarks_keeps_left_and_right_as_seen():
    template = A.template_landmarks(64)
    flipped = A.hflip_landmarks(template, 64)
    assert flipped[0, 0] < flipped[1, 0] and flipped[3, 0] < flipped[4, 0]
    np.testing.assert_allclose(A.hflip_landmarks(flipped, 64), template)
    # The template is nearly symmetric, so its mirror is nearly itself.
    assert np.abs(flipped - template).max() < 1.5
