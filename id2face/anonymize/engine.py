"""The anonymizer: photos in memory -> detected, aligned faces -> batched sampling -> paste-back,
cover and audit (the package docstring says what happens to a face); its settings, the training
template faces are aligned to, on-the-fly pseudonym clusters, and the audit judge."""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..data.align import (MAX_FACE_SCALE, crop_face, estimate_similarity, inner_face_extent, inner_face_mask,
                          scale_points, template_landmarks, transform_points)
from ..data.imageio import ImageReadError
from ..errors import UserError, describe
from ..precision import INFERENCE_PRECISIONS, autocast
from .paste_back import blend_crop, crop_weight_region, feathered_mask, grow_mask, union_box, warp_weight
from .workers import StageWorker, ahead


COVER_MODES = ("fill", "blur")
# A regenerated identity region must differ from the source by at least this mean absolute value
# (images in [-1, 1]); below it the model has returned the face as it was and the face is covered.
MIN_IDENTITY_CHANGE = 0.01
# Photos larger than this are downscaled for detection only: group photos hold small faces (MTCNN's
# 20 px minimum at 2048 is 40 px of a 12 MP photo; `prepare`'s portraits do with 1024).
DETECT_MAX_SIDE = 2048
# Detect-and-align threads of `id2face anonymize` (with a pipeline depth): one thread spends ~160 ms
# of host time on a 4-face 12 MP photo with MTCNN on a GPU (the downscale 20-30 ms, MTCNN's ~2800 op
# dispatches, 4 aligned crops and masks at ~26 ms each; BENCHMARKS.md), where 20 faces/s leaves
# it 200 ms. The results do not depend on the count.
DEFAULT_DETECT_WORKERS = min(4, os.cpu_count() or 1)
# What ``Anonymizer.stage_seconds`` times: detection and alignment (summed over the detect threads);
# identity encoding and clustering; the batched sampling (waiting for the GPU included); paste-back,
# cover and audit.
STAGES = ("detect", "encode", "sample", "finish")


@dataclass
class AnonymizeSettings:
    """What the anonymizer does with each face (the CLI flags of ``id2face anonymize``)."""

    key: str | bytes | None = None       # secret for consistent pseudonyms; None: fresh identities
    steps: int | None = None             # sampler steps; None: the checkpoint's sampler setting
    batch_size: int = 8                  # faces per model call, gathered across photos
    pad_last_batch: bool = False         # fill the last batch with repeats: a compiled model sees one shape
    cudnn_benchmark: bool = False        # cuDNN times each convolution's algorithms at a batch size's first call
    seed: int | None = None              # diffusion noise seed; None: a random one (recorded)
    min_score: float = 0.8               # detections scored below are not faces
    min_face_size: float = 8.0           # px, shorter side of the box; smaller faces are covered
    mask_margin: float = 0.04            # the identity mask grown by this fraction of S (brow and lip ends)
    feather: float = 0.08                # feather band outside the identity mask, fraction of S
    cover: str = "fill"                  # how failed faces are covered: fill | blur
    cover_scale: float = 1.3             # cover ellipse = the detection box scaled by this
    cluster_threshold: float | None = None   # join a cluster at cosine >= (or distance <) this
    cover_if_recognized: bool = False    # also cover faces the audit recognizer still matches
    audit_size: int = 160                # px of the aligned crops the audit recognizer sees
    face_scale: float | None = None      # ArcFace template x this; None: the training template
    precision: str = "32-true"           # sampling arithmetic: 32-true | bf16-mixed | 16-mixed (autocast)

    def check(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")
        if self.cover not in COVER_MODES:
            raise UserError(f"--cover must be one of {', '.join(COVER_MODES)}, got {self.cover!r}")
        if not 0.0 <= self.min_score <= 1.0:
            raise UserError(f"--min-score must be in [0, 1], got {self.min_score}")
        if self.face_scale is not None and not 0.1 <= self.face_scale <= MAX_FACE_SCALE:
            raise UserError(f"--face-scale must be between 0.1 and {MAX_FACE_SCALE:g} (larger puts the inner face "
                            f"past the crop, where it is not regenerated), got {self.face_scale}")
        if not 0.0 <= self.feather <= 0.5 or not 0.0 <= self.mask_margin <= 0.25:
            raise UserError(f"feather must be in [0, 0.5] and mask_margin in [0, 0.25], got {self.feather}, "
                            f"{self.mask_margin}")
        if self.key is not None and len(self.key) == 0:
            raise UserError("--key is empty")
        if self.key is None and self.cluster_threshold is not None:
            raise UserError("--cluster-threshold groups faces into persons for --key; without a key every face "
                            "gets a substitute of its own")
        if self.precision not in INFERENCE_PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {self.precision!r}")


def training_template(cfg, size: int, face_scale: float | None = None) -> tuple[np.ndarray, str]:
    """The 5-point template (5, 2) pixel-index (x, y) that training crops were aligned to, at ``size``.

    ``face_scale`` given: the ArcFace template scaled by it. SynthFaces: the mean landmarks of
    renders of the configured identities (SynthFaces frames faces ~1.35x smaller than ArcFace).
    A prepared dataset: its ``face_scale`` (``prepare.json``). Else the ArcFace template.
    """
    if face_scale is not None:
        return template_landmarks(size, face_scale), f"ArcFace template x {face_scale:g} (--face-scale)"
    dataset = cfg.data.dataset
    params = dict(dataset.get("params") or {})
    if dataset.name == "synthfaces":
        from ..data.synthfaces import render_sample

        seed, offset = int(params.get("seed", 0)), int(params.get("identity_offset", 0))
        identities = min(int(params.get("num_identities", 200)), 24)
        points = np.stack([render_sample(offset + i, s, size, seed)["landmarks"].numpy()
                           for i in range(identities) for s in range(2)]).mean(0)
        # render() puts the top-left pixel at [0, 1): pixel-index coordinates are 0.5 less.
        return points.astype(np.float64) - 0.5, f"mean SynthFaces landmarks ({identities * 2} renders)"
    root = params.get("root")
    meta = Path(str(root)) / "prepare.json" if root else None
    if meta is not None and meta.is_file():
        try:
            scale = float(json.loads(meta.read_text()).get("face_scale", 1.0))
            return template_landmarks(size, scale), f"ArcFace template x {scale:g} ({meta})"
        except (ValueError, OSError):
            pass
    return template_landmarks(size), "ArcFace template"


def inside_crop(extent: np.ndarray, size: int) -> bool:
    """Whether a region with bounds ``extent`` [x0, y0, x1, y1] lies on the pixels of a ``size`` crop."""
    return bool(np.all(np.isfinite(extent))) and extent[0] >= -0.5 and extent[1] >= -0.5 \
        and extent[2] <= size - 0.5 and extent[3] <= size - 0.5


@dataclass
class Face:
    """One detected face on its way through the pipeline (``record()`` is its sidecar entry)."""

    index: int
    box: np.ndarray                       # (4,) x0, y0, x1, y1 in the photo
    score: float
    landmarks: np.ndarray                 # (5, 2) in the photo
    status: str = "pending"               # pending -> anonymized | covered
    reason: str | None = None             # why covered
    message: str = ""
    matrix: np.ndarray | None = None      # (2, 3) photo -> crop
    crop: torch.Tensor | None = None      # (S, S, 3) uint8 aligned crop (a quarter of float's bytes)
    mask: torch.Tensor | None = None      # (1, S, S) uint8 {0, 1}
    weight: np.ndarray | None = None      # (S, S) paste weight in [0, 1], from the mask at paste-back
    embedding: torch.Tensor | None = None  # (D,) clustering embedding
    source_latent: torch.Tensor | None = None  # (L,)
    substitute: torch.Tensor | None = None     # (L,) keyed pseudo-identity
    cluster: int | None = None
    result: torch.Tensor | None = None    # (3, S, S) anonymized crop
    region: list[int] | None = None       # [x0, y0, x1, y1) of the pixels this face may change
    residual: dict[str, Any] = field(default_factory=dict)

    def cover(self, reason: str, message: str = "") -> None:
        self.status, self.reason, self.message, self.result = "covered", reason, message, None

    def record(self) -> dict:
        return {"index": self.index, "box": round_values(self.box), "score": round_values(self.score, 5),
                "landmarks": round_values(self.landmarks), "status": self.status, "reason": self.reason,
                "message": self.message, "cluster": self.cluster, "region": self.region,
                "residual_similarity": self.residual.get("similarity"),
                "residual_distance": self.residual.get("distance"),
                "residual_same_person": self.residual.get("same_person")}


@dataclass
class ImageResult:
    """What became of one photo: ``pixels`` (H, W, 3) uint8 to write, or None (never write it)."""

    pixels: np.ndarray | None
    status: str                  # anonymized | covered | no_face | error
    message: str = ""
    faces: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    tag: Any
    pixels: np.ndarray
    faces: list[Face]
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def ready(self) -> bool:
        return all(face.status != "pending" for face in self.faces)


class _Clusters:
    """Online identity clusters: a face joins the most similar cluster whose representative (its
    first face) passes the threshold and that no better-matching face of the same photo took; else
    it opens a new cluster. ``metric`` cosine (similarity >= threshold) or euclidean (distance < threshold)."""

    def __init__(self, threshold: float, metric: str):
        self.threshold, self.metric = float(threshold), metric
        self.representatives: list[torch.Tensor] = []
        self.substitutes: list[torch.Tensor] = []

    def _scores(self, embedding: torch.Tensor) -> torch.Tensor:
        reps = torch.stack(self.representatives).double()
        e = embedding.detach().cpu().double()
        if self.metric == "cosine":
            return torch.nn.functional.cosine_similarity(reps, e[None], dim=-1)
        return -(reps - e[None]).norm(dim=-1)

    def _passes(self, score: float) -> bool:
        return score >= self.threshold if self.metric == "cosine" else -score < self.threshold

    def assign(self, embeddings: Sequence[torch.Tensor], make_substitute: Callable[[int], torch.Tensor]) -> list[int]:
        """One photo's faces: the best-scoring (face, cluster) pairs first, whatever the faces' order
        (in detector order, a stranger that merely passed the threshold took a known person's
        cluster, and so her pseudonym, ahead of her); the faces left open new clusters, in order."""
        chosen: dict[int, int] = {}
        if self.representatives and len(embeddings):
            scores = torch.stack([self._scores(embedding) for embedding in embeddings])  # (faces, clusters)
            for flat in torch.argsort(scores.flatten(), descending=True, stable=True).tolist():
                row, index = divmod(flat, scores.shape[1])
                if row not in chosen and index not in chosen.values() and self._passes(float(scores[row, index])):
                    chosen[row] = index
        assigned = []
        for row, embedding in enumerate(embeddings):
            if row not in chosen:
                self.representatives.append(embedding.detach().cpu())
                self.substitutes.append(make_substitute(row).detach())
                chosen[row] = len(self.representatives) - 1
            assigned.append(chosen[row])
        return assigned


class Anonymizer:
    """Anonymizes photos held in memory; see the package docstring for what happens to a face.

    ``model``: an eval-mode ``ID2Face``; ``image_size``: its S; ``template`` (5, 2): the training
    template at S. ``detector``: callable or None (MTCNN on ``device``). ``audit``: a recognizer
    (``id2face.metrics.recognizers``) or None. ``cluster_by``: None (the model's identity
    encoder, cosine) or a recognizer. ``anonymize_photos(list of (H, W, 3) uint8)`` returns
    ``ImageResult``s; ``process(iterable of (tag, pixels))`` streams ``(tag, ImageResult)`` in order.
    ``pipeline_depth``: photos in flight beside the sampling, which stays in the caller's thread:
    up to that many are detected and aligned ahead in ``detect_workers`` threads and identity-encoded
    in one more (stage 1), and as many pasted back and audited behind (stage 3) in another, each
    thread on a CUDA stream of its own on a GPU (0: every stage in turn, in the caller's thread).
    Same results either way: photos are detected in any order but encoded, clustered, sampled and
    finished in input order. ``stage_seconds``: the seconds each of ``STAGES`` was busy in the last
    ``process`` call (detect: summed over its threads); with the stages in threads the busiest one
    (detect's over its thread count), near the call's time, sets the pace.
    """

    def __init__(self, model, image_size: int, template: np.ndarray, settings: AnonymizeSettings | None = None,
                 detector: Callable | None = None, audit=None, cluster_by=None, device: str | torch.device = "cpu",
                 error_log: Callable[[str], None] | None = None, pipeline_depth: int = 0, detect_workers: int = 1):
        if pipeline_depth < 0 or detect_workers < 1:
            raise UserError(f"pipeline_depth must be >= 0 and detect_workers >= 1, got {pipeline_depth} and "
                            f"{detect_workers}")
        self.pipeline_depth, self.detect_workers = int(pipeline_depth), int(detect_workers)
        self._stage_lock = threading.Lock()
        self.settings = settings or AnonymizeSettings()
        self.settings.check()
        self.model = model
        self.size = int(image_size)
        self.template = np.asarray(template, dtype=np.float64)
        self.device = torch.device(device)
        self.detector = detector
        self.audit = audit
        self.cluster_by = cluster_by
        self.error_log = error_log
        self.seed = self.settings.seed if self.settings.seed is not None else secrets.randbits(62)
        self.generator = torch.Generator(self.device).manual_seed(self.seed)
        if self.settings.cover_if_recognized and getattr(audit, "threshold", None) is None:
            # Without a same-person decision the flag covered nothing, silently.
            what = "no audit recognizer" if audit is None else f"the audit recognizer ({audit.description}) has none"
            raise UserError(f"--cover-if-recognized needs an audit recognizer that decides 'same person' (dlib; an "
                            f"encoder judge with a `threshold` param); {what}")
        template_mask = inner_face_mask(self.template, self.size)
        if template_mask.sum() == 0:
            raise UserError("the crop template has coinciding eyes: no identity region")
        if not inside_crop(inner_face_extent(self.template), self.size):
            # Every face's brows or lower lip would lie past its crop: neither regenerated nor covered.
            raise UserError("the crop template puts the inner face (brows to lower lip) "
                            f"past the {self.size} px crop: faces would keep part of it; use a --face-scale "
                            f"of at most {MAX_FACE_SCALE:g}")
        self.template_mask = template_mask
        self.keyed_mapping = None
        self.clusters = None
        self._cell_counts: dict[bytes, int] = {}
        self._searched_batch_sizes: set[int] = set()
        self.stage_seconds = dict.fromkeys(STAGES, 0.0)
        from ..components.id_mapping import KeyedIdentityMapping

        if self.settings.key is not None:
            mapping = getattr(model, "id_mapping", None)
            self.keyed_mapping = mapping if isinstance(mapping, KeyedIdentityMapping) else KeyedIdentityMapping()
            metric = "cosine" if cluster_by is None else getattr(cluster_by, "metric", "cosine")
            threshold = self.settings.cluster_threshold
            if threshold is None:
                native = None if cluster_by is None else getattr(cluster_by, "threshold", None)
                threshold = native if native is not None else 0.5
            if not (-1 <= threshold <= 1 if metric == "cosine" else 0 < threshold < math.inf):
                raise UserError(f"--cluster-threshold {threshold} groups no faces by {metric} "
                                f"({'a similarity in [-1, 1]' if metric == 'cosine' else 'a distance > 0'})")
            self.clusters = _Clusters(threshold, metric)
        elif isinstance(getattr(model, "id_mapping", None), KeyedIdentityMapping):
            raise UserError("this checkpoint's identity mapping is `keyed`: pass --key")

    # -- public -----------------------------------------------------------------------------
    def anonymize_photos(self, photos: Sequence[np.ndarray]) -> list[ImageResult]:
        return [result for _, result in self.process(enumerate(photos))]

    def process(self, items: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, ImageResult]]:
        """Stream photos through detection, batched sampling and paste-back, in input order."""
        pending: deque[_Pending] = deque()
        finishing: deque[tuple[Any, Future]] = deque()
        queue: list[Face] = []
        batch, depth = self.settings.batch_size, self.pipeline_depth
        self.stage_seconds = dict.fromkeys(STAGES, 0.0)
        self.detector = self.detector_fn  # built here, once, not by racing detect threads
        with StageWorker(depth > 0, self.device, "detect", threads=self.detect_workers) as detector, \
                StageWorker(depth > 0, self.device, "encode") as encoder, \
                StageWorker(depth > 0, self.device, "finish") as finisher:

            def prepare(item) -> Future:  # detected in any order, encoded (so clustered) in input order
                return encoder.submit(self._encode_item, detector.submit(self._locate_item, item))

            for _, prepared in ahead(prepare, items, depth):
                entry = prepared.result()
                pending.append(entry)
                queue.extend(face for face in entry.faces if face.status == "pending")
                while len(queue) >= batch:
                    with self._busy("sample"):
                        self._sample(queue[:batch])
                    queue = queue[batch:]
                yield from self._flush(pending, finisher, finishing, keep=depth)
            if queue:
                with self._busy("sample"):
                    self._sample(queue, pad_to=batch if self.settings.pad_last_batch else None)
            yield from self._flush(pending, finisher, finishing, keep=0)

    @contextmanager
    def _busy(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._stage_lock:  # detect's threads add to one key
                self.stage_seconds[stage] += time.perf_counter() - started

    @property
    def detector_fn(self) -> Callable:
        if self.detector is None:
            from ..data.prepare import FaceDetector

            self.detector = FaceDetector(max_side=DETECT_MAX_SIDE, device=str(self.device))
        return self.detector

    # -- stage 1: detect and align (any order), embed and cluster (in order) -----------------
    def _locate_item(self, item: tuple[Any, np.ndarray]) -> _Pending:
        with self._busy("detect"):
            return self._locate(*item)

    def _encode_item(self, located: Future) -> _Pending:
        entry = located.result()
        with self._busy("encode"):
            self._encode(entry)
        return entry

    def _locate(self, tag, pixels: np.ndarray) -> _Pending:
        pixels = np.ascontiguousarray(pixels)
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            return _Pending(tag, pixels, [],
                            error=f"expected (H, W, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
        try:
            boxes, scores, points = self.detector_fn(pixels)
        except ImageReadError as err:  # smaller than the detector's minimum face: nothing to find
            return _Pending(tag, pixels, [], notes=[f"no detection possible: {err}"])
        except Exception as err:  # noqa: BLE001 - unknown faces: the photo must not be written
            self._log(tag, "detection", err)
            return _Pending(tag, pixels, [], error=f"face detection failed: {describe(err)}")
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        points = np.asarray(points, dtype=np.float64).reshape(-1, 5, 2)
        faces = [Face(index, boxes[k], float(scores[k]), points[k])
                 for index, k in enumerate(np.flatnonzero(scores >= self.settings.min_score))]
        for face in faces:
            try:
                self._align(pixels, face)
            except Exception as err:  # noqa: BLE001 - a face we cannot prepare is covered, not skipped
                self._log(tag, "alignment", err)
                face.cover("alignment_failed", describe(err))
        return _Pending(tag, pixels, faces)

    def _encode(self, entry: _Pending) -> None:
        live = [face for face in entry.faces if face.status == "pending"]
        if live:
            try:
                self._embed(entry.pixels, live)
            except Exception as err:  # noqa: BLE001
                self._log(entry.tag, "identity encoding", err)
                for face in live:
                    face.cover("encoder_error", describe(err))

    def _align(self, pixels: np.ndarray, face: Face) -> None:
        x0, y0, x1, y1 = face.box
        if not (np.isfinite(face.box).all() and np.isfinite(face.landmarks).all()):
            face.cover("alignment_failed", "non-finite box or landmarks")
            return
        if min(x1 - x0, y1 - y0) < self.settings.min_face_size:
            face.cover("too_small", f"box {x1 - x0:.0f}x{y1 - y0:.0f} px < {self.settings.min_face_size:g} px")
            return
        try:
            face.matrix = estimate_similarity(face.landmarks, self.template)
            crop = crop_face(pixels, face.matrix, self.size)
        except Exception as err:  # noqa: BLE001 - degenerate landmarks
            face.matrix = None
            face.cover("alignment_failed", describe(err))
            return
        points = transform_points(face.landmarks, face.matrix)
        if not inside_crop(inner_face_extent(points), self.size):
            # Its own proportions put part of its inner face past the crop, where nothing is regenerated.
            face.cover("identity_region_outside_crop", "the inner face reaches past the aligned crop")
            return
        face.crop = torch.from_numpy(np.array(crop, dtype=np.uint8))  # a copy: crop may be read-only
        own = inner_face_mask(points, self.size)
        mask = grow_mask(np.maximum(self.template_mask, own), self.settings.mask_margin * self.size)
        face.mask = torch.from_numpy(mask.astype(np.uint8))[None]

    @torch.no_grad()
    def _embed(self, pixels: np.ndarray, faces: list[Face]) -> None:
        crops = self._device_crops(faces)
        encoded = self.model.identity_embedding(crops)
        # What stage 1 hands to sampling lives on the host: sampling may run on another thread and
        # another CUDA stream (pipeline_depth).
        latents = self.model.id_vae.encode(encoded).float()
        for face, latent in zip(faces, latents.cpu()):
            face.source_latent = latent
        if self.clusters is None:
            return
        if self.cluster_by is None:
            embeddings = encoded.float()
        else:
            crops_for_judge = torch.stack([self._audit_crop(pixels, face) for face in faces]).to(self.device)
            embeddings = self.cluster_by(crops_for_judge)
        embeddings = embeddings.float().cpu()

        def substitute(row: int) -> torch.Tensor:
            return self._keyed_substitute(latents[row:row + 1])

        assigned = self.clusters.assign(list(embeddings), substitute)
        for face, embedding, cluster in zip(faces, embeddings, assigned):
            face.embedding, face.cluster = embedding, cluster
            face.substitute = self.clusters.substitutes[cluster].cpu()

    def _keyed_substitute(self, representative: torch.Tensor) -> torch.Tensor:
        """The pseudo-identity (L,) of a new cluster whose representative latent is (1, L).

        The first cluster in a sign-LSH cell gets exactly the keyed identity mapping's output; a
        later cluster in the same cell (another person whose latent the mapping cannot tell apart)
        gets a draw seeded by HMAC(key, cell, its rank in the cell), so distinct persons never share
        a substitute within a run.
        """
        from ..components.id_mapping import orthogonalize

        prior = partial(self.model.id_vae.sample_prior, device=self.device)
        cell = bytes(self.keyed_mapping.cells(representative, self.settings.key)[0].to(torch.uint8).tolist())
        rank = self._cell_counts.get(cell, 0)
        self._cell_counts[cell] = rank + 1
        if rank == 0:
            return self.keyed_mapping(representative, prior=prior, key=self.settings.key)[0]
        key = self.settings.key if isinstance(self.settings.key, bytes) else str(self.settings.key).encode("utf-8")
        digest = hmac.new(key, b"id2face/anonymize/cell/" + cell + b"/" + str(rank).encode(), hashlib.sha256).digest()
        draw = prior(1, torch.Generator().manual_seed(int.from_bytes(digest[:8], "little")))
        return orthogonalize(draw.to(representative), representative)[0]

    def _device_crops(self, faces: list[Face]) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] on the device from the faces' uint8 crops: a quarter of the bytes
        of float crops to stack and copy (between two batches, with the GPU waiting)."""
        pixels = torch.stack([face.crop for face in faces]).to(self.device)
        return (pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()

    # -- stage 2: batched sampling -----------------------------------------------------------
    @torch.no_grad()
    def _generate(self, faces: list[Face], pad_to: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images (N, 3, S, S) clamped to [-1, 1], finite (N,), identity change (N,)) of ``faces``,
        on the host. The checks run batched on the device before the one copy back: per face on the
        host they took ~0.1-0.4 s a batch of 64 (2 slow cores), with the GPU idle in between."""
        # A short batch padded with repeats of its last face: under torch.compile a new batch size
        # recompiles the UNet (minutes at SD size), a repeat costs one batch's sampling at most.
        rows = faces + faces[-1:] * (pad_to - len(faces)) if pad_to else faces
        crops = self._device_crops(rows)
        masks = torch.stack([face.mask for face in rows]).to(self.device).float()
        # Only sampling runs in reduced precision: keyed substitutes come from _embed's fp32 latents,
        # so a person's pseudonym does not depend on the precision.
        with autocast(self.settings.precision, self.device), self._convolution_search(len(rows)):
            out = self._generate_batch(rows, crops, masks)
        expected = (len(rows), 3, self.size, self.size)
        if not torch.is_tensor(out) or tuple(out.shape) != expected:
            raise RuntimeError(f"the model returned {tuple(out.shape) if torch.is_tensor(out) else type(out)}, "
                               f"expected {expected}")
        n = len(faces)
        out, crops, masks = out[:n].detach().float(), crops[:n], masks[:n]
        finite = torch.isfinite(out).flatten(1).all(1)
        change = ((out - crops).abs() * masks).flatten(1).sum(1) / (3 * masks.flatten(1).sum(1)).clamp_min(1)
        return out.clamp(-1, 1).cpu(), finite.cpu(), change.cpu()

    @contextmanager
    def _convolution_search(self, batch_size: int):
        """With ``settings.cudnn_benchmark``: cuDNN's algorithm search (``torch.backends.cudnn.benchmark``)
        for the first call at each batch size only. The plans it picks stay in cuDNN's cache, which
        later calls read whatever the flag; the flag is process-wide, so the other threads' convolutions
        (MTCNN's pyramid: new shapes with every photo size) are searched during that call only."""
        if not self.settings.cudnn_benchmark or batch_size in self._searched_batch_sizes:
            yield
            return
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before
            self._searched_batch_sizes.add(batch_size)

    def _generate_batch(self, faces: list[Face], crops: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if self.clusters is None:
            return self.model.anonymize(crops, masks, generator=self.generator,
                                        num_inference_steps=self.settings.steps)
        substitutes = torch.stack([face.substitute for face in faces]).to(self.device)
        sources = torch.stack([face.source_latent for face in faces]).to(self.device)
        return self.model.generate(crops, masks, substitutes, source_latent=sources, generator=self.generator,
                                   num_inference_steps=self.settings.steps)

    def _sample(self, faces: list[Face], pad_to: int | None = None) -> None:
        """Anonymize ``faces`` in one call (padded to ``pad_to`` faces); on failure split the batch
        and retry the halves, unpadded, so one bad face (or a batch too large for memory) costs only
        itself: a single face that fails is covered."""
        try:
            images, finite, change = self._generate(faces, pad_to)
        except Exception as err:  # noqa: BLE001 - fail closed, whatever went wrong
            out_of_memory = _is_out_of_memory(err)
            if out_of_memory and self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(faces) > 1:
                half = len(faces) // 2
                self._sample(faces[:half])
                self._sample(faces[half:])
                return
            self._log(f"face {faces[0].index}", "sampling", err)
            faces[0].cover("out_of_memory" if out_of_memory else "sampling_error", describe(err))
            return
        for face, image, is_finite, moved in zip(faces, images, finite.tolist(), change.tolist()):
            if not is_finite:
                face.cover("non_finite", "the model returned NaN or infinite values")
            elif moved < MIN_IDENTITY_CHANGE:
                face.cover("unchanged", f"the model left the identity region as it was (mean change {moved:.4f})")
            else:
                face.result, face.status = image, "anonymized"

    # -- stage 3: paste back, cover, audit ---------------------------------------------------
    def _flush(self, pending: deque, finisher: "StageWorker", finishing: deque,
               keep: int) -> Iterator[tuple[Any, ImageResult]]:
        """Hand the photos whose faces are all sampled to stage 3, in order; yield finished ones in
        order until at most ``keep`` are in flight."""
        while pending and pending[0].ready():
            entry = pending.popleft()
            finishing.append((entry.tag, finisher.submit(self._finish_or_error, entry)))
        while finishing and (len(finishing) > keep or finishing[0][1].done()):
            tag, future = finishing.popleft()
            yield tag, future.result()

    def _finish_or_error(self, entry: _Pending) -> ImageResult:
        with self._busy("finish"):
            try:
                return self._finish(entry)
            except Exception as err:  # noqa: BLE001 - never write a photo we could not finish
                self._log(entry.tag, "finish", err)
                return ImageResult(None, "error", f"internal error: {describe(err)}",
                                   [face.record() for face in entry.faces], entry.notes)

    def _finish(self, entry: _Pending) -> ImageResult:
        if entry.error is not None:
            return ImageResult(None, "error", entry.error, [f.record() for f in entry.faces], entry.notes)
        original = entry.pixels
        out = original.copy()
        for face in entry.faces:
            try:
                # Feathered here, not at alignment: a distance transform at S x S (8-13 ms a face at
                # 512 px on the CI machine) is better spent in this thread than in detection's.
                if face.mask is not None:
                    face.weight = feathered_mask(face.mask[0].numpy(), self.settings.feather * self.size)
                if face.status == "anonymized":
                    face.region = self._paste(out, face)
                    if face.region is None:
                        raise RuntimeError("the anonymized crop maps to no pixel of the photo")
                else:
                    face.region = self._cover(out, original, face)
            except Exception as err:  # noqa: BLE001 - cover the plain box, or write nothing
                self._log(entry.tag, "paste-back", err)
                try:
                    face.cover("paste_error", describe(err))
                    face.weight = None
                    face.region = self._cover(out, original, face, mode="fill")
                except Exception as again:  # noqa: BLE001
                    self._log(entry.tag, "cover", again)
                    return ImageResult(None, "error", f"cannot cover face {face.index}: {describe(again)}",
                                       [f.record() for f in entry.faces], entry.notes)
        notes = list(entry.notes)
        if self.audit is not None and entry.faces:
            audited = True
            try:
                self._measure(original, out, entry.faces)
            except Exception as err:  # noqa: BLE001 - the audit must not lose the photo
                self._log(entry.tag, "audit", err)
                notes.append(f"audit failed: {describe(err)}")
                audited = False
            if self.settings.cover_if_recognized:
                # Fail closed: a face the audit could not judge is covered as one it still recognizes.
                reason, message = ("still_recognized", "the audit recognizer still matches the source") if audited \
                    else ("audit_failed", "the audit could not judge it (--cover-if-recognized)")
                recognized = [f for f in entry.faces if f.status == "anonymized"
                              and (not audited or f.residual.get("same_person") is not False)]
                for face in recognized:
                    face.cover(reason, message)
                    face.region = union_box(face.region, self._cover(out, original, face))
                if recognized and audited:
                    self._measure(original, out, recognized)
        if not entry.faces:
            status = "no_face"
        elif any(face.status == "covered" for face in entry.faces):
            status = "covered"
        else:
            status = "anonymized"
        return ImageResult(out, status, "", [face.record() for face in entry.faces], notes)

    def _paste(self, out: np.ndarray, face: Face) -> list[int] | None:
        """Blend the anonymized crop into ``out`` where its weight is > 0; returns the region."""
        rgb = (face.result + 1.0) * 127.5
        return blend_crop(out, torch.cat([rgb, torch.from_numpy(face.weight)[None]]), face.matrix)

    def _cover(self, out: np.ndarray, original: np.ndarray, face: Face, mode: str | None = None) -> list[int] | None:
        """Fill (or blur: ``mode``, default the settings') an ellipse around the box united with the
        feathered identity region."""
        height, width = out.shape[:2]
        x0, y0, x1, y1 = (float(v) for v in face.box)
        if not np.isfinite(face.box).all():  # no box: every landmark we have, else the whole photo
            finite = face.landmarks[np.isfinite(face.landmarks).all(1)]
            if len(finite):
                (x0, y0), (x1, y1) = finite.min(0) - 8, finite.max(0) + 8
            else:
                x0, y0, x1, y1 = 0, 0, width - 1, height - 1
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        scale = self.settings.cover_scale / 2
        rx, ry = max(x1 - x0, 2.0) * scale, max(y1 - y0, 2.0) * scale
        band = max(2.0, 0.15 * max(rx, ry))
        bx0, by0 = max(int(math.floor(cx - rx - band)), 0), max(int(math.floor(cy - ry - band)), 0)
        bx1, by1 = min(int(math.ceil(cx + rx + band)) + 1, width), min(int(math.ceil(cy + ry + band)) + 1, height)
        region = [bx0, by0, bx1, by1]
        if face.weight is not None and face.matrix is not None:
            identity_region = crop_weight_region(face.weight, face.matrix, (height, width))
            if identity_region is not None:
                region = union_box(region, identity_region)
        rx0, ry0, rx1, ry1 = region
        if rx1 <= rx0 or ry1 <= ry0:
            return None
        ys, xs = np.mgrid[ry0:ry1, rx0:rx1].astype(np.float64)
        radius = np.sqrt(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2)
        # distance outside the ellipse, approximately in pixels along the smaller axis
        outside = np.maximum(radius - 1.0, 0.0) * min(rx, ry)
        alpha = np.clip(1.0 - outside / band, 0.0, 1.0).astype(np.float32)
        if face.weight is not None and face.matrix is not None:
            warped = warp_weight(face.weight, face.matrix, region)
            alpha = np.maximum(alpha, warped)
        source = original[ry0:ry1, rx0:rx1].astype(np.float32)
        if (mode or self.settings.cover) == "blur":
            from PIL import Image, ImageFilter

            sigma = float(max(4.0, 0.25 * max(x1 - x0, y1 - y0)))
            margin = int(3 * sigma)
            mx0, my0 = max(rx0 - margin, 0), max(ry0 - margin, 0)
            mx1, my1 = min(rx1 + margin, width), min(ry1 + margin, height)
            blurred = np.asarray(Image.fromarray(original[my0:my1, mx0:mx1]).filter(ImageFilter.GaussianBlur(sigma)))
            content = blurred[ry0 - my0:ry1 - my0, rx0 - mx0:rx1 - mx0].astype(np.float32)
        else:
            ring = alpha == 0
            colour = source[ring].mean(0) if ring.any() else np.full(3, 128.0, np.float32)
            content = np.broadcast_to(colour, source.shape).astype(np.float32)
        current = out[ry0:ry1, rx0:rx1].astype(np.float32)
        blended = current * (1 - alpha[..., None]) + content * alpha[..., None]
        out[ry0:ry1, rx0:rx1] = np.where(alpha[..., None] > 0, np.clip(np.rint(blended), 0, 255),
                                         current).astype(np.uint8)
        return [int(v) for v in region]

    def _audit_crop(self, photo: np.ndarray, face: Face) -> torch.Tensor:
        size = self.settings.audit_size
        matrix = estimate_similarity(face.landmarks, scale_points(self.template, self.size, size))
        crop = crop_face(photo, matrix, size)
        return torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 127.5 - 1.0

    @torch.no_grad()
    def _measure(self, original: np.ndarray, out: np.ndarray, faces: list[Face]) -> None:
        """Residual identity of each face: the audit recognizer on aligned crops of the source photo
        and of the output photo (covered faces too)."""
        measurable = []
        for face in faces:
            try:
                measurable.append((face, self._audit_crop(original, face), self._audit_crop(out, face)))
            except Exception:  # noqa: BLE001 - degenerate landmarks: nothing to align, nothing to measure
                face.residual = {}
        if not measurable:
            return
        before = torch.stack([m[1] for m in measurable]).to(self.device)
        after = torch.stack([m[2] for m in measurable]).to(self.device)
        embeddings = self.audit(torch.cat([before, after])).float()
        source, result = embeddings[:len(measurable)], embeddings[len(measurable):]
        similarity = torch.nn.functional.cosine_similarity(source, result, dim=-1)
        distance = self.audit.distance(source, result)
        same = self.audit.same_person(source, result) if getattr(self.audit, "threshold", None) is not None else None
        for row, (face, _, _) in enumerate(measurable):
            face.residual = {"similarity": round(float(similarity[row]), 5), "distance": round(float(distance[row]), 5),
                             "same_person": None if same is None else bool(same[row])}

    def _log(self, where, stage: str, err: BaseException) -> None:
        if self.error_log is not None:
            self.error_log(f"--- {where}: {stage}\n{''.join(traceback.format_exception(err))}\n")


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or \
        "out of memory" in str(err).lower()


def round_values(values, digits: int = 2):
    if np.ndim(values) == 0:
        return round(float(values), digits)
    return np.round(np.asarray(values, dtype=np.float64), digits).tolist()


def build_audit_recognizer(node, cfg, model=None, dlib_workers: int | None = None):
    """The audit/cluster recognizer for a name (``dlib``, ``oracle``, ``encoder``: the model's own
    identity encoder: ``model``'s loaded one if given, else one built from ``cfg``), a
    ``{name, params}`` node, or None/``none``. ``dlib_workers``: a dlib judge's worker processes,
    unless its node sets ``workers`` itself. Pass ``model``: a checkpoint from another machine
    builds its encoder without the weight file and loads the weights from its state
    (``id2face.inference.module_for_checkpoint``), so ``cfg`` alone would give an untrained judge."""
    if node is None or node == "none":
        return None
    from omegaconf import OmegaConf

    from ..metrics.recognizers import build_recognizer

    if dlib_workers is not None and (node == "dlib" or (isinstance(node, Mapping) and node.get("name") == "dlib")):
        params = {} if node == "dlib" else dict(node.get("params") or {})
        node = {"name": "dlib", "params": {"workers": dlib_workers, **params}}
    if node == "encoder":
        if model is not None:
            from ..metrics.recognizers import EncoderRecognizer

            return EncoderRecognizer(model.identity_encoder)
        node = {"name": "encoder", "params": {"encoder": OmegaConf.to_container(cfg.model.identity_encoder,
                                                                                 resolve=True)}}
    return build_recognizer(node, data=cfg.data)
