"""MTCNN with a fixed few host reads a photo (id2face.data.mtcnn): facenet-pytorch's detections,
without its reads per candidate face and per pyramid scale (on a GPU a round trip each)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from id2face.data.mtcnn import _pyramid, _refine, detect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import HostReadCounter  # noqa: E402  (one definition of a host read, shared with face_detection.py)

skimage_data = pytest.importorskip("skimage.data")


FACES = {"portrait": 1, "group": 4, "no_face": 0, "coffee": 0}


def coffee() -> np.ndarray:
    """skimage's coffee cup at 1024 x 768: no face, 372 candidates for MTCNN's refinement stages."""
    from PIL import Image

    return np.asarray(Image.fromarray(skimage_data.coffee()).resize((1024, 768), Image.BILINEAR))


@pytest.fixture(scope="module")
def photos(group_photo):
    return {"portrait": skimage_data.astronaut(), "group": group_photo,
            "no_face": np.full((300, 400, 3), 128, np.uint8), "coffee": coffee()}




@pytest.fixture(scope="module")
def mtcnn():
    from facenet_pytorch import MTCNN

    return MTCNN(keep_all=True, select_largest=True, min_face_size=20).eval()


@pytest.mark.parametrize("name", sorted(FACES))
def test_detections_are_facenet_pytorchs(mtcnn, photos, name):
    boxes, points = detect(mtcnn, photos[name])
    reference_boxes, reference_scores, reference_points = mtcnn.detect(photos[name], landmarks=True)
    assert boxes.shape == (FACES[name], 5) and points.shape == (FACES[name], 5, 2)
    assert boxes.dtype == points.dtype == np.float32
    if FACES[name] == 0:
        assert reference_boxes is None
        return
    np.testing.assert_allclose(boxes[:, :4], reference_boxes.astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(boxes[:, 4], reference_scores.astype(np.float32), atol=1e-5)
    np.testing.assert_allclose(points, reference_points.astype(np.float32), atol=1e-3)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert np.all(np.diff(areas) <= 0)  # largest first, as MTCNN(select_largest=True)


def test_host_reads_do_not_grow_with_candidates_or_scales(mtcnn):
    """facenet-pytorch reads each candidate's image index from its tensor (372 here; on a GPU a
    round trip each) and thresholds and suppresses scale by scale; ours reads a fixed few. (A photo
    with fewer than 1000 first-stage boxes: beyond, torchvision's CPU NMS goes class by class.)"""
    photo = coffee()
    with HostReadCounter() as theirs:
        mtcnn.detect(photo, landmarks=True)
    with HostReadCounter() as ours:
        detect(mtcnn, photo)
    scales = len(_pyramid(*photo.shape[:2], mtcnn.min_face_size, mtcnn.factor))
    assert theirs.counts["aten._local_scalar_dense"] > 300 and theirs.counts["aten.nonzero"] >= scales
    assert ours.counts["aten._local_scalar_dense"] == 0
    assert ours.host_reads <= 7 < scales  # one threshold and two NMS (stage 1), a threshold and NMS per refinement
    assert sum(ours.counts.values()) < 0.7 * sum(theirs.counts.values())


def test_a_candidate_outside_the_photo_scores_zero_and_leaves_the_others_alone(mtcnn):
    images = torch.as_tensor(skimage_data.astronaut().copy()).unsqueeze(0).permute(0, 3, 1, 2).float()
    boxes = torch.tensor([[180.7, 60.2, 270.9, 175.5, 0.9], [900.0, 40.0, 980.0, 120.0, 0.9],
                          [-30.0, -20.0, 60.0, 70.0, 0.9]])
    regression, landmarks, scores = _refine(mtcnn.onet, images, boxes, 48)
    assert scores[1].tolist() == [0.0, 0.0]
    for row, (top, bottom, left, right) in ((0, (59, 175, 179, 270)), (2, (0, 70, 0, 60))):
        crop = torch.nn.functional.interpolate(images[:, :, top:bottom, left:right], size=(48, 48), mode="area")
        expected = mtcnn.onet((crop - 127.5) * 0.0078125)
        for got, want in zip((regression, landmarks, scores), expected):
            torch.testing.assert_close(got[row], want[0], atol=1e-5, rtol=1e-5)
    assert scores[0, 1] > 0.99  # the astronaut's face


def test_a_photo_below_the_smallest_face_has_no_detections(mtcnn):
    boxes, points = detect(mtcnn, np.zeros((15, 40, 3), np.uint8))
    assert boxes.shape == (0, 5) and points.shape == (0, 5, 2)
