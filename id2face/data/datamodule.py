"""LightningDataModule of same-identity pair batches, built from the ``data:`` config section.

``data:`` keys: ``dataset`` ({name, params} in DATASETS, built with ``image_size``), ``image_size``,
``batch_size`` (pairs per device), ``num_workers``, ``split_seed``, ``split_fractions`` (train, val,
test), optional ``split_file`` (JSON; created on first use, then reused and checked), optional
``latent_cache`` (folder written by ``id2face cache-latents``: items carry their first-stage latents)
and ``pixel_transport`` (``float32``, the default, or ``uint8``: ``id2face.data.pixels``).

Batches are ``{"a": item_batch, "b": item_batch}`` (default_collate of ``PairDataset`` items; with
``uint8`` transport their images and masks are uint8 until ``pixels.unpack_pixels``).
``test_dataset`` is the test split as single images for evaluation.

Training order and partners are functions of (seed, epoch), never of the global RNG: the training
loader shuffles with ``EpochShuffle`` (a ``RandomSampler``, so under DDP Lightning swaps in its
DistributedSampler, seeded the same way), and at each pass sets the pairs' epoch from its
sampler's (Lightning sets that at every epoch start, also after a mid-epoch resume, where it skips
``on_train_epoch_start``). It is a ``ResumableLoader``: Lightning saves how far into the epoch it
was, so a resumed run continues the epoch with the batches it had not seen, in the order an
uninterrupted run sees them.

Under a trainer on CUDA the loaders put their batches in pinned memory: a copy to the GPU from
pageable memory first waits for every kernel queued on its stream (CUDA's API synchronisation
behaviour), so each training step would start on a drained GPU queue; from pinned memory it does not
wait (``ID2FaceModule.transfer_batch_to_device`` also copies on a stream of its own).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler

from ..errors import UserError
from ..registry import DATASETS, to_plain
from .latent_cache import CachedLatents, LatentCache
from .pairs import LabelledSubset, PairDataset, Split, check_fractions, load_or_create_split
from .pixels import pair_collate


class FacePairDataModule(L.LightningDataModule):
    """Pairs for train/val/test from an identity-disjoint split of one registered dataset.

    ``split_file`` (argument) overrides ``data.split_file``; ``pair_seed`` (default
    ``split_seed``) keys the partner draws, ``shuffle_seed`` (default ``pair_seed``; training passes
    ``run.seed``) the training order. Val and test pairs stay at epoch 0 (fixed pairs, so their
    losses are comparable across epochs).
    """

    def __init__(self, data_cfg: Mapping[str, Any], split_file: str | Path | None = None,
                 pair_seed: int | None = None, shuffle_seed: int | None = None):
        super().__init__()
        cfg = dict(to_plain(data_cfg))
        missing = [k for k in ("dataset", "image_size", "batch_size") if k not in cfg]
        if missing:
            raise UserError(f"data config lacks {', '.join(missing)}")
        self.dataset_node = cfg["dataset"]
        self.image_size = int(cfg["image_size"])
        self.batch_size = int(cfg["batch_size"])
        self.num_workers = int(cfg.get("num_workers", 0))
        self.split_seed = int(cfg.get("split_seed", 0))
        self.split_fractions = check_fractions(cfg.get("split_fractions", (0.8, 0.1, 0.1)))
        self.split_file = split_file if split_file is not None else cfg.get("split_file")
        self.pair_seed = self.split_seed if pair_seed is None else int(pair_seed)
        self.shuffle_seed = self.pair_seed if shuffle_seed is None else int(shuffle_seed)
        self.latent_cache = LatentCache(cfg["latent_cache"]) if cfg.get("latent_cache") else None
        self.collate = pair_collate(cfg.get("pixel_transport") or "float32")
        if self.batch_size < 1 or self.num_workers < 0:
            raise UserError(f"data.batch_size must be >= 1 and data.num_workers >= 0, "
                            f"got {self.batch_size} and {self.num_workers}")
        self.dataset = None
        self.split: Split | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        self.dataset = DATASETS.build(self.dataset_node, image_size=self.image_size)
        self.split = load_or_create_split(self.dataset.identity_labels, self.split_fractions, self.split_seed,
                                          self.split_file)
        source = self.dataset if self.latent_cache is None else CachedLatents(self.dataset, self.latent_cache)
        self.train_pairs = PairDataset(source, self.split.train, seed=self.pair_seed)
        self.val_pairs = PairDataset(source, self.split.val, seed=self.pair_seed)
        self.test_pairs = PairDataset(source, self.split.test, seed=self.pair_seed)
        self.test_dataset = LabelledSubset(self.dataset, self.split.test)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if len(self.train_pairs) == 0:
            raise UserError("the training split is empty: check data.split_fractions and the dataset")
        # workers pick up the pairs' epoch when their iterator is made: not persistent
        return ResumableLoader(self.train_pairs, batch_size=self.batch_size,
                               sampler=EpochShuffle(self.train_pairs, self.shuffle_seed),
                               num_workers=self.num_workers, drop_last=len(self.train_pairs) >= self.batch_size,
                               persistent_workers=False, collate_fn=self.collate, pin_memory=self._pin_memory())

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._fixed_loader(self.val_pairs)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._fixed_loader(self.test_pairs)

    def _fixed_loader(self, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self.collate, pin_memory=self._pin_memory())

    def _pin_memory(self) -> bool:
        """Pinned batches when the attached trainer runs on CUDA (see the module docstring)."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"


class EpochShuffle(RandomSampler):
    """A permutation drawn from (seed, epoch) alone: the same epoch is the same order in any process,
    so a resumed run can replay it. ``set_epoch`` is Lightning's per-epoch call."""

    def __init__(self, data_source, seed: int):
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)  # as DistributedSampler seeds
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableLoader(DataLoader):
    """A DataLoader Lightning can checkpoint mid-epoch (its ``state_dict``/``load_state_dict``
    protocol on loaders). The state is the epoch and how many batches of it were handed out; the
    first pass of that epoch after a load skips them by index (nothing is read for them). Each pass
    also sets its dataset's epoch from the sampler's (the pairs' partners), before workers start.
    """

    def state_dict(self) -> dict:
        return {"epoch": getattr(self, "_pass_epoch", 0), "batches_done": getattr(self, "_batches_done", 0)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._resume = (int(state.get("epoch", 0)), int(state.get("batches_done", 0)))

    def __iter__(self):
        # A generator: this body runs at the first next(), after Lightning's set_epoch for the epoch.
        epoch = int(getattr(self.sampler, "epoch", 0))
        resume_epoch, resume_at = getattr(self, "_resume", (None, 0))
        self._resume = (None, 0)
        skip = resume_at if resume_epoch == epoch and 0 < resume_at < len(self) else 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self._pass_epoch, self._batches_done = epoch, skip
        self._skip_now = skip
        try:
            batches = super().__iter__()  # reads _index_sampler now, in every worker setting
        finally:
            self._skip_now = 0
        for batch in batches:
            self._batches_done += 1
            yield batch

    @property
    def _index_sampler(self):
        index_sampler = super()._index_sampler
        skip = getattr(self, "_skip_now", 0)
        return _SkipBatches(index_sampler, skip) if skip else index_sampler


class _SkipBatches:
    """A batch sampler without its first ``skip`` batches."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, int(skip)

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)
