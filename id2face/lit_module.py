"""ID2FaceModule: trains the ID2Face model with Lightning (losses, AdamW + warmup, EMA, image logs).

Precision (``trainer.precision: bf16-mixed``) and devices come from the Trainer; gradient
checkpointing is a backbone param. The frozen identity encoder and first stage have
``requires_grad=False``: they are left out of the optimiser, and DDP registers gradient hooks
(and all-reduces buckets) only for parameters that require grad, so they cost no gradient sync
(tests/test_lit_module.py checks DDP's reducer size). Every trainable parameter gets a gradient
each step (the null identity tokens through ``torch.where``, or frozen when ``id_dropout`` is 0),
so DDP runs without ``find_unused_parameters``.
(DDP still broadcasts *buffers* from rank 0 each forward; the frozen modules' buffers are
constants, so that only costs bandwidth.) The EMA copy is a submodule (saved in checkpoints,
moved with the module) with ``requires_grad=False`` too.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Mapping

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .data.pixels import unpack_pixels
from .model import ID2Face
from .optim import adamw, check_optim


def micro_batch_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """A 64-bit seed for one rank's micro-batch, distinct for each (seed, epoch, batch, rank)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch, batch_idx, rank]).generate_state(1, np.uint64)[0])


class ID2FaceModule(L.LightningModule):
    """Built from the full resolved config (``model.optim`` holds lr, weight_decay, betas, fused,
    ema_decay, warmup_steps). Logs ``train/loss``, ``train/diffusion``, ... per step and
    ``val/loss``, ``val/diffusion`` per validation epoch (validation runs on the EMA weights, which
    are also the weights ``log_images`` and ``anonymize`` sample with).
    """

    def __init__(self, config: Mapping[str, Any] | DictConfig):
        super().__init__()
        cfg = config if isinstance(config, DictConfig) else OmegaConf.create(config)
        # Saved in checkpoints, so `load_from_checkpoint(path)` rebuilds the same model.
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self.config = cfg
        self.optim_cfg = cfg.model.optim
        check_optim(self.optim_cfg)  # bad optimiser values fail here, before the model is built
        self._ema_decay = float(self.optim_cfg.ema_decay)
        # Every k-th optimiser step, weighted as k steps (ema-pytorch's update_every, its weight
        # corrected): the lerp reads and writes every trainable weight, ~10 GB of memory traffic at
        # SD-1.5 size (~3 ms of an H100's ~350 ms step); k = 10 leaves a tenth of that.
        self._ema_every = int(self.optim_cfg.get("ema_every", 1))
        self.model = ID2Face.from_config(cfg.model)
        # EMA of everything that trains (UNet, harmonizer, token MLP, attribute encoder, id_vae).
        # Not Lightning's EMAWeightAveraging callback: it copies the whole LightningModule (frozen
        # encoder and VAE included) and swaps weights only around validation, while sampling
        # (log_images, anonymize, eval) needs the EMA on demand. Buffers are copied, not
        # averaged: they are running statistics or counters already.
        self.ema = AveragedModel(self.model.trainable_modules(),
                                 multi_avg_fn=get_ema_multi_avg_fn(self._ema_decay), use_buffers=False)
        self.ema.requires_grad_(False)
        # Host copy of ema.n_averaged: branching on the device tensor would sync every step.
        self._ema_updates = 0
        self._ema_step = 0  # the optimiser step of the last update
        self._ema_swapped = False
        self._copy_stream = None  # CUDA: the stream batches are copied on (transfer_batch_to_device)

    def train(self, mode: bool = True) -> "ID2FaceModule":
        super().train(mode)
        self.ema.train(False)  # a weight store: never run in training mode
        return self

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """On CUDA, the batch is copied on a stream of its own, which the compute stream then waits
        for: the copy overlaps the previous step's kernels still queued (the host runs ahead of the
        GPU) instead of running after them with the GPU idle; a pageable batch's wait for its
        stream's queue (see ``FacePairDataModule``) is then a wait for that idle copy stream."""
        if device.type != "cuda":
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        compute = torch.cuda.current_stream(device)
        with torch.cuda.stream(self._copy_stream):
            batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        compute.wait_stream(self._copy_stream)
        # The copies' memory belongs to the copy stream: not reused before the step that reads it is done.
        apply_to_collection(batch, torch.Tensor, lambda t: t.record_stream(compute) if t.is_cuda else None)
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Pixels that travelled as uint8 (``data.pixel_transport``) become float32 on the device."""
        return unpack_pixels(batch)

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def _swap_ema(self) -> None:
        for live, average in zip(self.model.trainable_modules().parameters(), self.ema.module.parameters(),
                                 strict=True):
            held = live.detach().clone()
            live.detach().copy_(average)
            average.detach().copy_(held)
        self._ema_swapped = not self._ema_swapped

    @contextmanager
    def ema_weights(self):
        """Run the body with the EMA weights in the model (restored afterwards)."""
        if self._ema_swapped:  # already in (validation)
            yield
            return
        self._swap_ema()
        try:
            yield
        finally:
            self._swap_ema()

    @torch.no_grad()
    def update_ema(self, steps: int = 1) -> None:
        """``self.ema.update_parameters(...)`` (first call a copy, then the EMA rule) without its two
        host-device syncs per call: it branches on ``n_averaged``, a tensor on the GPU. ``steps``:
        optimiser steps since the last update, all stood for by the live weights (``decay ** steps``)."""
        average = list(self.ema.module.parameters())
        live = [p.detach() for p in self.model.trainable_modules().parameters()]
        if self._ema_updates == 0:
            torch._foreach_copy_(average, live)
        else:
            torch._foreach_lerp_(average, live, 1.0 - self._ema_decay ** steps)
        self.ema.n_averaged.add_(1)
        self._ema_updates += 1

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema_step"] = self._ema_step
        if self._ema_swapped:  # saved mid-validation (a signal, SLURM's USR1): each copy under its own name
            names = {id(p): name for name, p in self.named_parameters()}
            state = checkpoint["state_dict"]
            for live, average in zip(self.model.trainable_modules().parameters(), self.ema.module.parameters(),
                                     strict=True):
                live_key, average_key = names[id(live)], names[id(average)]
                state[live_key], state[average_key] = state[average_key], state[live_key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._ema_updates = int(checkpoint["state_dict"].get("ema.n_averaged", 0))
        self._ema_step = int(checkpoint.get("ema_step", checkpoint.get("global_step", 0)))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: Lightning runs the callbacks' batch-end hooks (the
        # checkpoints among them) before the module's, which would save the EMA one update behind.
        step = self.trainer.global_step + 1  # the step just taken: Lightning counts it after this hook
        if step - self._ema_step >= self._ema_every:
            self.update_ema(step - self._ema_step)
            self._ema_step = step

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Each micro-batch's randomness (noise, timesteps, identity dropout, the identity VAE's
        # sample) is a function of the run's seed, its place in the run and the rank, so a resumed
        # run draws what the uninterrupted one draws (a checkpoint holds no generator state).
        torch.manual_seed(micro_batch_seed(int(self.config.run.seed), self.trainer.current_epoch, batch_idx,
                                           self.global_rank))

    def on_validation_epoch_start(self) -> None:
        if not self._ema_swapped:
            self._swap_ema()

    def on_validation_epoch_end(self) -> None:
        if self._ema_swapped:
            self._swap_ema()

    def setup(self, stage: str) -> None:
        # Cached latents from another first stage would be wrong targets, silently: refuse them.
        cache = getattr(self.trainer.datamodule, "latent_cache", None) if self.trainer.datamodule else None
        if cache is not None:
            cache.check_first_stage(self.model.first_stage)
            if cache.has_identity and not cache.serve_identity_to(self.model.identity_encoder):
                rank_zero_warn(f"latent cache {cache.folder}: its identity embeddings were made by another "
                               f"identity encoder ({cache.meta.get('identity_encoder')}); the step computes them")

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _batch_size(batch) -> int:
        return int(batch["a"]["image"].shape[0])

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        losses = self.model.training_losses(batch)
        # Per-step values of this rank: no cross-process sync (it would stall every step).
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=False,
                      batch_size=self._batch_size(batch))
        return losses["loss"]

    def validation_step(self, batch, batch_idx: int) -> None:
        # Seeded noise and timesteps: validation losses are comparable across evaluations.
        generator = torch.Generator(device=self.device).manual_seed(int(batch_idx))
        losses = self.model.training_losses(batch, generator=generator)
        keys = ("loss", "diffusion", "id_vae", "alignment")
        self.log_dict({f"val/{k}": losses[k] for k in keys}, on_step=False, on_epoch=True, sync_dist=True,
                      batch_size=self._batch_size(batch))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optim = self.optim_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = bool(optim.get("fused", False)) and self.device.type == "cuda"
        optimizer = adamw(params, optim, fused=fused)
        warmup = max(int(optim.warmup_steps), 0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ sampling
    @contextmanager
    def _sampling(self):
        was_training = self.training
        self.eval()
        try:
            with self.ema_weights():
                yield
        finally:
            self.train(was_training)

    def log_images(self, batch, **kwargs) -> dict[str, torch.Tensor]:
        """``ID2Face.log_images`` with the EMA weights in eval mode (a callback decides when)."""
        with self._sampling():
            return self.model.log_images(batch, **kwargs)

    def anonymize(self, images: torch.Tensor, masks: torch.Tensor, **kwargs) -> torch.Tensor:
        """``ID2Face.anonymize`` with the EMA weights in eval mode."""
        with self._sampling():
            return self.model.anonymize(images, masks, **kwargs)
