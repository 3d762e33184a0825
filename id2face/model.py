"""ID2Face: the identity-decoupled conditional diffusion model, composed from registered components.

Plain torch (no Lightning): ``training_losses`` on a same-identity pair batch, ``anonymize`` /
``reconstruct`` for inference, ``log_images`` for a callback to write. Images are RGB NCHW in
[-1, 1]; masks (N,1,S,S) in {0, 1} with 1 = the identity region that is regenerated.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import one_line
from .registry import MODEL_ROLES, ComponentValueError, variant_name

# Components whose weights never train: kept out of the optimiser, the EMA and DDP's gradient sync.
FROZEN_ROLES = ("identity_encoder", "first_stage")
DEFAULT_LOSS_WEIGHTS = {"diffusion": 1.0, "id_vae": 1.0, "alignment": 0.1, "id_dropout": 0.1,
                        "identity_region": 1.0}


class IdentityTokens(nn.Module):
    """Identity latent (N, L) -> K identity tokens (N, K, C) for cross-attention.

    Also owns the learned null token set that replaces the identity tokens under identity-condition
    dropout (the unconditional branch of classifier-free guidance).
    """

    def __init__(self, latent_dim: int, context_dim: int, num_tokens: int = 4, hidden_dim: int = 512):
        super().__init__()
        self.num_tokens, self.context_dim = int(num_tokens), int(context_dim)
        self.mlp = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.SiLU(),
                                 nn.Linear(hidden_dim, self.num_tokens * self.context_dim))
        # Same scale as the attribute tokens, which end in a LayerNorm too.
        self.norm = nn.LayerNorm(self.context_dim)
        self.null_tokens = nn.Parameter(torch.randn(self.num_tokens, self.context_dim) * 0.02)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        tokens = self.mlp(z).view(z.shape[0], self.num_tokens, self.context_dim)
        return self.norm(tokens)

    def null(self, n: int) -> torch.Tensor:
        return self.null_tokens.unsqueeze(0).expand(n, -1, -1)

    def drop(self, tokens: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each sample's tokens by the null set with probability ``p``."""
        if p <= 0:
            return tokens
        u = torch.rand(tokens.shape[0], generator=generator,
                       device=generator.device if generator is not None else tokens.device).to(tokens.device)
        return torch.where((u < p).view(-1, 1, 1), self.null(tokens.shape[0]).to(tokens.dtype), tokens)


def build_components(model_cfg: Mapping[str, Any]) -> dict[str, nn.Module]:
    """Every component of ``model_cfg`` built by registered name, runtime facts passed along:
    ``in_dim`` (encoder -> id_vae), ``context_dim`` (attribute encoder, harmonizer), channels
    (first stage -> UNet), the training scheduler (-> sampler). The harmonizer is installed into
    the UNet. Returns ``{role: module}`` in build order plus ``identity_tokens``.
    """
    context_dim = int(model_cfg["context_dim"])
    built: dict[str, nn.Module] = {}

    def build(role: str, **runtime):
        node = model_cfg[role]
        module = MODEL_ROLES[role].build(node, **runtime)
        module.registered_name = variant_name(node)
        built[role] = module
        return module

    encoder = build("identity_encoder")
    id_vae = build("id_vae", in_dim=encoder.embed_dim)
    build("attribute_encoder", context_dim=context_dim)
    build("alignment")
    harmonizer = build("harmonizer", context_dim=context_dim)
    build("id_mapping")
    build("guidance")
    first_stage = build("first_stage")
    channels = first_stage.latent_channels
    backbone = build("backbone", in_channels=2 * channels + 1, out_channels=channels,
                     cross_attention_dim=context_dim)
    scheduler = build("scheduler")
    build("sampler", train_scheduler=scheduler)

    tokens_cfg = dict(model_cfg.get("identity_tokens") or {})
    built["identity_tokens"] = IdentityTokens(id_vae.latent_dim, context_dim, **tokens_cfg)
    built["identity_tokens"].registered_name = "mlp"
    harmonizer.install(backbone.unet, built["identity_tokens"].num_tokens)
    if getattr(backbone, "compute_dtype", None) is not None:
        harmonizer.to(backbone.compute_dtype)  # its gates run inside the UNet, on its hidden states
    for role in FROZEN_ROLES:
        built[role].requires_grad_(False)
    return built


SPEED_SWITCHES = ("channels_last", "compile")


def speed_switch_overrides(model_cfg: Mapping[str, Any], switches: tuple[str, ...] = SPEED_SWITCHES) -> list[str]:
    """``model.<role>.params.<switch>=true`` for every role whose configured variant takes the
    switch (the UNet backbone; the SD VAE first stage, not the pixel one)."""
    return [f"model.{role}.params.{switch}=true" for role, registry in MODEL_ROLES.items()
            for switch in switches if registry.declares(variant_name(model_cfg[role]), switch)]


def _weight(value) -> float | None:
    """A loss weight as a float (a string such as '1e-3' too), or None for what is no number."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def loss_weights(loss: Mapping[str, Any] | None) -> dict[str, float]:
    """``loss`` over ``DEFAULT_LOSS_WEIGHTS``, as floats; a ValueError for an unknown name, a weight
    that is no number or < 0 (it would train the model away from its term), an ``id_dropout``
    outside [0, 1]."""
    unknown = set(loss or {}) - set(DEFAULT_LOSS_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown loss weights {sorted(unknown)}; valid: {sorted(DEFAULT_LOSS_WEIGHTS)}")
    given = {**DEFAULT_LOSS_WEIGHTS, **(loss or {})}
    weights = {k: _weight(v) for k, v in given.items()}
    bad = {k: given[k] for k, w in weights.items() if w is None or w < 0}
    if bad:
        raise ValueError(f"loss weights are numbers >= 0; got {bad}")
    if not 0 <= weights["id_dropout"] <= 1:
        raise ValueError(f"id_dropout is a probability, in [0, 1]; got {weights['id_dropout']}")
    return weights


def check_loss(model_cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """``model_cfg.loss`` as given (a plain dict, or None for the defaults) once ``loss_weights``
    accepts it; else a one-line ``ComponentValueError`` naming ``model.loss``."""
    loss = model_cfg.get("loss")
    loss = dict(loss) if loss is not None else None
    try:
        loss_weights(loss)
    except ValueError as err:
        raise ComponentValueError(f"model.loss: {one_line(err)}") from None
    return loss


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) number of parameters, each shared tensor counted once."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _downsample_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Max-pool: a latent cell that covers any identity pixel counts as masked.
    if masks.shape[-2:] == size:
        return masks
    return F.adaptive_max_pool2d(masks, size)


class ID2Face(nn.Module):
    """The composed model. Constructor arguments are the built components (see ``from_config``)
    and ``loss``: weights ``diffusion``, ``id_vae``, ``alignment`` and the identity-dropout
    probability ``id_dropout``.
    """

    def __init__(self, identity_encoder, id_vae, attribute_encoder, alignment, harmonizer, id_mapping,
                 guidance, first_stage, backbone, scheduler, sampler, identity_tokens,
                 loss: Mapping[str, float] | None = None):
        super().__init__()
        self.identity_encoder = identity_encoder
        self.id_vae = id_vae
        self.attribute_encoder = attribute_encoder
        self.alignment = alignment
        self.harmonizer = harmonizer
        self.id_mapping = id_mapping
        self.guidance = guidance
        self.first_stage = first_stage
        self.backbone = backbone
        self.scheduler = scheduler
        self.sampler = sampler
        self.identity_tokens = identity_tokens
        self.loss_weights = loss_weights(loss)
        for role in FROZEN_ROLES:
            getattr(self, role).requires_grad_(False)
        if self.loss_weights["id_dropout"] <= 0:
            # Never used without dropout: a trainable parameter without gradient would stall DDP.
            self.identity_tokens.null_tokens.requires_grad_(False)

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any]) -> "ID2Face":
        loss = check_loss(model_cfg)  # before the components: a bad weight fails without a model built
        return cls(**build_components(model_cfg), loss=loss)

    def trainable_modules(self) -> nn.ModuleDict:
        """The denoiser and the conditioning networks (everything but the frozen encoders): what the
        optimiser and the EMA see. A fresh view over the same modules, in a fixed order."""
        return nn.ModuleDict({name: m for name, m in self.named_children() if name not in FROZEN_ROLES})

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def identity_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen encoder features (N, D); no graph: no loss here differentiates through them."""
        return self.identity_encoder(images)

    def identity_latent(self, images: torch.Tensor) -> torch.Tensor:
        """The identity latent ``mu`` (N, L) of face images (e.g. a gallery to avoid)."""
        return self.id_vae.encode(self.identity_embedding(images))

    @torch.no_grad()
    def inpainting_condition(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked-image latent (N,c,h,w), mask at latent size (N,1,h,w)); the identity region is
        blanked to 0 (mid-grey) before encoding."""
        masks = masks.to(images.dtype)
        masked_latents = self.first_stage.encode(images * (1 - masks))
        return masked_latents, _downsample_mask(masks, tuple(masked_latents.shape[-2:]))

    @torch.no_grad()
    def first_stage_latents(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, masked-image latents): the two frozen encodes of a training image, what
        ``id2face cache-latents`` stores."""
        return self.first_stage.encode(images), self.inpainting_condition(images, masks)[0]

    def _training_latents(self, sides: tuple[Mapping[str, torch.Tensor], ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, masked-image latents) of the sides in order: a side's cached ones when its batch
        carries them (``data.latent_cache``), the rest encoded here in one batch."""
        missing = [side for side in sides if "latent" not in side]
        if missing:
            images = torch.cat([side["image"] for side in missing])
            masks = torch.cat([side["mask"] for side in missing]).to(images.dtype)
            encoded = iter(zip(*(x.chunk(len(missing)) for x in self.first_stage_latents(images, masks))))
        dtype = sides[0]["image"].dtype
        pairs = [(side["latent"].to(dtype), side["masked_latent"].to(dtype)) if "latent" in side else next(encoded)
                 for side in sides]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def _training_identity_embeddings(self, sides: tuple[Mapping[str, torch.Tensor], ...]) -> torch.Tensor:
        """Identity-encoder features of the sides in order: a side's cached ones when its batch
        carries them (``data.latent_cache``), the rest computed here in one batch."""
        missing = [side for side in sides if "identity_embedding" not in side]
        if missing:
            computed = iter(self.identity_embedding(torch.cat([side["image"] for side in missing]))
                            .split([side["image"].shape[0] for side in missing]))
        return torch.cat([side["identity_embedding"].to(side["image"].dtype) if "identity_embedding" in side
                          else next(computed) for side in sides])

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, masked_latents: torch.Tensor,
                latent_masks: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (in the scheduler's ``prediction_type``) for noisy latents."""
        timesteps = timesteps.reshape(-1).expand(noisy.shape[0]) if timesteps.numel() == 1 else timesteps
        sample = torch.cat([noisy, masked_latents.to(noisy.dtype), latent_masks.to(noisy.dtype)], dim=1)
        return self.backbone(sample, timesteps, context, self.harmonizer.attention_kwargs(timesteps))

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: Mapping[str, Mapping[str, torch.Tensor]],
                        noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Recomposition losses on a same-identity pair batch ``{"a": {...}, "b": {...}}``.

        A is denoised with {attr(A), id_for_a} and B with {attr(B), id_for_b} (the alignment decides
        which identity latent each gets), both in one UNet pass over the 2N images. ``noise``
        (2N,c,h,w) and ``timesteps`` (2N,) may be fixed by the caller (A's first); ``generator``
        draws the rest. A side that carries cached ``latent`` and ``masked_latent`` (``data.latent_cache``)
        skips its two first-stage encodes, one that carries ``identity_embedding`` its identity
        encoding. Returns scalar tensors: ``loss`` (weighted sum), ``diffusion``, ``diffusion_a``,
        ``diffusion_b``, ``id_vae``, ``alignment`` and the components' logs.
        """
        a, b = batch["a"], batch["b"]
        n = a["image"].shape[0]
        images = torch.cat([a["image"], b["image"]])
        masks = torch.cat([a["mask"], b["mask"]]).to(images.dtype)

        embeddings = self._training_identity_embeddings((a, b))
        e_a, e_b = embeddings.chunk(2)
        # Both sides in one pass (half the small kernels of two); its loss is their mean.
        latent = self.id_vae(embeddings)
        lat_a, lat_b = latent.chunk(2)
        attr = self.attribute_encoder(images, masks)
        attr_a, attr_b = attr.chunk(2)
        aligned = self.alignment(lat_a, lat_b, e_a, e_b, attr_a, attr_b)
        id_tokens = self.identity_tokens(torch.cat([aligned.id_for_a, aligned.id_for_b]))
        if self.training:
            id_tokens = self.identity_tokens.drop(id_tokens, self.loss_weights["id_dropout"], generator)
        context = torch.cat([id_tokens, attr.to(id_tokens.dtype)], dim=1)

        latents, masked_latents = self._training_latents((a, b))
        latent_masks = _downsample_mask(masks, tuple(latents.shape[-2:]))
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype,
                                device=generator.device if generator is not None else latents.device)
        noise = noise.to(latents)
        if timesteps is None:
            timesteps = self.scheduler.sample_timesteps(2 * n, latents.device, generator)
        timesteps = timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = self.denoise(noisy, timesteps, masked_latents, latent_masks, context)
        target = self.scheduler.target(latents, noise, timesteps)
        # Outside the identity region the masked-image channel holds the answer; weighting the
        # region (loss.identity_region > 1) keeps the loss about what has to be generated.
        error = (prediction.float() - target.float()).pow(2)
        weight = (1 + (self.loss_weights["identity_region"] - 1) * latent_masks.float()).expand_as(error)
        per_sample = (error * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)
        diffusion_a, diffusion_b = per_sample[:n].mean(), per_sample[n:].mean()
        diffusion = per_sample.mean()

        id_vae_loss = latent.loss
        w = self.loss_weights
        loss = w["diffusion"] * diffusion + w["id_vae"] * id_vae_loss + w["alignment"] * aligned.loss
        out = {"loss": loss, "diffusion": diffusion.detach(), "diffusion_a": diffusion_a.detach(),
               "diffusion_b": diffusion_b.detach(), "id_vae": id_vae_loss.detach(),
               "alignment": aligned.loss.detach()}
        for prefix, logs in (("id_vae", latent.logs), ("alignment", aligned.logs)):
            out.update({f"{prefix}/{k}": v.detach() for k, v in logs.items()})
        return out

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, images: torch.Tensor, masks: torch.Tensor, id_latent: torch.Tensor,
                 source_latent: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 num_inference_steps: int | None = None) -> torch.Tensor:
        """Regenerate the masked region of ``images`` with identity latent ``id_latent`` (N, L) and
        the images' own attributes; outside the mask the input is kept exactly.

        ``source_latent`` (N, L): the source identity, used when the guidance needs it.
        """
        masks = masks.to(images.dtype)
        n = images.shape[0]
        attr = self.attribute_encoder(images, masks)
        conditions = [torch.cat([self.identity_tokens(id_latent.to(attr.dtype)), attr], dim=1)]
        if self.guidance.needs_source_condition:
            if source_latent is None:
                raise ValueError(f"guidance '{getattr(self.guidance, 'registered_name', type(self.guidance).__name__)}' "
                                 "needs the source identity latent")
            conditions.append(torch.cat([self.identity_tokens(source_latent.to(attr.dtype)), attr], dim=1))
        if getattr(self.guidance, "needs_unconditional", False):
            conditions.append(torch.cat([self.identity_tokens.null(n).to(attr.dtype), attr], dim=1))
        context = torch.cat(conditions)  # every condition in one batched UNet pass
        copies = len(conditions)

        masked_latents, latent_masks = self.inpainting_condition(images, masks)
        masked_latents, latent_masks = masked_latents.repeat(copies, 1, 1, 1), latent_masks.repeat(copies, 1, 1, 1)
        noise = torch.randn(masked_latents[:n].shape, generator=generator, dtype=masked_latents.dtype,
                            device=generator.device if generator is not None else images.device).to(images.device)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            outputs = self.denoise(x.repeat(copies, 1, 1, 1), t.to(x.device), masked_latents, latent_masks,
                                   context).chunk(copies)
            by_name = {"eps_cond": outputs[0]}
            rest = iter(outputs[1:])
            if self.guidance.needs_source_condition:
                by_name["eps_source"] = next(rest)
            if getattr(self.guidance, "needs_unconditional", False):
                by_name["eps_uncond"] = next(rest)
            return self.guidance.combine(**by_name)

        latents = self.sampler.sample(denoise, noise, generator=generator, num_inference_steps=num_inference_steps)
        generated = self.first_stage.decode(latents).clamp(-1, 1).to(images.dtype)
        return masks * generated + (1 - masks) * images

    @torch.no_grad()
    def anonymize(self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None,
                  key=None, gallery: torch.Tensor | None = None,
                  num_inference_steps: int | None = None) -> torch.Tensor:
        """Replace the identity in the masked region by a pseudo-identity from the identity mapping.

        ``key``: secret for the keyed mapping; ``gallery`` (M, L): identity latents to avoid too
        (``identity_latent(gallery_images)``). Returns (N,3,S,S) in [-1, 1].
        """
        from .precision import autocast_off

        # In fp32 whatever the caller's autocast: the substitute is made orthogonal to this source,
        # and under bf16 it was orthogonal only to an approximation of it (|cos| 2e-3, not 6e-8).
        with autocast_off(images.device.type):
            source = self.identity_latent(images.float())
            prior = partial(self.id_vae.sample_prior, device=images.device)
            pseudo = self.id_mapping(source, prior=prior, generator=generator, key=key, gallery=gallery)
        return self.generate(images, masks, pseudo, source_latent=source, generator=generator,
                             num_inference_steps=num_inference_steps)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None,
                    num_inference_steps: int | None = None) -> torch.Tensor:
        """Regenerate the masked region with the image's own identity (the non-anonymizing baseline)."""
        source = self.identity_latent(images)
        return self.generate(images, masks, source, source_latent=source, generator=generator,
                             num_inference_steps=num_inference_steps)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Mapping[str, torch.Tensor]], max_images: int = 8, seed: int = 0,
                   num_inference_steps: int | None = None) -> dict[str, torch.Tensor]:
        """Image grids (3, H, W) in [0, 1] of up to ``max_images`` pairs: ``source`` (A),
        ``masked`` (A with the identity region blanked), ``recomposed`` (A regenerated with the
        identity latent training conditions it on, i.e. B's under bidirectional alignment) and
        ``anonymized``. Seeded, so successive logs are comparable."""
        from torchvision.utils import make_grid

        a, b = ({k: v[:max_images] for k, v in side.items() if torch.is_tensor(v)} for side in (batch["a"], batch["b"]))
        images, masks = a["image"], a["mask"].to(a["image"].dtype)
        e_a, e_b = self.identity_embedding(images), self.identity_embedding(b["image"])
        lat_a, lat_b = self.id_vae(e_a), self.id_vae(e_b)
        attr_a = self.attribute_encoder(images, masks)
        attr_b = self.attribute_encoder(b["image"], b["mask"].to(images.dtype))
        id_for_a = self.alignment(lat_a, lat_b, e_a, e_b, attr_a, attr_b).id_for_a

        def generator():
            return torch.Generator(images.device).manual_seed(seed)

        grids = {
            "source": images,
            "masked": images * (1 - masks),
            "recomposed": self.generate(images, masks, id_for_a, source_latent=lat_a.mu, generator=generator(),
                                        num_inference_steps=num_inference_steps),
            "anonymized": self.anonymize(images, masks, generator=generator(), key=seed,
                                         num_inference_steps=num_inference_steps),
        }
        return {name: make_grid(((x.float() + 1) / 2).clamp(0, 1).cpu(), nrow=min(len(x), 8), padding=1)
                for name, x in grids.items()}
