"""MTCNN's three-stage cascade on facenet-pytorch's networks and box arithmetic, with a fixed few
host reads per photo, not one per candidate face and several per pyramid scale.

facenet-pytorch's ``detect_face`` cuts each of the first stage's candidates out of the photo with
its image index read from the device (``imgs[image_inds[k], ...]``): at 2048 px a group photo has
hundreds of candidates, and on a GPU each read is a host-device round trip, queued behind whatever
the sampler runs on the same GPU (for one photo the index is always 0). It also thresholds and
suppresses the P-Net's maps scale by scale, three data-sized outputs each. Here the first stage
thresholds all scales at once and suppresses them in one batched NMS, and each refinement stage
reads its candidates' clipped boxes to the host once. The arithmetic and so the results are
facenet-pytorch's; a candidate whose clipped box is empty scores 0 instead of shifting the scores
of those after it.
"""
from __future__ import annotations

import numpy as np
import torch

# The R-Net's and O-Net's input sides.
REFINE_SIDE, OUTPUT_SIDE = 24, 48


def detect(mtcnn, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``MTCNN.detect(pixels, landmarks=True)`` for one (H, W, 3) uint8 photo of a facenet-pytorch
    ``MTCNN(select_largest=True)``: ``boxes`` (K, 5) [x0, y0, x1, y1, score] and ``points``
    (K, 5, 2), float32, largest box first; K may be 0."""
    from facenet_pytorch.models.utils.detect_face import batched_nms, batched_nms_numpy

    device = mtcnn.device
    dtype = next(mtcnn.pnet.parameters()).dtype
    threshold = mtcnn.thresholds
    scales = _pyramid(pixels.shape[0], pixels.shape[1], mtcnn.min_face_size, mtcnn.factor)
    if not scales:  # smaller than the smallest face
        return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
    with torch.no_grad():
        # facenet-pytorch's layout: (1, 3, H, W) strided over (1, H, W, 3); its kernels are tuned for it
        images = torch.as_tensor(pixels.copy(), device=device).unsqueeze(0).permute(0, 3, 1, 2).to(dtype)
        height, width = images.shape[2:]

        maps = []
        for scale in scales:
            scaled = torch.nn.functional.interpolate(images, size=(int(height * scale + 1), int(width * scale + 1)),
                                                     mode="area")
            regression, probabilities = mtcnn.pnet((scaled - 127.5) * 0.0078125)
            maps.append((probabilities[0, 1], regression[0], scale))
        boxes, scale_index = _first_stage_boxes(maps, threshold[0])
        boxes = boxes[batched_nms(boxes[:, :4], boxes[:, 4], scale_index, 0.5)]  # within each scale
        boxes = boxes[batched_nms(boxes[:, :4], boxes[:, 4], torch.zeros_like(boxes[:, 0], dtype=torch.long), 0.7)]
        size = boxes[:, 2:4] - boxes[:, 0:2]
        boxes = _square(torch.cat([boxes[:, 0:2] + boxes[:, 5:7] * size, boxes[:, 2:4] + boxes[:, 7:9] * size,
                                   boxes[:, 4:5]], dim=1))
        points = torch.zeros(0, 5, 2, device=device)
        if len(boxes):
            regression, scores = _refine(mtcnn.rnet, images, boxes, REFINE_SIDE)
            keep = (scores[:, 1] > threshold[1]).nonzero()[:, 0]  # indices: one host read, not one per mask use
            boxes = torch.cat([boxes[keep, :4], scores[keep, 1:2]], dim=1)
            regression = regression[keep]
            pick = batched_nms(boxes[:, :4], boxes[:, 4], torch.zeros_like(boxes[:, 0], dtype=torch.long), 0.7)
            boxes = _square(_regress(boxes[pick], regression[pick]))
        if len(boxes):
            regression, landmarks, scores = _refine(mtcnn.onet, images, boxes, OUTPUT_SIDE)
            keep = (scores[:, 1] > threshold[2]).nonzero()[:, 0]
            boxes = torch.cat([boxes[keep, :4], scores[keep, 1:2]], dim=1)
            regression, landmarks = regression[keep], landmarks[keep]
            size = (boxes[:, 2:4] - boxes[:, 0:2] + 1).repeat(1, 5).view(-1, 5, 2)  # (K, 5, [w, h])
            corner = boxes[:, 0:2].unsqueeze(1)
            points = size * landmarks.view(-1, 2, 5).transpose(1, 2) + corner - 1
            boxes = _regress(boxes, regression)
            pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], torch.zeros_like(boxes[:, 0], dtype=torch.long),
                                     0.7, "Min")
            boxes, points = boxes[pick], points[pick]
        boxes, points = boxes.cpu().numpy(), points.cpu().numpy()
    order = np.argsort((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[::-1]
    return boxes[order], points[order]


def _first_stage_boxes(maps: list[tuple[torch.Tensor, torch.Tensor, float]], threshold: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """facenet-pytorch's ``generateBoundingBox`` over all scales at once (one host read, where it
    reads three per scale): ``maps`` of (face probability (h, w), regression (4, h, w), scale) ->
    boxes (K, 9) [x0, y0, x1, y1, score, regression] in the photo and each box's scale index (K,),
    in facenet-pytorch's order (scale by scale, row-major)."""
    device = maps[0][0].device
    probabilities = torch.cat([probability.flatten() for probability, _, _ in maps])
    regression = torch.cat([offsets.flatten(1) for _, offsets, _ in maps], dim=1)
    cells = torch.cat([torch.arange(probability.numel(), device=device) for probability, _, _ in maps])
    widths = torch.cat([torch.full((probability.numel(),), probability.shape[1], device=device)
                        for probability, _, _ in maps])
    scale_index = torch.cat([torch.full((probability.numel(),), index, device=device)
                             for index, (probability, _, _) in enumerate(maps)])
    scales = torch.tensor([scale for _, _, scale in maps], dtype=probabilities.dtype, device=device)
    keep = (probabilities >= threshold).nonzero()[:, 0]
    cells, widths, scale_index = cells[keep], widths[keep], scale_index[keep]
    corner = torch.stack([cells % widths, cells // widths], dim=1).to(probabilities.dtype)  # (x, y) of the cell
    scale = scales[scale_index].unsqueeze(1)
    # P-Net: stride 2, 12 px cells
    boxes = torch.cat([((2 * corner + 1) / scale).floor(), ((2 * corner + 12) / scale).floor(),
                       probabilities[keep].unsqueeze(1), regression[:, keep].T], dim=1)
    return boxes, scale_index


def _refine(network, images, boxes, side: int) -> tuple[torch.Tensor, ...]:
    """The R- or O-Net on every candidate's crop (its box clipped to the image, resampled to side x
    side): its outputs, each (K, ...). A candidate whose clipped box is empty scores 0, so it cannot
    pass a threshold (facenet-pytorch skips its crop, which misaligns the scores that follow)."""
    from facenet_pytorch.models.utils.detect_face import fixed_batch_process

    height, width = images.shape[2:]
    corners = boxes[:, :4].trunc().long()
    x0, y0 = corners[:, 0].clamp(min=1) - 1, corners[:, 1].clamp(min=1) - 1
    x1, y1 = corners[:, 2].clamp(max=width), corners[:, 3].clamp(max=height)
    regions = torch.stack([y0, y1, x0, x1], dim=1).tolist()  # the stage's one host read
    empty = [bottom <= top or right <= left for top, bottom, left, right in regions]
    blank = images.new_zeros((1, images.shape[1], side, side))
    crops = torch.cat([blank if skip else torch.nn.functional.interpolate(
        images[:, :, top:bottom, left:right], size=(side, side), mode="area")
        for skip, (top, bottom, left, right) in zip(empty, regions)])
    outputs = list(fixed_batch_process((crops - 127.5) * 0.0078125, network))
    if any(empty):
        outputs[-1][torch.tensor(empty, device=crops.device)] = 0.0
    return tuple(outputs)


def _pyramid(height: int, width: int, min_face_size: int, factor: float) -> list[float]:
    """The P-Net's scales: the smallest face maps to its 12 px cell, then down by ``factor``."""
    scale, shortest, scales = 12.0 / min_face_size, min(height, width) * 12.0 / min_face_size, []
    while shortest >= 12:
        scales.append(scale)
        scale, shortest = scale * factor, shortest * factor
    return scales


def _regress(boxes: torch.Tensor, regression: torch.Tensor) -> torch.Tensor:
    """facenet-pytorch's ``bbreg``: corners moved by the regression, in units of the box's side + 1."""
    size = (boxes[:, 2:4] - boxes[:, 0:2] + 1).repeat(1, 2)
    return torch.cat([boxes[:, :4] + regression * size, boxes[:, 4:]], dim=1)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """facenet-pytorch's ``rerec``: each box grown to a square about its centre, on its longer side."""
    size = boxes[:, 2:4] - boxes[:, 0:2]
    side = size.max(dim=1, keepdim=True).values
    corner = boxes[:, 0:2] + size * 0.5 - side * 0.5
    return torch.cat([corner, corner + side, boxes[:, 4:]], dim=1)
