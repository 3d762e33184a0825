"""Identity latent models: identity embedding ``e`` (N, D) <-> identity latent ``z`` (N, L).

The latent space is where anonymization happens: the orthogonal identity mapping removes the source
direction from a prior draw, so the prior (``sample_prior``) is the space of identities one can
sample. Runtime fact: ``in_dim`` = the identity encoder's ``embed_dim`` (D).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ID_VAES

LOGVAR_RANGE = (-30.0, 20.0)  # exp() stays finite in fp32 and bf16


@dataclass
class IdLatent:
    """What an identity latent model makes of a batch of embeddings.

    ``z`` (N, L): the latent that conditions the generator (a reparameterised sample in training
    mode, ``mu`` in eval mode); ``mu`` (N, L); ``logvar`` (N, L) or None for deterministic
    variants; ``e_hat`` (N, D) unit reconstruction of ``e``; ``loss`` scalar (weighted objective,
    0 for parameter-free variants); ``logs``: detached scalars worth logging (e.g. ``recon``, ``kl``).
    """

    z: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor | None
    e_hat: torch.Tensor
    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)

    def chunk(self, chunks: int) -> tuple["IdLatent", ...]:
        """Per-sample fields split along the batch (as ``Tensor.chunk``); ``loss`` and ``logs``
        stay the whole batch's in every part."""
        parts = [x.chunk(chunks) if x is not None else [None] * chunks
                 for x in (self.z, self.mu, self.logvar, self.e_hat)]
        return tuple(IdLatent(z, mu, logvar, e_hat, self.loss, self.logs) for z, mu, logvar, e_hat in zip(*parts))


def cosine_reconstruction(e_hat: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos(e_hat, e)``: 0 for a perfect reconstruction of the direction, up to 2."""
    return (1 - F.cosine_similarity(e_hat.float(), e.float(), dim=-1)).mean()


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dims, mean over the batch."""
    mu, logvar = mu.float(), logvar.float()  # a sum over latent dims: fp32 even under autocast
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1).mean()


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.SiLU(),
        nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
        nn.Linear(hidden_dim, out_dim),
    )


def _gaussian(n: int, dim: int, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    # Draw on the generator's device, then move: a CPU generator gives the same identities on any device.
    source = generator.device if generator is not None else device
    return torch.randn(n, dim, generator=generator, device=source, dtype=torch.float32).to(device=device, dtype=dtype)


class _IdLatentModel(nn.Module):
    latent_dim: int

    def __init__(self):
        super().__init__()
        # Parameter-free variants still need to know their device for sample_prior.
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def _place(self, device):
        return self._device_anchor.device if device is None else torch.device(device)


@ID_VAES.register("none")
class PassThroughIdLatent(_IdLatentModel):
    """Null variant: the latent is the embedding itself (L = D, z = mu = e, no loss).

    ``sample_prior`` draws uniform random unit vectors, the distribution of embeddings of
    unrelated faces under an idealised encoder.
    """

    def __init__(self, in_dim: int):
        super().__init__()
        self.in_dim = self.latent_dim = int(in_dim)

    def encode(self, e: torch.Tensor) -> torch.Tensor:
        return e

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1)

    def forward(self, e: torch.Tensor) -> IdLatent:
        return IdLatent(z=e, mu=e, logvar=None, e_hat=F.normalize(e, dim=-1), loss=e.new_zeros(()))

    def sample_prior(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        device = self._place(device)
        return F.normalize(_gaussian(n, self.latent_dim, generator, device, torch.float32), dim=-1)


@ID_VAES.register("vae")
class IdentityVAE(_IdLatentModel):
    """Variational identity latent: ``e -> (mu, logvar) -> z -> e_hat`` with prior N(0, I).

    Loss: cosine reconstruction of ``e`` + ``beta`` * KL(q(z|e) || N(0, I)). A small ``beta`` keeps
    the reconstruction (identity) faithful while shaping the latent so that prior draws decode to
    plausible identities.
    """

    def __init__(self, in_dim: int, latent_dim: int = 64, hidden_dim: int = 512, beta: float = 1e-3):
        super().__init__()
        self.in_dim, self.latent_dim, self.beta = int(in_dim), int(latent_dim), float(beta)
        self.encoder = _mlp(self.in_dim, hidden_dim, 2 * self.latent_dim)
        self.decoder = _mlp(self.latent_dim, hidden_dim, self.in_dim)

    def _posterior(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(e).chunk(2, dim=-1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, e: torch.Tensor) -> torch.Tensor:
        return self._posterior(e)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.decoder(z), dim=-1)

    def forward(self, e: torch.Tensor) -> IdLatent:
        mu, logvar = self._posterior(e)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        e_hat = self.decode(z)
        recon = cosine_reconstruction(e_hat, e)
        kl = gaussian_kl(mu, logvar)
        return IdLatent(z=z, mu=mu, logvar=logvar, e_hat=e_hat, loss=recon + self.beta * kl,
                        logs={"recon": recon.detach(), "kl": kl.detach()})

    def sample_prior(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return _gaussian(n, self.latent_dim, generator, self._place(device), torch.float32)


@ID_VAES.register("deterministic")
class IdentityAutoencoder(_IdLatentModel):
    """Ablation without a prior: an MLP autoencoder ``e -> z = mu -> e_hat``, cosine reconstruction.

    Having no prior, ``sample_prior`` draws isotropic directions at the latent norm seen in
    training (a running mean of ``|mu|``, kept in the checkpoint), which is as close to "a random
    identity" as an unregularised latent allows.
    """

    def __init__(self, in_dim: int, latent_dim: int = 64, hidden_dim: int = 512, norm_momentum: float = 0.01):
        super().__init__()
        self.in_dim, self.latent_dim = int(in_dim), int(latent_dim)
        self.norm_momentum = float(norm_momentum)
        self.encoder = _mlp(self.in_dim, hidden_dim, self.latent_dim)
        self.decoder = _mlp(self.latent_dim, hidden_dim, self.in_dim)
        self.register_buffer("latent_norm", torch.tensor(float(self.latent_dim) ** 0.5))
        self.register_buffer("norm_updates", torch.zeros((), dtype=torch.long))

    def encode(self, e: torch.Tensor) -> torch.Tensor:
        return self.encoder(e)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.decoder(z), dim=-1)

    @torch.no_grad()
    def _track_norm(self, mu: torch.Tensor) -> None:
        # Running mean for the first 1/momentum batches, then an EMA; tensor ops only (no host sync).
        weight = (1.0 / (self.norm_updates + 1).float()).clamp(min=self.norm_momentum)
        self.latent_norm.lerp_(mu.detach().float().norm(dim=-1).mean(), weight)
        self.norm_updates += 1

    def forward(self, e: torch.Tensor) -> IdLatent:
        mu = self.encoder(e)
        if self.training:
            self._track_norm(mu)
        e_hat = self.decode(mu)
        recon = cosine_reconstruction(e_hat, e)
        return IdLatent(z=mu, mu=mu, logvar=None, e_hat=e_hat, loss=recon, logs={"recon": recon.detach()})

    def sample_prior(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        device = self._place(device)
        direction = F.normalize(_gaussian(n, self.latent_dim, generator, device, torch.float32), dim=-1)
        return direction * self.latent_norm.to(device)
