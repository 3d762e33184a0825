"""Any timm image model as a frozen identity encoder (pooled features + a fixed projection)."""
from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from ...errors import MissingWeightsError, UserError
from ...registry import IDENTITY_ENCODERS
from .base import IdentityEncoder, load_matching_state_dict, load_state_dict_file

TIMM_SOURCE = (
    "a timm model's state_dict: torch.save(model.state_dict(), path), or the model.safetensors / "
    "pytorch_model.bin of a timm/<model_name> repository on the Hugging Face hub"
)
PROJECTION_SEED = 0


@IDENTITY_ENCODERS.register("timm")
class TimmEncoder(IdentityEncoder):
    """A timm backbone (``pretrained=False``; weights only from a local file) + linear projection.

    Input: RGB NCHW in [-1, 1], any size (resized to ``input_size``), normalised with the model's
    own ``pretrained_cfg`` mean/std. Output: unit embeddings (N, embed_dim).

    ``weights``: optional timm state dict (``.safetensors`` or ``torch.save``) for the backbone;
    its classifier keys are dropped. Without it the backbone is random: a structural / throughput
    stand-in, not a recogniser. The projection pooled-features -> ``embed_dim`` is a Gaussian
    random projection drawn from a fixed seed: it is never trained, so every process, resumed run
    and evaluation must rebuild the same one (``train-encoder`` trains and writes the backbone
    only). ``model_kwargs`` go to ``timm.create_model`` (e.g. ``img_size: 112`` for a ViT).
    """

    def __init__(self, model_name: str = "resnet18", embed_dim: int = 512, input_size: int = 112,
                 weights: str | None = None, model_kwargs: dict | None = None):
        super().__init__()
        import timm

        if weights is not None and not Path(weights).is_file():
            raise MissingWeightsError(f"timm {model_name}", weights, TIMM_SOURCE)
        self.model_name, self.embed_dim, self.input_size = model_name, int(embed_dim), int(input_size)
        try:
            self.backbone = timm.create_model(model_name, pretrained=False, num_classes=0, **(model_kwargs or {}))
        except RuntimeError as err:
            if not str(err).startswith("Unknown model"):
                raise
            close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
            raise UserError(f"unknown timm model '{model_name}'"
                            + (f"; close: {', '.join(close)}" if close else "; see timm.list_models()")) from None
        except TypeError as err:
            raise UserError(f"timm model '{model_name}' rejects model_kwargs {model_kwargs}: {err}") from None
        cfg = self.backbone.pretrained_cfg
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        if weights is not None:
            state = _read_state(weights, model_name)
            classifiers = cfg.get("classifier") or ()
            classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
            state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifiers)}
            load_matching_state_dict(self.backbone, state, f"timm {model_name}", weights)
        self.backbone.eval()
        feature_dim = self._feature_dim()
        self.projection = nn.Linear(feature_dim, self.embed_dim, bias=False)
        generator = torch.Generator().manual_seed(PROJECTION_SEED)
        with torch.no_grad():
            self.projection.weight.copy_(
                torch.randn(self.embed_dim, feature_dim, generator=generator) / self.embed_dim ** 0.5
            )
        self.freeze()

    def _feature_dim(self) -> int:
        """Pooled feature width, measured (``num_features`` is not it for every timm head), which
        also checks at build time that the model accepts ``input_size`` images."""
        probe = torch.zeros(1, 3, self.input_size, self.input_size)
        try:
            with torch.no_grad():
                features = self.backbone(probe)
        except (RuntimeError, AssertionError, ValueError) as err:
            raise UserError(f"timm model '{self.model_name}' does not run on {self.input_size} px input "
                            f"({str(err).splitlines()[0]}); change input_size or model_kwargs") from None
        if features.ndim != 2:
            raise UserError(f"timm model '{self.model_name}' gives features of shape "
                            f"{tuple(features.shape)}, not pooled (N, C) vectors")
        return features.shape[1]

    def weights_module(self) -> nn.Module:
        # The file is a timm state dict of the backbone; the projection is rebuilt from its seed, so
        # it is neither in the file nor trained by train-encoder (a trained one would be lost on reload).
        return self.backbone

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(x))


def _read_state(path, model_name: str) -> dict:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise UserError(f"timm {model_name} weights at {path} cannot be read as safetensors: {err}") from None
    return load_state_dict_file(path, f"timm {model_name}", TIMM_SOURCE)
