"""Evaluation metrics (torchmetrics ``Metric``s, DDP-synced) and evaluation recognizers.

Public API: ``IdentityRetrieval``, ``VerificationRate``, ``build_fid`` / ``FrechetDistance``,
``IdentityDiversity``, ``AttributePreservation``, ``LandmarkAttributeEstimator``, ``landmark_pose``,
``landmark_expression``, ``Recognizer``, ``build_recognizer``. Attributes load their module on first
access, so ``import id2face.metrics`` (done by the recognizer registry) stays free of torchmetrics.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "IdentityRetrieval": "identity",
    "VerificationRate": "identity",
    "retrieval_ranks": "identity",
    "build_fid": "fid",
    "FrechetDistance": "fid",
    "IdentityDiversity": "diversity",
    "pairwise_identity_distance": "diversity",
    "AttributePreservation": "attributes",
    "LandmarkAttributeEstimator": "attributes",
    "MTCNNLandmarks": "attributes",
    "landmark_pose": "attributes",
    "landmark_expression": "attributes",
    "Recognizer": "recognizers",
    "build_recognizer": "recognizers",
    "OracleAttributeEstimator": "oracle",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
