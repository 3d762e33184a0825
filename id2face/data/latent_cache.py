"""Precomputed frozen features: the frozen first stage's two encodes of every training image
(the image, and the image with its identity region blanked) and the frozen identity encoder's
embedding of it, done once by ``id2face cache-latents`` instead of in every training step. At
SD-1.5 size the encodes are 47 % of a step's FLOPs (``benchmarks/train_step.py --flops-only``);
the identity encoder is a few FLOPs but hundreds of small kernels (``--traffic``).

A cache is a folder: ``latents.npy`` (N, 2, c, h, w) float16, row i = (latent, masked-image latent)
of dataset item i, and ``identity.npy`` (N, D) float32, its identity embedding (a cache made without an
identity encoder lacks it: the step then runs the encoder), both read memory-mapped; ``meta.json``
(written last, so a folder without it is an unfinished cache) records what the rows were made
from: the dataset's items (count, image size, mask mode, identity labels, file paths relative to the
dataset's root, landmarks, and a prepared folder's crop settings, so that a moved dataset keeps its
cache), the first stage (config, hash of its weights) and the identity encoder (config, hash of its
weights and its preprocessing). A cache of an older format is refused: rebuild it. Training with
``data.latent_cache: DIR`` refuses a cache made for other data or another first stage; cached
identity embeddings are served only to the identity encoder that made them (``serve_identity``).

Items of ``CachedLatents`` carry ``latent``, ``masked_latent`` and (when served)
``identity_embedding``; new pixels made from an item (``pairs.augmented_view``) drop them, and
``collate_pairs`` keeps a batch side's cached feature only when all its items have it, so the
model computes exactly what a side lacks.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from ..errors import UserError

# /2: the items' fingerprint covers landmarks and crop settings, the identity encoder's its preprocessing.
CACHE_FORMAT = "id2face-latent-cache/2"
# Formats whose rows may be right but whose meta cannot tell: refused with a request to rebuild.
OLD_FORMATS = ("id2face-latent-cache/1",)
CACHED_KEYS = ("latent", "masked_latent", "identity_embedding")
META_NAME, ROWS_NAME, IDENTITY_NAME = "meta.json", "latents.npy", "identity.npy"
HOW_TO_MAKE = "make one with `id2face cache-latents CONFIG... -o DIR` (same data and model.first_stage as training)"


def items_fingerprint(dataset) -> str:
    """Hash of what a dataset's items are: class, count, image size, mask mode, labels, paths relative to
    its root, landmarks and crop settings. Not the root itself: a dataset copied to scratch keeps its cache."""
    h = hashlib.sha256()
    h.update(f"{type(dataset).__name__}|{len(dataset)}|{getattr(dataset, 'image_size', '')}|"
             f"{getattr(dataset, 'mask_mode', '')}|{getattr(dataset, 'seed', '')}|"
             f"{getattr(dataset, 'prepared', '')}|{getattr(dataset, 'face_scale', '')}|"
             f"{getattr(dataset, 'crop_size', '')}".encode())
    h.update(np.asarray(dataset.identity_labels, dtype=np.int64).tobytes())
    for path in getattr(dataset, "paths", None) or ():
        h.update(path.encode("utf-8") + b"\0")
    # The crops' landmarks: a folder prepared again (other detector settings, another face) has other
    # ones under the same names; and with mask="landmarks" they are the masks.
    landmarks = getattr(dataset, "landmarks", None)
    if isinstance(landmarks, np.ndarray):
        h.update(np.ascontiguousarray(landmarks, dtype=np.float32).tobytes())
    h.update(json.dumps(_crop_settings(dataset), sort_keys=True).encode())
    return h.hexdigest()[:20]


def _crop_settings(dataset) -> dict:
    """A prepared folder's ``prepare.json`` settings that decide its crops' pixels (two `prepare` runs
    at another --face-scale give the same names and labels, other pixels); not ``input`` or ``max_pixels``."""
    if not getattr(dataset, "prepared", False):
        return {}
    from .datasets import META_NAME as PREPARE_META
    from .prepare import _FIXED_SETTINGS  # the settings a rerun into the same folder must repeat

    path = Path(dataset.root) / PREPARE_META
    try:
        meta = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as err:
        raise UserError(f"{path} cannot be read: {err}") from None
    return {key: meta.get(key) for key in ("format", *_FIXED_SETTINGS, "template")}


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a frozen module's class and weights (a random-init or another VAE gives another hash)."""
    h = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


# Plain constructor settings of an identity encoder that change its embeddings but are in no state dict.
PREPROCESSING = ("input_size", "mean", "std")


def encoder_fingerprint(module: torch.nn.Module) -> str:
    """``weights_fingerprint`` and the settings no state dict holds: the preprocessing (``input_size``,
    ``mean``, ``std``: class attributes or constructor params) and the module's other plain public
    attributes (``embed_dim``, ``model_name``, ...). Equal weights that see 64 px instead of 32 px embed otherwise."""
    settings = {name: getattr(module, name) for name in PREPROCESSING if hasattr(module, name)}
    settings.update((name, value) for name, value in vars(module).items()
                    if not name.startswith("_") and name != "training")
    settings = {name: value for name, value in settings.items() if _is_plain(value)}
    h = hashlib.sha256(weights_fingerprint(module).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _is_plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


class LatentCache:
    """A finished cache folder, checked against the dataset and first stage it is used with."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        meta_path = self.folder / META_NAME
        if not meta_path.is_file():
            state = "is unfinished (no meta.json)" if self.folder.is_dir() else "does not exist"
            raise UserError(f"latent cache {self.folder} {state}; {HOW_TO_MAKE}")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"latent cache {meta_path} cannot be read: {err}") from None
        if self.meta.get("format") in OLD_FORMATS:
            raise UserError(f"latent cache {self.folder} is of an older format ({self.meta['format']}) whose "
                            f"checks miss the crop settings, landmarks and identity preprocessing; rebuild it "
                            f"in a new folder: {HOW_TO_MAKE}")
        if self.meta.get("format") != CACHE_FORMAT:
            raise UserError(f"{meta_path} is not an {CACHE_FORMAT} cache (format {self.meta.get('format')!r})")
        # Opened per process: a pickled memmap would copy its data.
        self._rows: np.ndarray | None = None
        self._identity_rows: np.ndarray | None = None
        self.serve_identity = False  # until serve_identity_to() has seen the encoder that made them

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = np.load(self.folder / ROWS_NAME, mmap_mode="r")
        return self._rows

    @property
    def identity_rows(self) -> np.ndarray:
        if self._identity_rows is None:
            self._identity_rows = np.load(self.folder / IDENTITY_NAME, mmap_mode="r")
        return self._identity_rows

    @property
    def has_identity(self) -> bool:
        return "identity_encoder_fingerprint" in self.meta

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rows": None, "_identity_rows": None}

    def check_dataset(self, dataset) -> None:
        made, given = self.meta["items"], items_fingerprint(dataset)
        if made != given:
            raise UserError(f"latent cache {self.folder} was made for other data ({self.meta['dataset']}, "
                            f"{len(self)} items at {self.meta['image_size']} px) than data.dataset "
                            f"({len(dataset)} items at {getattr(dataset, 'image_size', '?')} px: their labels, "
                            f"paths, landmarks or crop settings differ); {HOW_TO_MAKE}")

    def check_first_stage(self, first_stage: torch.nn.Module) -> None:
        if self.meta["first_stage_weights"] != weights_fingerprint(first_stage):
            raise UserError(f"latent cache {self.folder} was made with another first stage "
                            f"({self.meta['first_stage']}) than this model's; {HOW_TO_MAKE}")

    def serve_identity_to(self, identity_encoder: torch.nn.Module) -> bool:
        """Serve the cached identity embeddings from now on if ``identity_encoder`` made them (same
        weights and preprocessing: ``encoder_fingerprint``);
        returns whether it does (another encoder computes its own in the step: slower, not wrong)."""
        self.serve_identity = self.has_identity and \
            self.meta["identity_encoder_fingerprint"] == encoder_fingerprint(identity_encoder)
        return self.serve_identity

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = torch.from_numpy(np.array(self.rows[index]))
        item = {"latent": row[0], "masked_latent": row[1]}
        if self.serve_identity:
            item["identity_embedding"] = torch.from_numpy(np.array(self.identity_rows[index]))
        return item


class CachedLatents(torch.utils.data.Dataset):
    """``base`` whose items also carry their cached ``latent`` and ``masked_latent`` (float16)."""

    def __init__(self, base, cache: LatentCache):
        cache.check_dataset(base)
        self.base, self.cache = base, cache
        self.identity_labels = base.identity_labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return {**self.base[index], **self.cache[index]}

    def __getattr__(self, name: str) -> Any:  # the dataset contract (image_size, paths, ...) is the base's
        if name in ("base", "cache"):
            raise AttributeError(name)
        return getattr(self.base, name)


def collate_pairs(pairs: list[Mapping[str, Mapping[str, Any]]]) -> dict:
    """``default_collate`` of pair items; a side keeps a cached feature only if every item has it."""
    batch = {}
    for side in pairs[0]:
        items = [pair[side] for pair in pairs]
        partial = [key for key in CACHED_KEYS if any(key in item for item in items)
                   and not all(key in item for item in items)]
        if partial:
            items = [{k: v for k, v in item.items() if k not in partial} for item in items]
        batch[side] = default_collate(items)
    return batch


def write_latent_cache(dataset, first_stage: torch.nn.Module, encode: Callable, folder: str | os.PathLike,
                       description: Mapping[str, Any], batch_size: int = 32, num_workers: int = 0,
                       device: str | torch.device = "cpu", progress: bool = True,
                       identity_encoder: torch.nn.Module | None = None, embed: Callable | None = None,
                       precision: str = "32-true") -> Path:
    """Encode every item of ``dataset`` with ``encode(images, masks) -> (latents, masked_latents)``
    and, given ``identity_encoder``, ``embed(images) -> (N, D)`` into ``folder`` (which must not
    exist), in ``precision`` (``id2face.precision``); ``description``: dataset, first-stage and
    identity-encoder configs for the record. Written under ``folder.partial`` and renamed when complete;
    a failure removes ``folder.partial`` (nothing reads it, and the next run would start it afresh anyway)."""
    folder = Path(folder).expanduser()
    if folder.exists():
        raise UserError(f"{folder} exists; latent caches are written to a new folder (remove it to remake)")
    device = torch.device(device)
    # Pinned batches: a copy from pageable memory would wait for the GPU's queued encodes first.
    # Made before the folder: torch's own checks of its arguments then fail before anything is written.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_images_and_masks, pin_memory=device.type == "cuda")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _write_rows(dataset, first_stage, encode, loader, partial, description, device, progress,
                    identity_encoder, embed, precision)
    except BaseException:  # an interrupt too: a half-written folder is never resumed
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, folder)
    return folder


def _write_rows(dataset, first_stage, encode, loader, partial: Path, description, device, progress,
                identity_encoder, embed, precision) -> None:
    from ..precision import autocast

    first_stage.to(device)
    if identity_encoder is not None:
        identity_encoder.to(device)
    rows = identity_rows = None
    done = 0
    for batch in _progress(loader, progress):
        with torch.no_grad(), autocast(precision, device):
            images = batch["image"].to(device, non_blocking=True)
            latents, masked = encode(images, batch["mask"].to(device=device, dtype=images.dtype, non_blocking=True))
            embeddings = embed(images).float().cpu().numpy() if identity_encoder is not None else None
        pair = torch.stack([latents, masked], dim=1).to(torch.float16).cpu().numpy()
        if rows is None:
            rows = np.lib.format.open_memmap(partial / ROWS_NAME, mode="w+", dtype=np.float16,
                                             shape=(len(dataset), *pair.shape[1:]))
            if embeddings is not None:
                identity_rows = np.lib.format.open_memmap(partial / IDENTITY_NAME, mode="w+", dtype=np.float32,
                                                          shape=(len(dataset), *embeddings.shape[1:]))
        rows[done:done + len(pair)] = pair
        if identity_rows is not None:
            identity_rows[done:done + len(pair)] = embeddings
        done += len(pair)
    meta = {"format": CACHE_FORMAT, "count": len(dataset), "latent_shape": list(rows.shape[2:]),
            "dtype": "float16", "items": items_fingerprint(dataset),
            "image_size": getattr(dataset, "image_size", None),
            "first_stage_weights": weights_fingerprint(first_stage), "precision": precision, **description}
    for array in (rows, identity_rows):
        if array is not None:
            array.flush()
    if identity_rows is not None:
        meta.update(identity_dim=int(identity_rows.shape[1]),
                    identity_encoder_fingerprint=encoder_fingerprint(identity_encoder))
    del rows, identity_rows
    (partial / META_NAME).write_text(json.dumps(meta, indent=1, default=str) + "\n")


def _images_and_masks(items: list[dict]) -> dict:
    return default_collate([{"image": item["image"], "mask": item["mask"]} for item in items])


def _progress(loader, enabled: bool):
    if not enabled:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc="cache-latents", unit="batch", total=len(loader), dynamic_ncols=True)
