"""LightningDataModule of same-identity pair batches, built from the ``data:`` config section.

``data:`` keys: ``dataset`` ({name, params} in DATASETS, built with ``image_size``), ``image_size``,
``batch_size`` (pairs per device), ``num_workers``, ``split_seed``, ``split_fractions`` (train, val,
test), optional ``split_file`` (JSON; created on first use, then reused and checked) and optional
``latent_cache`` (folder written by ``id2face cache-latents``: items carry their first-stage latents).

Batches are ``{"a": item_batch, "b": item_batch}`` (default_collate of ``PairDataset`` items).
Under DDP Lightning swaps in its DistributedSampler (``use_distributed_sampler``, on by default),
so no sampler is built here. ``test_dataset`` is the test split as single images for evaluation.
Partners are re-drawn per epoch by ``PairEpochCallback`` (add it to the Trainer's callbacks).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import lightning as L
from torch.utils.data import DataLoader

from ..errors import UserError
from ..registry import DATASETS, to_plain
from .latent_cache import CachedLatents, LatentCache, collate_pairs
from .pairs import LabelledSubset, PairDataset, Split, load_or_create_split


class FacePairDataModule(L.LightningDataModule):
    """Pairs for train/val/test from an identity-disjoint split of one registered dataset.

    ``split_file`` (argument) overrides ``data.split_file``; ``pair_seed`` (default
    ``split_seed``) keys the partner draws. Val and test pairs stay at epoch 0 (fixed pairs, so
    their losses are comparable across epochs).
    """

    def __init__(self, data_cfg: Mapping[str, Any], split_file: str | Path | None = None,
                 pair_seed: int | None = None):
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
        self.split_fractions = tuple(cfg.get("split_fractions", (0.8, 0.1, 0.1)))
        self.split_file = split_file if split_file is not None else cfg.get("split_file")
        self.pair_seed = self.split_seed if pair_seed is None else int(pair_seed)
        self.latent_cache = LatentCache(cfg["latent_cache"]) if cfg.get("latent_cache") else None
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

    def set_epoch(self, epoch: int) -> None:
        """Re-draw training partners for ``epoch`` (call before the epoch's iterator is made)."""
        if self.dataset is not None:
            self.train_pairs.set_epoch(epoch)

    def _loader(self, dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          drop_last=drop_last, persistent_workers=False, collate_fn=collate_pairs)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if len(self.train_pairs) == 0:
            raise UserError("the training split is empty: check data.split_fractions and the dataset")
        return self._loader(self.train_pairs, shuffle=True, drop_last=len(self.train_pairs) >= self.batch_size)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_pairs, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_pairs, shuffle=False)


class PairEpochCallback(L.Callback):
    """Tells the datamodule the epoch at its start (before the loader's iterator and workers exist)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(trainer.current_epoch)
