"""Identity mappings (inference only): source identity latent -> the pseudo-identity latent that
conditions the anonymized face.

Contract: ``forward(source_mu (N, L), prior: callable(n, generator) -> (n, L), generator=None,
key=None, gallery=None (M, L)) -> z' (N, L)``. ``gallery`` holds identities the result must also
avoid (orthogonal and keyed variants).
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from ..registry import ID_MAPPINGS

Prior = Callable[[int, "torch.Generator | None"], torch.Tensor]


def _exact_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def orthogonalize(z: torch.Tensor, source_mu: torch.Tensor, gallery: torch.Tensor | None = None) -> torch.Tensor:
    """Remove from each ``z[i]`` the gallery's span and the direction of ``source_mu[i]``, then
    rescale to ``|z[i]|`` (Gram-Schmidt, done twice in float64 so |cos| with each removed vector
    stays at rounding level).

    ``z``, ``source_mu``: (N, L); ``gallery``: (M, L) or None, with M <= L - 2 so that a direction
    remains. Returns (N, L) in ``z``'s dtype.
    """
    exact = _exact_dtype(z.device)
    z64, mu64 = z.to(exact), source_mu.to(device=z.device, dtype=exact)
    dim = z.shape[-1]
    basis = None
    if gallery is not None and gallery.numel() > 0:
        gallery = gallery.to(device=z.device, dtype=exact).reshape(-1, dim)
        if gallery.shape[0] > dim - 2:
            raise UserError(f"a gallery of {gallery.shape[0]} identities leaves no direction to sample in a "
                            f"{dim}-d identity latent: avoid at most {dim - 2} identities at once")
        basis, _ = torch.linalg.qr(gallery.T)  # (L, M) orthonormal columns spanning the gallery

    def without_gallery(v: torch.Tensor) -> torch.Tensor:
        return v if basis is None else v - (v @ basis) @ basis.T

    u = without_gallery(without_gallery(mu64))
    u_norm = u.norm(dim=-1, keepdim=True)
    # A source inside the gallery's span (or mu = 0) adds no direction of its own.
    u = torch.where(u_norm > 1e-12, u / u_norm.clamp_min(1e-300), torch.zeros_like(u))
    out = z64
    for _ in range(2):
        out = without_gallery(out)
        out = out - (out * u).sum(-1, keepdim=True) * u
    out = out * (z64.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(1e-300))
    return out.to(z.dtype)


@ID_MAPPINGS.register("random")
class RandomIdentityMapping(nn.Module):
    """Null variant: a fresh identity from the prior, unrelated to the source (no guarantee)."""

    def forward(self, source_mu: torch.Tensor, prior: Prior, generator: torch.Generator | None = None,
                key=None, gallery: torch.Tensor | None = None) -> torch.Tensor:
        z = prior(source_mu.shape[0], generator)
        return z.to(device=source_mu.device, dtype=source_mu.dtype)


@ID_MAPPINGS.register("orthogonal")
class OrthogonalIdentityMapping(nn.Module):
    """Orthogonal Identity Mapping (OIM): a prior draw with the source identity's direction (and
    the gallery's span) removed, rescaled to the draw's norm: ``z' = z - <z, u> u``, ``u = mu/|mu|``."""

    def forward(self, source_mu: torch.Tensor, prior: Prior, generator: torch.Generator | None = None,
                key=None, gallery: torch.Tensor | None = None) -> torch.Tensor:
        z = prior(source_mu.shape[0], generator).to(device=source_mu.device, dtype=source_mu.dtype)
        return orthogonalize(z, source_mu, gallery)


def _key_bytes(key) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, (str, int)):
        return str(key).encode("utf-8")
    raise UserError(f"the identity-mapping key must be a string, bytes or an integer, not {type(key).__name__}")


def _keyed_seed(key: bytes, message: bytes) -> int:
    """A 64-bit seed from HMAC-SHA256(key, message): stable across processes and versions, and
    unpredictable without the key (Python's hash() is salted per process)."""
    return int.from_bytes(hmac.new(key, message, hashlib.sha256).digest()[:8], "little")


@ID_MAPPINGS.register("keyed")
class KeyedIdentityMapping(nn.Module):
    """Keyed pseudonymisation: the same (secret key, person) always gives the same pseudo-identity.

    The source direction ``mu/|mu|`` is quantised to a cell by ``num_bits`` key-seeded random
    hyperplanes (sign-LSH); the cell and the key seed the prior draw (HMAC-SHA256), which is then
    orthogonalised against the source (and gallery) like OIM. Two photos whose latents differ by an
    angle theta land in the same cell with probability about ``(1 - theta/pi) ** num_bits``;
    two unrelated people share a cell with probability ``2 ** -num_bits``. Another key gives other
    hyperplanes and other seeds, hence unrelated pseudo-identities. ``generator`` is ignored.
    """

    def __init__(self, num_bits: int = 12):
        super().__init__()
        if not 1 <= int(num_bits) <= 256:
            raise UserError(f"keyed identity mapping: num_bits must be in 1..256, got {num_bits}")
        self.num_bits = int(num_bits)

    def hyperplanes(self, key, dim: int) -> torch.Tensor:
        """The key's (num_bits, dim) float64 hyperplane normals."""
        generator = torch.Generator().manual_seed(_keyed_seed(_key_bytes(key), b"id2face/keyed/hyperplanes"))
        return torch.randn(self.num_bits, dim, generator=generator, dtype=torch.float64)

    def cells(self, source_mu: torch.Tensor, key) -> torch.Tensor:
        """(N, num_bits) bool: which side of each of the key's hyperplanes each source lies on."""
        mu = source_mu.detach().to(device="cpu", dtype=torch.float64)
        return (mu @ self.hyperplanes(key, mu.shape[-1]).T) > 0

    def forward(self, source_mu: torch.Tensor, prior: Prior, generator: torch.Generator | None = None,
                key=None, gallery: torch.Tensor | None = None) -> torch.Tensor:
        if key is None:
            raise UserError("the keyed identity mapping needs a secret key (pass key=...)")
        secret = _key_bytes(key)
        draws = []
        for bits in self.cells(source_mu, key).to(torch.uint8).tolist():
            seed = _keyed_seed(secret, b"id2face/keyed/cell/" + bytes(bits))
            draws.append(prior(1, torch.Generator().manual_seed(seed)).to(source_mu.device))
        z = torch.cat(draws).to(dtype=source_mu.dtype)
        return orthogonalize(z, source_mu, gallery)
