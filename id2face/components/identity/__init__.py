"""Identity encoders: frozen, differentiable w.r.t. the input, unit-norm embeddings.

Importing this package registers every encoder in ``IDENTITY_ENCODERS``.
"""
from .base import IdentityEncoder, load_state_dict_file  # noqa: F401
from . import facenet  # noqa: F401
from . import arcface  # noqa: F401
from . import timm_encoder  # noqa: F401
from . import tiny  # noqa: F401
