"""Latent alignment for same-identity pairs (A, B): which identity conditions each reconstruction,
and the losses that make the identity latent shared by A and B and the attribute tokens free of
identity.

Contract: ``forward(lat_a, lat_b, e_a (N, D), e_b (N, D), attr_a (N, T, C), attr_b (N, T, C))
-> AlignmentOut``; ``id_for_x`` is the latent (N, L) that conditions the reconstruction of image x.
Alignment acts on the posterior means ``mu`` (the identity code, free of the VAE's sampling noise;
``z = mu`` for the deterministic variants).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import autocast_off
from ..registry import ALIGNMENTS
from .id_vae import IdLatent


@dataclass
class AlignmentOut:
    id_for_a: torch.Tensor
    id_for_b: torch.Tensor
    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


def stopgrad_alignment(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared distance from ``online`` to the detached ``target``: only ``online`` moves."""
    return F.mse_loss(online, target.detach())


def _unbiased_hsic(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) U-statistic for HSIC of two Gram matrices with zeroed diagonals: unbiased
    for ``||Cov(x, y)||_F^2`` with linear kernels (N >= 4), so its expectation is 0 for
    independent inputs at any batch size."""
    n = kx.shape[0]
    total = (kx * ky).sum() + kx.sum() * ky.sum() / ((n - 1) * (n - 2)) - 2 * (kx.sum(0) * ky.sum(0)).sum() / (n - 2)
    return total / (n * (n - 3))


def debiased_linear_cka(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Debiased linear CKA between batches ``x`` (N, P) and ``y`` (N, Q): the squared batch
    cross-covariance normalised by each side's own, each an unbiased HSIC estimate.

    Dimension-agnostic (any P, Q); about 1 when one side is an isotropic linear function of the
    other, about 0 in expectation for independent inputs whatever N is (a single batch can read
    slightly negative). The plain (biased) CKA of independent inputs grows with (P, Q) / N: about
    0.7 at N = 12, P, Q ~ 30, so at training batch sizes it would mostly penalise noise.
    Needs N >= 4 (0 below); fp32, through the N x N Gram matrices.
    """
    if x.shape[0] < 4:
        return x.new_zeros((), dtype=torch.float32)
    with autocast_off(x.device.type):  # bf16 Gram sums would be noise
        x = x.float() - x.float().mean(0, keepdim=True)  # a common shift leaves the estimate unchanged;
        y = y.float() - y.float().mean(0, keepdim=True)  # centring only helps fp32 accuracy
        off_diagonal = 1 - torch.eye(x.shape[0], device=x.device)
        kx, ky = (x @ x.T) * off_diagonal, (y @ y.T) * off_diagonal  # each once, for all three estimates
        scale = (_unbiased_hsic(kx, kx) * _unbiased_hsic(ky, ky)).clamp_min(eps).sqrt()
        return _unbiased_hsic(kx, ky) / scale


def attribute_identity_decorrelation(attr_a: torch.Tensor, attr_b: torch.Tensor,
                                     e_a: torch.Tensor, e_b: torch.Tensor) -> torch.Tensor:
    """Debiased CKA between the token-pooled attributes and the (fixed) identity embeddings of both images.

    Gradients reach the attribute encoder only: the identity embedding is a target here.
    """
    pooled = torch.cat([attr_a.mean(1), attr_b.mean(1)], dim=0)
    identity = torch.cat([e_a, e_b], dim=0).detach()
    return debiased_linear_cka(pooled, identity)


@ALIGNMENTS.register("none")
class NoAlignment(nn.Module):
    """Null variant: each image is reconstructed from its own identity latent; no loss."""

    def forward(self, lat_a: IdLatent, lat_b: IdLatent, e_a, e_b, attr_a, attr_b) -> AlignmentOut:
        return AlignmentOut(id_for_a=lat_a.z, id_for_b=lat_b.z, loss=lat_a.z.new_zeros(()))


class _CrossAlignment(nn.Module):
    def __init__(self, align_weight: float = 1.0, decorrelation_weight: float = 1.0):
        super().__init__()
        self.align_weight = float(align_weight)
        self.decorrelation_weight = float(decorrelation_weight)

    def _align(self, lat_a: IdLatent, lat_b: IdLatent) -> torch.Tensor:
        raise NotImplementedError

    def _ids(self, lat_a: IdLatent, lat_b: IdLatent) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, lat_a: IdLatent, lat_b: IdLatent, e_a, e_b, attr_a, attr_b) -> AlignmentOut:
        align = self._align(lat_a, lat_b)
        decorrelation = attribute_identity_decorrelation(attr_a, attr_b, e_a, e_b)
        loss = self.align_weight * align + self.decorrelation_weight * decorrelation
        id_for_a, id_for_b = self._ids(lat_a, lat_b)
        logs = {
            "align": align.detach(),
            "decorrelation": decorrelation.detach(),
            "cos_ab": F.cosine_similarity(lat_a.mu, lat_b.mu, dim=-1).mean().detach(),
        }
        return AlignmentOut(id_for_a=id_for_a, id_for_b=id_for_b, loss=loss, logs=logs)


@ALIGNMENTS.register("bidirectional")
class BidirectionalAlignment(_CrossAlignment):
    """Recompose each image from the other's identity (A from z_b, B from z_a).

    Loss: ``align_weight`` * 0.5 (|mu_a - sg(mu_b)|^2 + |mu_b - sg(mu_a)|^2) (mean over elements;
    each side in turn is a fixed target) + ``decorrelation_weight`` * debiased CKA(token-pooled attributes,
    identity embedding).
    """

    def _align(self, lat_a: IdLatent, lat_b: IdLatent) -> torch.Tensor:
        return 0.5 * (stopgrad_alignment(lat_a.mu, lat_b.mu) + stopgrad_alignment(lat_b.mu, lat_a.mu))

    def _ids(self, lat_a: IdLatent, lat_b: IdLatent):
        return lat_b.z, lat_a.z


@ALIGNMENTS.register("unidirectional")
class UnidirectionalAlignment(_CrossAlignment):
    """Ablation: B's identity conditions both images (A from z_b, B from its own z_b); only A's
    latent is pulled to B's (``|mu_a - sg(mu_b)|^2``); same decorrelation term as bidirectional."""

    def _align(self, lat_a: IdLatent, lat_b: IdLatent) -> torch.Tensor:
        return stopgrad_alignment(lat_a.mu, lat_b.mu)

    def _ids(self, lat_a: IdLatent, lat_b: IdLatent):
        return lat_b.z, lat_b.z
