"""Identity-disjoint train/val/test splits and same-identity pairs.

A split permutes the labelled identities with a seed and cuts the permutation by fractions, so
no identity appears in two splits; unlabelled items (identity -1) go to train. A dataset without
any label (FFHQ) cannot be split by identity and is split by item instead. A split can be saved
to / loaded from a JSON file that records the labels' fingerprint, so a run (and its evaluation)
reuses exactly the same items, and a file made for another dataset or setting is refused.

``PairDataset`` turns a subset of a dataset into same-identity pairs ``{"a": item, "b": item}``.
The partner of item ``i`` is another image of the same identity drawn deterministically from
(seed, epoch, i). **One-image rule**: an item whose identity has no other image in the subset
(a singleton identity, or any unlabelled item) is paired with an augmented view of itself: the
same random affine shift/scale applied to image, mask and landmarks, plus a colour jitter on the
image (see ``augmented_view``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .latent_cache import CACHED_KEYS

SPLITS = ("train", "val", "test")
SPLIT_FORMAT = "id2face-split/1"
_PAIR_TAG = 0x9A1


def labels_fingerprint(identity_labels) -> str:
    """Short hash of the label array: a split file is valid only for the dataset it was made for."""
    labels = np.ascontiguousarray(np.asarray(identity_labels, dtype="<i8"))
    return hashlib.sha256(labels.tobytes()).hexdigest()[:16]


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):  # a word, a nested list, a bare number
        values = ()
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise UserError(f"split_fractions must be three non-negative numbers (train, val, test) summing to 1, "
                        f"got {list(values) or fractions!r}")
    return values  # type: ignore[return-value]


@dataclass
class Split:
    """Item indices of each split plus what they were made from."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int
    fractions: tuple[float, float, float]
    num_items: int
    labels_sha256: str
    by_identity: bool = True  # False: the dataset had no labels and was split by item
    path: Path | None = field(default=None, compare=False)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise KeyError(f"unknown split '{name}'; valid: {', '.join(SPLITS)}")
        return getattr(self, name)

    def to_json(self) -> dict:
        return {
            "format": SPLIT_FORMAT, "seed": self.seed, "fractions": list(self.fractions),
            "num_items": self.num_items, "labels_sha256": self.labels_sha256, "by_identity": self.by_identity,
            **{name: self[name].tolist() for name in SPLITS},
        }

    def save(self, path) -> Path:
        """Write atomically (every DDP rank may write the same content at once)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.to_json(), handle)
        os.replace(tmp, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path) -> "Split":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != SPLIT_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {SPLIT_FORMAT!r}")
            return cls(**{name: np.asarray(data[name], dtype=np.int64) for name in SPLITS},
                       seed=int(data["seed"]), fractions=tuple(data["fractions"]), num_items=int(data["num_items"]),
                       labels_sha256=str(data["labels_sha256"]), by_identity=bool(data["by_identity"]), path=path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"split file {path} cannot be read: {err}") from None

    def check(self, identity_labels, fractions=None, seed=None) -> None:
        """Refuse a split made for other labels, fractions or seed than the ones in use."""
        where = f"split file {self.path}" if self.path else "split"
        labels = np.asarray(identity_labels)
        if self.num_items != len(labels) or self.labels_sha256 != labels_fingerprint(labels):
            raise UserError(f"{where} was made for another dataset ({self.num_items} items, labels "
                            f"{self.labels_sha256}; this one has {len(labels)} items, labels "
                            f"{labels_fingerprint(labels)}): delete it or point data.split_file elsewhere")
        if fractions is not None and not np.allclose(self.fractions, check_fractions(fractions)):
            raise UserError(f"{where} was made with split_fractions {list(self.fractions)}, the config asks for "
                            f"{list(fractions)}: delete it or point data.split_file elsewhere")
        if seed is not None and int(seed) != self.seed:
            raise UserError(f"{where} was made with split_seed {self.seed}, the config asks for {seed}: "
                            f"delete it or point data.split_file elsewhere")


def split_identities(identity_labels, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
    """Identity-disjoint split: permute the labelled identities (seeded), cut by ``fractions``.

    Cuts are at ``round(cumsum(fractions) * num_identities)``; unlabelled items (-1) join train.
    If no item is labelled, items are permuted and cut instead (``by_identity=False``).
    """
    fractions = check_fractions(fractions)
    labels = np.asarray(identity_labels, dtype=np.int64)
    if labels.ndim != 1:
        raise UserError(f"identity_labels must be one label per item, got shape {labels.shape}")
    rng = np.random.default_rng([int(seed), 0x5B117])
    labelled = labels >= 0
    identities = np.unique(labels[labelled])
    by_identity = len(identities) > 0
    units = rng.permutation(identities if by_identity else np.arange(len(labels)))
    cut1, cut2 = (int(round(c * len(units))) for c in np.cumsum(fractions)[:2])
    parts = units[:cut1], units[cut1:cut2], units[cut2:]
    if by_identity:
        indices = [np.flatnonzero(np.isin(labels, part)) for part in parts]
        indices[0] = np.union1d(indices[0], np.flatnonzero(~labelled))
    else:
        indices = [np.sort(part) for part in parts]
    return Split(*(i.astype(np.int64) for i in indices), seed=int(seed), fractions=fractions,
                 num_items=len(labels), labels_sha256=labels_fingerprint(labels), by_identity=by_identity)


def load_or_create_split(identity_labels, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                         path=None) -> Split:
    """The split stored at ``path`` (checked against labels, fractions and seed), else a new one,
    saved to ``path`` when given."""
    if path is not None and Path(path).is_file():
        split = Split.load(path)
        split.check(identity_labels, fractions, seed)
        return split
    split = split_identities(identity_labels, fractions, seed)
    if path is not None:
        try:
            split.save(path)
        except OSError as err:
            raise UserError(f"cannot write split file {path}: {err.strerror or err}") from None
    return split


class LabelledSubset(torch.utils.data.Subset):
    """``Subset`` that keeps the dataset contract (``identity_labels`` of its own items)."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, np.asarray(indices, dtype=np.int64).tolist())
        self.identity_labels = np.asarray(dataset.identity_labels, dtype=np.int64)[self.indices]


def augmented_view(item: dict, rng: np.random.Generator, max_shift: float = 0.06,
                   scale_range: tuple[float, float] = (0.92, 1.08), jitter: float = 0.1) -> dict:
    """A new view of one item: the same random shift (fraction of the size) and scale about the
    centre applied to image (bilinear, border padding), mask (nearest, zero padding) and
    landmarks, then brightness/contrast/saturation jitter of +-``jitter`` on the image only.
    Other keys are copied unchanged, except cached first-stage latents, which the new pixels void."""
    image = item["image"]
    size_y, size_x = image.shape[-2:]
    scale = float(rng.uniform(*scale_range))
    shift = rng.uniform(-max_shift, max_shift, size=2) * 2.0  # normalised units span 2
    brightness, contrast, saturation = rng.uniform(1.0 - jitter, 1.0 + jitter, size=3)
    # output normalised coords n' = scale * n + shift; grid_sample needs the inverse map
    theta = torch.tensor([[1 / scale, 0.0, -shift[0] / scale], [0.0, 1 / scale, -shift[1] / scale]],
                         dtype=image.dtype)[None]
    grid = F.affine_grid(theta, (1, 1, size_y, size_x), align_corners=False)
    out = {k: v for k, v in item.items() if k not in CACHED_KEYS}
    warped = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    x = (warped + 1.0) / 2.0
    x = x * brightness
    x = (x - x.mean()) * contrast + x.mean()
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    x = grey + (x - grey) * saturation
    out["image"] = (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
    if "mask" in item:
        out["mask"] = F.grid_sample(item["mask"][None], grid, mode="nearest", padding_mode="zeros",
                                    align_corners=False)[0]
    if "landmarks" in item:
        extent = item["landmarks"].new_tensor([size_x, size_y])
        normalised = item["landmarks"] / extent * 2.0 - 1.0
        moved = normalised * scale + normalised.new_tensor(shift)
        out["landmarks"] = (moved + 1.0) / 2.0 * extent
    return out


class PairDataset(torch.utils.data.Dataset):
    """Same-identity pairs over ``base[indices]``: item ``i`` -> ``{"a": base[indices[i]], "b": partner}``.

    The partner is another item of the subset with the same identity, uniform among them, drawn from
    (seed, epoch, i); with none (singleton or unlabelled) it is ``augmented_view`` of ``a`` drawn
    from the same key. Call ``set_epoch`` before each epoch to re-draw partners (the datamodule's
    training loader does, at each pass); with ``num_workers > 0`` workers pick up the epoch when
    their iterator is created, so keep ``persistent_workers`` off.
    """

    def __init__(self, base, indices=None, seed: int = 0):
        self.base = base
        self.indices = np.arange(len(base), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        self.seed = int(seed)
        self.epoch = 0
        labels = np.asarray(base.identity_labels, dtype=np.int64)[self.indices]
        self.identity_labels = labels
        # group positions by identity: order[start[i] : start[i] + count[i]] are i's same-identity items
        self._order = np.argsort(labels, kind="stable")
        sorted_labels = labels[self._order]
        first = np.searchsorted(sorted_labels, labels, side="left")
        last = np.searchsorted(sorted_labels, labels, side="right")
        self._start = first
        self._count = np.where(labels >= 0, last - first, 1)
        self._rank = np.empty(len(labels), dtype=np.int64)
        self._rank[self._order] = np.arange(len(labels)) - first[self._order]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def partner_position(self, i: int, rng: np.random.Generator | None = None) -> int | None:
        """Position (in this subset) of item ``i``'s partner, or None for the one-image rule."""
        if self._count[i] < 2:
            return None
        rng = rng or self._rng(i)
        pick = int(rng.integers(self._count[i] - 1))
        pick += pick >= self._rank[i]  # skip i itself
        return int(self._order[self._start[i] + pick])

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([_PAIR_TAG, self.seed, self.epoch, int(i)])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"pair index {i} out of range for {len(self)} pairs")
        rng = self._rng(i)
        a = self.base[int(self.indices[i])]
        j = self.partner_position(i, rng)
        b = augmented_view(a, rng) if j is None else self.base[int(self.indices[j])]
        return {"a": a, "b": b}
