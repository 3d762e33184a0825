"""FaceNet identity encoder: facenet-pytorch's InceptionResnetV1 loaded from a local file."""
from __future__ import annotations


import torch
from torch import nn

from ...errors import UserError
from ...registry import IDENTITY_ENCODERS
from .base import IdentityEncoder, load_matching_state_dict, load_state_dict_file, require_weights

FACENET_SOURCE = (
    "the facenet-pytorch GitHub releases (v2.2.9: 20180402-114759-vggface2.pt, "
    "20180408-102900-casia-webface.pt)"
)
# Size of the classifier stored in each released file; None: a file saved without `logits.*`.
FACENET_LOGITS_CLASSES = {"vggface2": 8631, "casia-webface": 10575, None: None}


@IDENTITY_ENCODERS.register("facenet")
class FaceNetEncoder(IdentityEncoder):
    """FaceNet (InceptionResnetV1, 512-d) from facenet-pytorch, weights from a local file.

    Input: RGB NCHW in [-1, 1], any size (resized to 160 px). facenet-pytorch's
    ``fixed_image_standardization`` is ``(255 * x01 - 127.5) / 128``, i.e. mean 0.5 and
    std 128/255 on [0, 1] images. Output: unit embeddings (N, 512).

    ``weights``: a ``torch.save`` state dict as released by facenet-pytorch (it includes the
    training classifier ``logits.*``, whose size ``pretrained_on`` fixes so the file loads
    strictly; ``pretrained_on: null`` for a file without it). The classifier is never used.
    ``weights: null`` is an error unless ``allow_random_init: true``.
    """

    embed_dim = 512
    input_size = 160
    mean = (0.5, 0.5, 0.5)
    std = (128 / 255, 128 / 255, 128 / 255)

    def __init__(self, weights: str | None = None, pretrained_on: str | None = "vggface2",
                 allow_random_init: bool = False):
        super().__init__()
        if pretrained_on not in FACENET_LOGITS_CLASSES:
            raise UserError(f"facenet pretrained_on must be one of vggface2, casia-webface, null; "
                            f"got {pretrained_on!r}")
        require_weights(weights, allow_random_init, "facenet", FACENET_SOURCE)
        from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

        # pretrained=None: facenet-pytorch would otherwise download into the torch cache.
        self.net = InceptionResnetV1(pretrained=None, classify=False)
        num_classes = FACENET_LOGITS_CLASSES[pretrained_on]
        if num_classes is not None:
            self.net.logits = nn.Linear(512, num_classes)
        if weights is not None:
            state = load_state_dict_file(weights, "facenet", FACENET_SOURCE)
            load_matching_state_dict(self.net, state, "facenet", weights, _logits_hint(state, pretrained_on))
        self.freeze()

    def weights_module(self) -> nn.Module:
        return self.net  # the file is a facenet-pytorch state dict: InceptionResnetV1's own keys, ``logits.*`` included

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # classify=False: the L2-normalised 512-d bottleneck, logits unused


def _logits_hint(state: dict, pretrained_on: str | None) -> str:
    """Name the right ``pretrained_on`` when only the classifier size is off."""
    if "last_bn.weight" not in state:  # not an InceptionResnetV1 file at all
        return ""
    rows = state.get("logits.weight")
    found = None if rows is None else rows.shape[0]
    if found == FACENET_LOGITS_CLASSES[pretrained_on]:
        return ""
    for name, classes in FACENET_LOGITS_CLASSES.items():
        if classes == found:
            return f" (the file's classifier fits pretrained_on: {name or 'null'})"
    return f" (the file's classifier has {found} classes, which no facenet-pytorch release has)"
