"""FID between original and anonymized faces: torchmetrics' ``FrechetInceptionDistance``.

``build_fid(weights=PATH)`` uses the standard FID Inception-v3 (torch-fidelity's
``pt_inception-2015-12-05`` weights, read from a local file; nothing is downloaded).
``build_fid(feature_extractor=module)`` uses any ``nn.Module`` mapping images to (N, F) features
with an int attribute ``num_features`` (tests and SynthFaces use a small one).

Input convention of ``FrechetDistance.update(images, real)``: RGB NCHW float in [-1, 1], like every
id2face image. Inception receives them as uint8 [0, 255], rounded, so an image read from 8-bit pixels
reaches it with its own levels; a custom extractor receives the [-1, 1] floats unchanged, so any id2face
identity encoder can serve as one.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ..errors import MissingWeightsError, UserError

INCEPTION_SOURCE = ("torch-fidelity's FID Inception-v3 release (pt_inception-2015-12-05, file "
                    "weights-inception-2015-12-05-6726825d.pth from github.com/toshas/torch-fidelity/releases)")
INCEPTION_FEATURES = (64, 192, 768, 2048)


class FrechetDistance(FrechetInceptionDistance):
    """``FrechetInceptionDistance`` that takes id2face images ([-1, 1] floats) and states its convention.

    ``update(images, real)``; ``compute()`` -> scalar FID. ``convention`` is a one-line description
    for tables (feature extractor and dimension).
    """

    convention: str = ""

    def update(self, images: Tensor, real: bool) -> None:  # type: ignore[override]
        if self.used_custom_model:
            super().update(images, real=real)
        else:  # rounded: torchmetrics' normalize=True truncates, a level lower for a quarter of them
            super().update(((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), real=real)


def build_fid(weights: str | Path | None = None, feature_extractor: nn.Module | None = None,
              feature: int = 2048, **kwargs) -> FrechetDistance:
    """FID metric from a local Inception file or a custom feature module (exactly one of the two).

    ``feature`` picks the Inception layer (64, 192, 768 or 2048 = pool3, the standard); extra
    keyword arguments go to torchmetrics (``reset_real_features``, ``sync_on_compute``, ...).
    """
    if (weights is None) == (feature_extractor is None):
        raise UserError("build_fid needs exactly one of weights (local Inception file) or feature_extractor; "
                        f"set eval.fid.weights to the Inception file: {INCEPTION_SOURCE}")
    if feature_extractor is not None:
        if not isinstance(getattr(feature_extractor, "num_features", None), int):
            raise UserError(f"FID feature extractor {type(feature_extractor).__name__} needs an int attribute "
                            "`num_features` (the feature dimension)")
        metric = FrechetDistance(feature=feature_extractor, normalize=False, **kwargs)
        metric.convention = (f"FID on {type(feature_extractor).__name__} features "
                             f"({feature_extractor.num_features}-d), real vs anonymized")
        return metric
    if feature not in INCEPTION_FEATURES:
        raise UserError(f"FID Inception feature must be one of {INCEPTION_FEATURES}, got {feature}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise MissingWeightsError("FID Inception-v3", path, INCEPTION_SOURCE)
    try:
        metric = FrechetDistance(feature=feature, normalize=False, feature_extractor_weights_path=str(path), **kwargs)
    except ModuleNotFoundError as err:  # torch-fidelity absent
        raise UserError(f"FID with Inception weights needs torch-fidelity: {err}") from None
    except (RuntimeError, KeyError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"FID Inception weights at {path} do not load ({first}); expected {INCEPTION_SOURCE}") from None
    metric.convention = (f"FID on Inception-v3 {'pool3 ' if feature == 2048 else ''}{feature}-d features "
                         "(torch-fidelity pt_inception-2015-12-05), real vs anonymized")
    return metric
