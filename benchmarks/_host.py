"""The host's side of one eager training step: how long the CPU takes to issue its kernels.

On a GPU the host (Python, the dispatcher, autograd, autocast) issues kernels while the device
runs earlier ones. A step is launch-bound where the host issues more slowly than the GPU
computes: at a step's start on an empty queue (our conditioning networks run before the UNet's
first kernel), or anywhere the host's total exceeds the GPU's. The host cost of an op does not
depend on tensor sizes, so it is measured here, on a CPU, on a *narrow* copy of the model: the
same modules and calls (the same aten ops, in fp32 exactly the full-width step's: a slow test
counts both), widths and the latent grid cut until the CPU's own arithmetic is small beside the
dispatch. What is left of that arithmetic makes the figures upper bounds.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

# Overrides that keep a profile's structure and cut its widths. What else must stay is what decides
# whether a reshape is a view or a copy (a size-1 dimension makes it a view): 8 heads of >= 2
# channels in the UNet, the attribute encoder's 8 heads, and a grid of at least 2 x 2 at the
# UNet's lowest level (NARROW_IMAGE_SIZE px -> 16 x 16 latents). The slow test in
# tests/test_benchmarks.py checks the count against the full-width step's on fake tensors.
NARROW_OVERRIDES = {
    "sd15": (
        "model.context_dim=16",
        "model.backbone.params.block_out_channels=[16,32,64,64]",
        "model.backbone.params.norm_num_groups=8",
        "model.attribute_encoder.params.width=256",
        "model.attribute_encoder.params.input_size=16",
        "model.id_vae.params.hidden_dim=16",
        "model.id_vae.params.latent_dim=8",
        "model.identity_tokens.hidden_dim=16",
        "model.harmonizer.params.gate_hidden=8",
        "model.harmonizer.params.time_embed_dim=16",
    ),
}
NARROW_IMAGE_SIZE = {"sd15": 128}
PHASES = ("conditioning", "unet forward + loss", "backward", "optimizer")


class Marks:
    """Phase boundaries of one step: ``mark(phase)`` closes the open phase and opens ``phase``."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.spans: dict[str, float] = {}
        self._open: tuple[str, float] | None = None

    def __call__(self, phase: str | None) -> None:
        now = self.clock()
        if self._open is not None:
            name, start = self._open
            self.spans[name] = self.spans.get(name, 0.0) + now - start
        self._open = None if phase is None else (phase, now)


class KernelClock:
    """A ``Marks`` clock that reads a running kernel count instead of the time (see ``kernels_by_phase``)."""

    def __init__(self, counter):
        self.counter = counter

    def __call__(self) -> float:
        return float(self.counter.traffic.kernels)


def host_phases(step: Callable[[Marks], None], reps: int) -> dict[str, float]:
    """Median host seconds per phase of ``step(marks)`` over ``reps`` calls (after one untimed)."""
    step(Marks(time.perf_counter))
    runs = []
    for _ in range(reps):
        marks = Marks(time.perf_counter)
        step(marks)
        runs.append(marks.spans)
    return {phase: statistics.median(run.get(phase, 0.0) for run in runs) for phase in runs[0]}


def kernels_by_phase(step: Callable[[Marks], None]) -> dict[str, int]:
    """Eager kernels per phase of one steady-state ``step(marks)``, counted as ``_traffic`` counts them."""
    import _traffic as T

    step(Marks(time.perf_counter))  # the optimizer's first step allocates its state
    counter = T.TrafficCounter(peak_flops=1.0, bandwidth=1.0)
    marks = Marks(KernelClock(counter))
    with counter:
        step(marks)
    return {phase: int(n) for phase, n in marks.spans.items()}


def narrow_overrides(profile: str, overrides=()) -> list[str]:
    """The profile's narrowing keys that its configured variants take, then ``overrides`` (config
    files and key=value): an ablation file's variant may lack a width to cut (``attributes_none``,
    the ``sum`` harmonizer's gates), and a file is layered before every key=value."""
    import _common as C

    if profile not in NARROW_OVERRIDES:
        raise SystemExit(f"--host-overhead: profile {profile!r} has no narrow copy; "
                         f"one of {', '.join(NARROW_OVERRIDES)}")
    model_cfg = C.profile_config(profile, overrides).model
    return C.keys_the_variants_take(model_cfg, NARROW_OVERRIDES[profile]) + list(overrides)


def narrow_steps(profile: str, batch_images: int, bf16: bool, overrides=(), seed: int = 0):
    """``{"full": step, "bare": step}`` on this CPU, each ``step(marks)`` one training step of the
    narrow model (cached latents and identity embeddings, as ``--cached-latents``) or its bare UNet."""
    import _common as C
    from diffusers import UNet2DConditionModel

    device = torch.device("cpu")
    model, cfg = C.build_model(profile, device, narrow_overrides(profile, overrides), seed=seed)
    model.train()
    size = NARROW_IMAGE_SIZE[profile]
    batch = C.pair_batch(batch_images // 2, size, device, seed=seed)
    h = size // model.first_stage.downscale
    channels = model.first_stage.latent_channels
    g = torch.Generator().manual_seed(seed)
    for side in batch.values():  # what a data.latent_cache batch carries (values do not matter here)
        n = side["image"].shape[0]
        side["latent"] = torch.randn(n, channels, h, h, generator=g).half()
        side["masked_latent"] = torch.randn(n, channels, h, h, generator=g).half()
        side["identity_embedding"] = torch.randn(n, model.identity_encoder.embed_dim, generator=g)
    noise = torch.randn(batch_images, channels, h, h, generator=g)
    timesteps = torch.randint(0, model.scheduler.num_train_timesteps, (batch_images,), generator=g)
    torch.manual_seed(seed)
    bare = UNet2DConditionModel.from_config(model.backbone.unet.config).train()
    bare_sample = torch.randn(batch_images, bare.config.in_channels, h, h, generator=g)
    bare_context = torch.randn(batch_images, C.context_tokens(model), int(cfg.model.context_dim), generator=g)

    def step_of(params, loss_fn, first_phase):
        # Fused AdamW: a few kernels a step on the GPU, as the benchmark's and the trainer's.
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)

        def step(marks: Marks) -> None:
            marks(first_phase)
            with C.autocast(device, bf16):
                loss = loss_fn()
            marks("backward")
            loss.backward()
            marks("optimizer")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            marks(None)
        return step

    current: list[Marks | None] = [None]

    def full_loss():
        return model.training_losses(batch, noise=noise, timesteps=timesteps)["loss"]

    # The UNet's first call ends the conditioning phase.
    model.backbone.unet.register_forward_pre_hook(lambda *_: current[0]("unet forward + loss"))
    full = step_of([p for p in model.parameters() if p.requires_grad], full_loss, "conditioning")

    def full_step(marks: Marks) -> None:
        current[0] = marks
        full(marks)

    bare_step = step_of(list(bare.parameters()), lambda: F.mse_loss(
        bare(bare_sample, timesteps, encoder_hidden_states=bare_context, return_dict=False)[0].float(), noise),
        "unet forward + loss")
    return {"full": full_step, "bare": bare_step}
