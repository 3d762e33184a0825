"""Diffusion backbone behind one small interface: first stage, denoiser UNet, schedulers.

- first_stage (``FIRST_STAGES``): ``encode(images [-1, 1] (N,3,S,S)) -> latents (N,c,S/f,S/f)``,
  ``decode(latents) -> images [-1, 1]``, ``.latent_channels`` (c), ``.downscale`` (f). Frozen.
- backbone (``BACKBONES``): ``forward(sample (N,in,h,w), timesteps (N,), context (N,T,C),
  cross_attention_kwargs) -> (N,out,h,w)``; ``.unet`` is a stock diffusers UNet2DConditionModel.
- scheduler (``SCHEDULERS``): the training noise schedule (``add_noise``, ``target``, ``.config``).
- sampler (``SAMPLERS``): an inference scheduler made with ``X.from_config(train_scheduler.config)``;
  ``sample(denoise, noise, ...)`` runs the reverse process.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import MissingWeightsError, UserError
from ..precision import autocast_off
from ..registry import BACKBONES, FIRST_STAGES, SAMPLERS, SCHEDULERS
from .norms import use_low_precision_norms

# SD-1.5's `vae/config.json` (AutoencoderKL); `random_init` builds it without weights.
SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

SD_WEIGHTS_SOURCE = (
    "a Stable Diffusion 1.5 checkpoint in diffusers layout (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 "
    "from the Hugging Face hub, downloaded beforehand); point the config at its `{}/` folder"
)
TINY_VAE_WEIGHTS_SOURCE = (
    "a tiny autoencoder in diffusers layout (AutoencoderTiny: madebyollin/taesd for Stable Diffusion 1.x/2.x "
    "latents, madebyollin/taesdxl for SDXL's, from the Hugging Face hub, downloaded beforehand); point the "
    "config at its folder"
)


# A module's ``dtype`` switch: its weights and whole computation in this dtype, autocast off inside.
COMPUTE_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _compute_dtype(role: str, dtype: str | None) -> torch.dtype | None:
    if dtype not in COMPUTE_DTYPES:
        raise UserError(f"{role} dtype: {dtype!r}; valid: null, {', '.join(filter(None, COMPUTE_DTYPES))}")
    return COMPUTE_DTYPES[dtype]


def _in_compute_dtype(dtype: torch.dtype | None, fn: Callable[..., torch.Tensor], x: torch.Tensor,
                      *others: torch.Tensor) -> torch.Tensor:
    """``fn(x, *others)``; with a compute ``dtype``, the inputs in it and autocast off, the result
    returned in ``x``'s dtype."""
    if dtype is None:
        return fn(x, *others)
    with autocast_off(x.device.type):
        return fn(x.to(dtype), *(t.to(dtype) for t in others)).to(x.dtype)


class FrozenModule(nn.Module):
    """A module without trainable weights that stays in eval mode whatever its parent does."""

    def __init__(self):  # explicit: the registry passes only the keyword arguments named here
        super().__init__()

    def freeze(self) -> "FrozenModule":
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "FrozenModule":
        return super().train(False)


# ------------------------------------------------------------------------------------ first stage
@FIRST_STAGES.register("pixel")
class PixelFirstStage(FrozenModule):
    """Null first stage: diffusion runs on the pixels themselves (latents = images)."""

    latent_channels = 3
    downscale = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class AutoencoderFirstStage(FrozenModule):
    """Base of the frozen diffusers autoencoders (``self.vae``): latents are
    ``(raw - shift_factor) * scaling_factor`` with the autoencoder's own config values.

    Speed switches (same numbers): ``channels_last`` and ``compile`` (of the encoder and decoder in
    place). ``dtype`` (null | float32 | bfloat16 | float16): the autoencoder's weights and its whole
    computation in that dtype, autocast off inside (callers get their own dtype back); null: fp32
    weights, the caller's autocast decides.
    """

    def _setup(self, name: str, vae: nn.Module, channels_last: bool, compile: bool, dtype: str | None) -> None:
        self.compute_dtype = _compute_dtype(f"first_stage {name}", dtype)
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.latent_channels = int(vae.config.latent_channels)
        # The scale is the autoencoder's config, not its weights; kept in the state dict too, so a
        # checkpoint rebuilt on the SD-1.5 defaults (its VAE folder not on this machine) decodes on
        # the scale it trained with (an SDXL VAE's is 0.13025, not 0.18215).
        self.register_buffer("latent_scale", torch.tensor([self.scaling_factor, self.shift_factor],
                                                          dtype=torch.float64))
        self.freeze()
        if self.compute_dtype is not None:
            # nn.Module.to: diffusers' own `to` warns about casting a loaded model (it has no
            # modules it keeps in fp32).
            nn.Module.to(self.vae, self.compute_dtype)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.vae.to(memory_format=self.memory_format)
        if compile:
            self.vae.encoder.compile()
            self.vae.decoder.compile()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint from before the scale was recorded trained on its autoencoder's own.
        state_dict.setdefault(f"{prefix}latent_scale", self.latent_scale.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scaling_factor, self.shift_factor = (float(v) for v in self.latent_scale.tolist())

    def _raw_latents(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        latents = _in_compute_dtype(self.compute_dtype, self._raw_latents,
                                    images.contiguous(memory_format=self.memory_format))
        return ((latents - self.shift_factor) * self.scaling_factor).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = (latents / self.scaling_factor + self.shift_factor).contiguous(memory_format=self.memory_format)
        return _in_compute_dtype(self.compute_dtype, lambda x: self.vae.decode(x).sample, latents).contiguous()


def _diffusers_autoencoder(cls, what: str, path: str | None, random_init: bool, config: dict | None,
                           defaults: dict, source: str) -> nn.Module:
    if random_init:
        return cls(**{**defaults, **(config or {})})
    if config:
        raise UserError(f"{what}: `config` only applies with `random_init: true`")
    if path is None or not (Path(path) / "config.json").is_file():
        raise MissingWeightsError(what, path, source)
    return cls.from_pretrained(path)


@FIRST_STAGES.register("sd_vae")
class SDVAEFirstStage(AutoencoderFirstStage):
    """Frozen Stable Diffusion AutoencoderKL; latents are scaled by ``scaling_factor``.

    ``path``: a local diffusers AutoencoderKL folder (SD's ``vae/``). ``random_init: true`` builds
    the SD-1.5 architecture (``SD_VAE_CONFIG`` updated with ``config``) with random weights, for
    tests and shape checks only.

    Speed switches ``channels_last``, ``compile``, ``dtype``: ``AutoencoderFirstStage``. At 512 px
    one decode is ~3 UNet steps of arithmetic (2.5 vs 0.8 TFLOP) and one encode ~1.4
    (FlopCounterMode): 15 % of an anonymization at 25 steps, and half the training step when
    latents are not cached. Under a caller's autocast a GPU runs the convolutions in bf16 but the
    GroupNorms and SiLUs in fp32, with casts between: at 512 px those are memory-bound, and
    ``dtype: bfloat16`` moves 0.47x the bytes of a decode (``benchmarks/sample.py --traffic``). Not
    the same numbers (bf16 norms; a latent cache records the VAE's dtype); float16 can overflow in
    SD VAEs' decoders.
    """

    def __init__(self, path: str | None = None, random_init: bool = False, config: dict | None = None,
                 channels_last: bool = False, compile: bool = False, dtype: str | None = None):
        super().__init__()
        from diffusers import AutoencoderKL

        vae = _diffusers_autoencoder(AutoencoderKL, "SD VAE (AutoencoderKL)", path, random_init, config,
                                     SD_VAE_CONFIG, SD_WEIGHTS_SOURCE.format("vae"))
        self._setup("sd_vae", vae, channels_last, compile, dtype)
        self.downscale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _raw_latents(self, images: torch.Tensor) -> torch.Tensor:
        # The posterior mean: the masked-image condition must not be noisier than the image itself.
        return self.vae.encode(images).latent_dist.mode()


@FIRST_STAGES.register("taesd")
class TinyVAEFirstStage(AutoencoderFirstStage):
    """Frozen tiny autoencoder (diffusers AutoencoderTiny, "TAESD"): a distilled stand-in for the SD
    VAE whose latents are (approximately) the SD VAE's scaled latents, at ~1/10 of the encode's and
    ~1/18 of the decode's arithmetic at 512 px (122 / 141 GFLOP vs 1117 / 2514). Softer detail.

    As a first stage of its own (train and sample on its latents), or, more usefully, as the decoder
    of a model trained with ``sd_vae`` (``DecoderSwap``, ``id2face anonymize --tiny-decoder DIR``),
    and its encoder too (``--tiny-encoder``: what the model is conditioned on is then an approximation).
    ``path``: a local AutoencoderTiny folder; ``random_init: true`` builds the TAESD architecture
    (diffusers' defaults updated with ``config``) with random weights, for tests and benchmarks only.
    Speed switches as ``AutoencoderFirstStage``.
    """

    def __init__(self, path: str | None = None, random_init: bool = False, config: dict | None = None,
                 channels_last: bool = False, compile: bool = False, dtype: str | None = None):
        super().__init__()
        from diffusers import AutoencoderTiny

        vae = _diffusers_autoencoder(AutoencoderTiny, "tiny autoencoder (AutoencoderTiny)", path, random_init,
                                     config, {}, TINY_VAE_WEIGHTS_SOURCE)
        self._setup("taesd", vae, channels_last, compile, dtype)
        self.downscale = int(self.vae.config.upsampling_scaling_factor) ** (
            len(self.vae.config.decoder_block_out_channels) - 1)

    def _raw_latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latents


class DecoderSwap(FrozenModule):
    """A first stage that encodes with ``encoder_stage`` and decodes with ``decoder_stage``: a fast
    decoder (``taesd``) for a model trained on another first stage's latents (``sd_vae``), chosen at
    sampling time. Both must share the latent space (a UserError for different channels or
    downscale; the scaling is on the user: TAESD decodes SD 1.x/2.x latents, TAESDXL SDXL's)."""

    def __init__(self, encoder_stage: nn.Module, decoder_stage: nn.Module):
        super().__init__()
        for attribute in ("latent_channels", "downscale"):
            mine, theirs = getattr(encoder_stage, attribute), getattr(decoder_stage, attribute)
            if mine != theirs:
                raise UserError(f"the decoder's {attribute.replace('_', ' ')} ({theirs}) differs from the first "
                                f"stage's ({mine}): it cannot decode these latents")
        self.encoder_stage = encoder_stage
        self.decoder_stage = decoder_stage
        self.latent_channels = encoder_stage.latent_channels
        self.downscale = encoder_stage.downscale
        self.freeze()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder_stage.encode(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder_stage.decode(latents)


# ------------------------------------------------------------------------------------ backbone
@BACKBONES.register("unet")
class UNetBackbone(nn.Module):
    """A stock diffusers ``UNet2DConditionModel``, built from these params or loaded from a local dir.

    Runtime facts: ``in_channels`` (noisy latent + masked-image latent + mask), ``out_channels``,
    ``cross_attention_dim`` (= model.context_dim). With ``pretrained`` the folder's config wins
    over the architecture params; a checkpoint with fewer input channels (a text-to-image UNet,
    4 channels) gets zero-initialised extra ``conv_in`` channels, so it starts as the original model.

    Speed switches (same numbers, measured by ``benchmarks/train_step.py`` and ``sample.py``):
    ``channels_last`` (NHWC weights and input: faster convolutions on tensor cores),
    ``compile`` (``torch.compile`` of the UNet in place; parameter names are unchanged, so
    checkpoints move between compiled and eager runs), ``sdpa_backends`` (SDPA attention by these
    ``torch.nn.attention.SDPBackend`` names only, the first that takes the shape, in the list's order:
    e.g. ``[cudnn_attention, flash_attention]``; null = PyTorch's choice, whose order puts cuDNN after
    math, so never; ``benchmarks/attention_backends.py`` times them at SD-1.5's shapes; the decoupled
    harmonizers' ``weights`` path is two matmuls, not SDPA, so self-attention only there),
    ``gradient_checkpointing`` (memory for compute).

    ``low_precision_norms``: under autocast, the UNet's GroupNorms and LayerNorms run in the
    autocast dtype instead of in fp32 between two casts (``components/norms.py``): at SD-1.5 size
    the bf16 training step moves 0.74x the bytes (``train_step.py --traffic``). Not the same
    numbers; parameters and names unchanged. For training and sampling.

    ``dtype`` (null | float32 | bfloat16 | float16), for sampling: the UNet's weights (and the
    harmonizer's gates, which run inside it: ``build_components``) and its whole computation in that
    dtype, autocast off inside, callers get their dtype back; how diffusers pipelines run
    (``torch_dtype``), norms included (PyTorch accumulates their statistics in fp32). Under
    autocast instead, every GroupNorm/LayerNorm runs in fp32 with casts around it: in bf16 one
    SD-1.5 evaluation moves 0.67x the bytes (``benchmarks/sample.py --traffic``). Not the same
    numbers; training refuses it (no fp32 master weights: use ``trainer.precision: bf16-mixed``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cross_attention_dim: int,
        pretrained: str | None = None,
        sample_size: int = 64,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block: int = 2,
        attention_head_dim: int = 8,
        norm_num_groups: int = 32,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        sdpa_backends: list[str] | None = None,
        dtype: str | None = None,
        low_precision_norms: bool = False,
    ):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.compute_dtype = _compute_dtype("backbone unet", dtype)
        if pretrained is not None:
            self.unet = _load_unet(pretrained, in_channels, out_channels, cross_attention_dim)
        else:
            self.unet = UNet2DConditionModel(
                sample_size=sample_size,
                in_channels=in_channels,
                out_channels=out_channels,
                block_out_channels=tuple(block_out_channels),
                down_block_types=tuple(down_block_types),
                up_block_types=tuple(up_block_types),
                layers_per_block=layers_per_block,
                attention_head_dim=attention_head_dim,
                norm_num_groups=norm_num_groups,
                cross_attention_dim=cross_attention_dim,
            )
        self.sdpa_backends = _sdpa_backends(sdpa_backends)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing(functools.partial(_checkpoint, backends=self.sdpa_backends))
        if low_precision_norms:
            use_low_precision_norms(self.unet)
        if self.compute_dtype is not None:
            nn.Module.to(self.unet, self.compute_dtype)  # as the VAE's: not diffusers' warning `to`
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.unet.to(memory_format=self.memory_format)
        if compile:
            self.unet.compile()

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        sample = sample.contiguous(memory_format=self.memory_format)

        def unet(sample, context):
            with _sdpa_kernel(self.sdpa_backends):
                return self.unet(sample, timesteps, encoder_hidden_states=context,
                                 cross_attention_kwargs=cross_attention_kwargs or None, return_dict=False)[0]

        return _in_compute_dtype(self.compute_dtype, unet, sample, context)


def _sdpa_backends(names: list[str] | None):
    if not names:
        return None
    from torch.nn.attention import SDPBackend

    valid = [name.lower() for name in SDPBackend.__members__ if name != "ERROR"]
    unknown = [n for n in names if str(n).lower() not in valid]
    if unknown:
        raise UserError(f"backbone sdpa_backends: unknown {unknown}; valid: {', '.join(valid)}")
    return [SDPBackend.__members__[str(n).upper()] for n in names]


def _checkpoint(module: nn.Module, *args, backends=None):
    # Backward recomputes the block outside forward's sdpa_kernel context: without the same
    # backends there, attention is recomputed by another kernel and checkpoint's check fails.
    return checkpoint(module.__call__, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _sdpa_kernel(backends)))


def _sdpa_kernel(backends):
    if backends is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backends, set_priority=True)


def _load_unet(path: str, in_channels: int, out_channels: int, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    if not (Path(path) / "config.json").is_file():
        raise MissingWeightsError("UNet (UNet2DConditionModel)", path, SD_WEIGHTS_SOURCE.format("unet"))
    unet = UNet2DConditionModel.from_pretrained(path)
    cfg = unet.config
    if cfg.cross_attention_dim != cross_attention_dim:
        raise UserError(f"pretrained UNet at {path} has cross_attention_dim {cfg.cross_attention_dim}; "
                        f"set model.context_dim={cfg.cross_attention_dim}")
    if cfg.out_channels != out_channels:
        raise UserError(f"pretrained UNet at {path} predicts {cfg.out_channels} channels, the first stage "
                        f"has {out_channels} latent channels")
    if cfg.in_channels > in_channels:
        raise UserError(f"pretrained UNet at {path} takes {cfg.in_channels} input channels, the model "
                        f"gives {in_channels}")
    if cfg.in_channels < in_channels:
        old = unet.conv_in
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, : old.in_channels] = old.weight
            new.bias.copy_(old.bias)
        unet.conv_in = new
        unet.register_to_config(in_channels=in_channels)
    return unet


# ------------------------------------------------------------------------------------ schedulers
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@SCHEDULERS.register("ddpm")
class DDPMTrainScheduler(nn.Module):
    """The training noise schedule (diffusers ``DDPMScheduler``) and the regression target.

    ``prediction_type``: ``epsilon`` (target = noise), ``v_prediction`` (target = velocity) or
    ``sample`` (target = the clean latents; a small, briefly trained pixel model gives clean if
    smooth samples this way, where an epsilon model still leaves noise at the last steps).
    ``clip_sample`` travels to the samplers through the config: right for pixel space ([-1, 1]),
    wrong for VAE latents.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                 beta_start: float = 0.00085, beta_end: float = 0.012, prediction_type: str = "epsilon",
                 clip_sample: bool = False):
        super().__init__()
        from diffusers import DDPMScheduler

        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"scheduler prediction_type '{prediction_type}': valid: {', '.join(PREDICTION_TYPES)}")
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                       beta_start=beta_start, beta_end=beta_end, prediction_type=prediction_type,
                                       clip_sample=clip_sample)

    @property
    def config(self):
        return self.scheduler.config

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def sample_timesteps(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator,
                             device=generator.device if generator is not None else device).to(device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, timesteps)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return self.scheduler.get_velocity(x0, noise, timesteps)


# ------------------------------------------------------------------------------------ samplers
class Sampler(nn.Module):
    """Reverse process with a diffusers scheduler configured from the training scheduler.

    ``denoise(x_t, t) -> model output`` in the training ``prediction_type``; ``t`` is a scalar
    timestep tensor on the latents' device. Returns the final clean latents.

    The scheduler keeps its timesteps on the host and steps with Python ints: its tables
    (``alphas_cumprod``, ``sigmas``) live on the host, and a device timestep indexing them (or
    compared with ``>= 0`` in DDIM's step) made the host wait for the GPU at every step, emptying
    its queue. The denoiser gets the same timesteps as one device tensor, copied once a call.
    """

    scheduler_class: str
    scheduler_kwargs: dict = {}

    def __init__(self, train_scheduler, num_inference_steps: int = 25):
        super().__init__()
        import diffusers

        # Built on the host whatever the default device (meta when the benchmarks count FLOPs, or
        # set by the user): the tables belong there (above), and DPM-Solver copies its sigmas there,
        # which a meta tensor cannot do.
        with torch.device("cpu"):
            self.scheduler = getattr(diffusers, self.scheduler_class).from_config(
                train_scheduler.config, **self.scheduler_kwargs)
        if not 1 <= int(num_inference_steps) <= self.scheduler.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in 1..{self.scheduler.config.num_train_timesteps} "
                             f"(the training timesteps), got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps

    def step_kwargs(self, generator: torch.Generator | None) -> dict:
        return {"generator": generator}

    @torch.no_grad()
    def sample(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
               generator: torch.Generator | None = None, num_inference_steps: int | None = None) -> torch.Tensor:
        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps or self.num_inference_steps)
        on_device = scheduler.timesteps.to(noise.device, non_blocking=True)
        x = noise * scheduler.init_noise_sigma
        for index, t in enumerate(scheduler.timesteps.tolist()):
            output = denoise(scheduler.scale_model_input(x, t), on_device[index])
            x = scheduler.step(output, t, x, return_dict=False, **self.step_kwargs(generator))[0]
        return x


@SAMPLERS.register("ddim")
class DDIMSampler(Sampler):
    """DDIM (``eta`` = 0: deterministic given the initial noise)."""

    scheduler_class = "DDIMScheduler"

    def __init__(self, train_scheduler, num_inference_steps: int = 25, eta: float = 0.0):
        super().__init__(train_scheduler, num_inference_steps)
        self.eta = eta

    def step_kwargs(self, generator):
        return {"generator": generator, "eta": self.eta}


@SAMPLERS.register("dpm_solver")
class DPMSolverSampler(Sampler):
    """DPM-Solver++ multistep (second order): good samples in 10-25 steps."""

    scheduler_class = "DPMSolverMultistepScheduler"
    scheduler_kwargs = {"algorithm_type": "dpmsolver++", "solver_order": 2}
