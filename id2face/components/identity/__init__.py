"""Identity encoders: frozen, differentiable w.r.t. the input, unit-norm embeddings.

Importing this package registers every encoder in ``IDENTITY_ENCODERS``.
"""
from .base import IdentityEncoder, load_state_dict_file  # noqa: F401
