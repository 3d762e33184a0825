"""Diversity: how different the K anonymizations of one face are, as identities."""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from .identity import _check_metric


def pairwise_identity_distance(embeddings: Tensor, metric: str = "cosine") -> Tensor:
    """(N, K, D) -> (N,) mean distance over the K(K-1)/2 pairs of each face's K embeddings.

    Distance = 1 - cosine similarity (``metric="cosine"``, in [0, 2]) or Euclidean distance.
    """
    n, k, _ = embeddings.shape
    if k < 2:
        raise ValueError("diversity needs at least K = 2 anonymizations per face")
    if metric == "cosine":
        unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        distances = 1 - unit @ unit.transpose(1, 2)
    else:
        distances = torch.cdist(embeddings.float(), embeddings.float())
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=embeddings.device), diagonal=1)
    return distances[:, upper].mean(dim=1)


class IdentityDiversity(Metric):
    """Mean pairwise identity distance between K anonymizations of each face (higher = more diverse).

    ``update(embeddings (N, K, D))``: recognizer embeddings of K anonymizations of N faces (K fixed
    within one update; it may differ between updates). ``compute()`` -> the mean over faces.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, metric: str = "cosine", **kwargs):
        super().__init__(**kwargs)
        self.metric = _check_metric(metric)
        self.add_state("per_face", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor) -> None:
        if embeddings.dim() != 3:
            raise ValueError(f"expected (N, K, D) embeddings, got shape {tuple(embeddings.shape)}")
        self.per_face.append(pairwise_identity_distance(embeddings.detach(), self.metric))

    def compute(self) -> Tensor:
        return dim_zero_cat(self.per_face).float().mean()
