"""Real face datasets: CelebA, CelebA-HQ, VGGFace2, any identity folder, FFHQ.

One rule for all of them (``root`` is the dataset's ``root`` parameter):

* **Prepared mode** -- ``root/manifest.jsonl`` exists: ``root`` is the output of
  ``id2face prepare``. Items are the manifest entries with a usable crop (status ``ok`` or
  ``multiple_faces``); the identity of each is the one ``prepare`` wrote from the dataset's
  label files, landmarks are the aligned ones. This is the intended path.
* **Raw mode** -- otherwise ``root`` is the dataset in its own published layout (described in each
  class). Images are read as they are and taken to be aligned crops already: a centre square is
  cut and resized, and landmarks and mask are those of the template. Only where the dataset ships
  5-point landmarks (CelebA) is each image warped onto the template with them. Raw mode suits
  ArcFace-aligned crop collections; for CelebA-HQ, FFHQ and VGGFace2 photos it gives approximate
  masks: run ``prepare`` first.

Item contract: ``image`` (3, S, S) float [-1, 1] RGB, ``mask`` (1, S, S) {0, 1} inner face (from
the template by default, ``mask="landmarks"`` from each item's landmarks), ``landmarks`` (5, 2)
pixel (x, y), ``identity`` int. Identities are numbered 0..K-1 in sorted order of the dataset's own
labels (numeric order where all labels are integers); ``identity_names[k]`` is label k as the
dataset spells it; -1 = unlabelled. ``identity_labels`` (np.int64, one per item) is what the
pair sampler reads.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..registry import DATASETS
from .align import (crop_face, estimate_similarity, hflip_landmarks, inner_face_mask, scale_points,
                    template_landmarks, transform_points)
from .imageio import ImageReadError, is_image_name, read_image

MANIFEST_NAME = "manifest.jsonl"
META_NAME = "prepare.json"
USABLE_STATUSES = frozenset({"ok", "multiple_faces"})
MASK_MODES = ("template", "landmarks")


@dataclass
class RawEntry:
    """One image of a raw dataset layout: ``path`` relative to the root (POSIX), its identity
    label as the dataset spells it (None = unlabelled), extra manifest fields, and 5 landmarks in
    the image when the dataset ships them."""

    path: str
    identity: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    landmarks: list[list[float]] | None = None


def is_usable(entry: dict) -> bool:
    return entry.get("status") in USABLE_STATUSES and bool(entry.get("output"))


def read_manifest(path: str | Path) -> list[dict]:
    """Manifest entries in file order; a torn last line (an interrupted run) is ignored."""
    entries = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "source" in entry:
                entries.append(entry)
    return entries


def index_labels(labels: Iterable[str | None]) -> tuple[np.ndarray, list[str]]:
    """String labels -> (int64 ids 0..K-1, -1 for None; names in id order)."""
    labels = list(labels)
    names = sorted({label for label in labels if label is not None}, key=_label_sort_key)
    lookup = {name: i for i, name in enumerate(names)}
    ids = np.array([lookup[label] if label is not None else -1 for label in labels], dtype=np.int64)
    return ids, names


def _label_sort_key(label: str):
    return (0, int(label), label) if re.fullmatch(r"-?\d+", label) else (1, 0, label)


def hflip_item(item: dict) -> dict:
    """The mirrored item (image, mask, landmarks re-ordered so left/right stay image-left/right)."""
    flipped = dict(item)
    flipped["image"] = item["image"].flip(-1)
    flipped["mask"] = item["mask"].flip(-1)
    size = item["image"].shape[-1]
    flipped["landmarks"] = torch.from_numpy(hflip_landmarks(item["landmarks"].numpy(), size)).float()
    return flipped


class AlignedFaceDataset(torch.utils.data.Dataset):
    """Shared reading of prepared output and raw layouts (see the module docstring).

    Subclasses implement ``scan_raw(root, **layout)`` for their published layout and list its
    keyword names in ``layout_params``; ``labelled = False`` marks datasets without identities.
    """

    labelled = True
    layout_params: tuple[str, ...] = ()
    registered_name = ""

    def __init__(self, root: str | os.PathLike, image_size: int, mask: str = "template", **layout: Any):
        self.root = Path(root).expanduser()
        self.image_size = int(image_size)
        if mask not in MASK_MODES:
            raise UserError(f"{self.registered_name}: mask must be one of {', '.join(MASK_MODES)}, got {mask!r}")
        self.mask_mode = mask
        if not self.root.is_dir():
            raise UserError(f"{self.registered_name}: dataset root {self.root} is not a folder")
        self.prepared = (self.root / MANIFEST_NAME).is_file()
        records = self._prepared_records() if self.prepared else self._raw_records(layout)
        records = [r for r in records if self._keep(r[3])]
        if not records:
            raise UserError(f"{self.registered_name}: no usable images under {self.root}"
                            + (" (manifest has no ok entries)" if self.prepared else ""))
        # Paths as one bytes array, not a list of str: DataLoader workers forked from this process
        # would otherwise copy every page that a str refcount touches (millions for VGGFace2).
        # fsencode, not utf-8: a file name that is not valid UTF-8 (Latin-1 "caf\xe9.jpg") comes
        # from os.walk and the manifest as surrogate escapes, which only fsencode maps back to its bytes.
        self._paths = np.array([os.fsencode(r[0]) for r in records])
        labels = [r[1] for r in records] if self.labelled else [None] * len(records)
        self.identity_labels, self.identity_names = index_labels(labels)
        if self.labelled and not self.identity_names:
            raise UserError(f"{self.registered_name}: no identity labels found for the images under {self.root}")
        self.landmarks = np.stack([np.full((5, 2), np.nan) if r[2] is None else np.asarray(r[2], np.float64)
                                   for r in records]).astype(np.float32)
        self._template = template_landmarks(self.image_size, self.face_scale).astype(np.float32)
        self._template_mask = torch.from_numpy(inner_face_mask(self._template, self.image_size))[None]

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def scan_raw(cls, root: str | os.PathLike, **layout: Any) -> list[RawEntry]:  # pragma: no cover
        raise NotImplementedError

    def _keep(self, extra: dict) -> bool:
        """Subclass filter on an entry's extra fields (e.g. CelebA's official partition)."""
        return True

    def _prepared_records(self) -> list[tuple]:
        meta_path = self.root / META_NAME
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.crop_size = int(meta.get("size", 0)) or None
        self.face_scale = float(meta.get("face_scale", 1.0))
        made_by = meta.get("dataset")
        if made_by and made_by != self.registered_name and self.labelled:
            warnings.warn(f"{self.root} was prepared with --dataset {made_by}; reading it as "
                          f"{self.registered_name} (identities come from its manifest)", stacklevel=3)
        records = []
        for entry in read_manifest(self.root / MANIFEST_NAME):
            if not is_usable(entry):
                continue
            identity = entry.get("identity")
            records.append((entry["output"], None if identity is None else str(identity),
                            entry.get("landmarks_crop"), entry))
        return records

    def _raw_records(self, layout: dict) -> list[tuple]:
        self.crop_size, self.face_scale = None, 1.0
        entries = self.scan_raw(self.root, **layout)
        return [(e.path, e.identity, e.landmarks, e.extra) for e in entries]

    # -- items -------------------------------------------------------------------------------
    @property
    def paths(self) -> list[str]:
        """Item paths relative to ``root`` (crops in prepared mode, source images in raw mode)."""
        return [os.fsdecode(p) for p in self._paths]

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict:
        size = self.image_size
        path = self.root / os.fsdecode(self._paths[index])
        landmarks = self.landmarks[index]
        if self.prepared:
            pixels, landmarks = self._load_prepared(path, landmarks)
        else:
            pixels, landmarks = self._load_raw(path, landmarks)
        image = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0
        landmarks = torch.from_numpy(np.asarray(landmarks, dtype=np.float32))
        if self.mask_mode == "template":
            mask = self._template_mask.clone()
        else:
            mask = torch.from_numpy(inner_face_mask(landmarks.numpy(), size))[None]
        return {"image": image, "mask": mask, "landmarks": landmarks,
                "identity": int(self.identity_labels[index])}

    def _load_prepared(self, path: Path, landmarks: np.ndarray):
        try:
            with Image.open(path) as pil:
                pil = pil.convert("RGB")
        except (OSError, ValueError) as err:
            raise UserError(f"{self.registered_name}: cannot read prepared crop {path} ({err}); "
                            f"rerun `id2face prepare` with the same -o to redo missing crops") from None
        crop_size = pil.width
        if pil.size != (self.image_size, self.image_size):
            pil = pil.resize((self.image_size, self.image_size), Image.BICUBIC)
        if np.isnan(landmarks).any():
            return np.asarray(pil), self._template
        return np.asarray(pil), scale_points(landmarks, crop_size, self.image_size)

    def _load_raw(self, path: Path, landmarks: np.ndarray):
        size = self.image_size
        try:
            pixels = read_image(path).pixels
        except ImageReadError as err:
            raise UserError(f"{self.registered_name}: {path}: {err} ({err.status}); "
                            f"`id2face prepare` screens and reports such files") from None
        if not np.isnan(landmarks).any():  # the dataset ships landmarks: align exactly
            matrix = estimate_similarity(landmarks, self._template)
            return crop_face(pixels, matrix, size), transform_points(landmarks, matrix)
        height, width = pixels.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        pil = Image.fromarray(pixels[top:top + side, left:left + side])
        if side != size:
            pil = pil.resize((size, size), Image.BICUBIC)
        return np.asarray(pil), self._template

    def __repr__(self) -> str:
        labelled = int((self.identity_labels >= 0).sum())
        return (f"{type(self).__name__}(root={str(self.root)!r}, mode={'prepared' if self.prepared else 'raw'}, "
                f"images={len(self)}, labelled={labelled}, identities={len(self.identity_names)}, "
                f"image_size={self.image_size})")


# -- layout helpers --------------------------------------------------------------------------
def list_images(base: Path, recursive: bool = True) -> list[Path]:
    """Image files (by extension) under ``base``, sorted, hidden files and folders skipped."""
    if not recursive:
        return sorted(p for p in base.iterdir() if p.is_file() and is_image_name(p))
    found = []
    for folder, subfolders, files in os.walk(base):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found.extend(Path(folder) / f for f in files if is_image_name(f))
    return sorted(found)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _inside(root: Path, folder: str, name: str) -> str:
    """``folder``, a layout parameter naming a folder of the dataset, normalized ("a/../b" -> "b")
    and refused unless it stays inside ``root``: item paths are relative to ``root`` and `prepare`
    writes each crop at OUTPUT/images/<that path>, so "../.." would read above the dataset and
    write above OUTPUT. Checked by name, not resolved: a symlinked subset folder stays usable."""
    relative = os.path.normpath(folder)
    if Path(folder).is_absolute() or relative == ".." or relative.startswith(".." + os.sep):
        raise UserError(f"{name}={folder!r} must be a folder inside the dataset root {root}")
    return relative


def _find_dir(root: Path, candidates: Iterable[str], what: str) -> Path:
    candidates = list(candidates)
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    raise UserError(f"no {what} folder under {root} (looked for {', '.join(candidates)})")


def _find_file(root: Path, explicit: str | None, name: str, folders: Iterable[str | Path],
               required: bool = True) -> Path | None:
    if explicit:
        path = Path(explicit).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise UserError(f"{name} not found at {path}")
        return path
    tried = []
    for folder in folders:
        path = root / folder / name
        tried.append(str(path))
        if path.is_file():
            return path
    if required:
        raise UserError(f"{name} not found (looked at {', '.join(tried)}); pass its path in the dataset params")
    return None


def _read_columns(path: Path, skip_header: bool = False) -> list[list[str]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            parts = line.split()
            if parts and not (skip_header and number == 0 and not _is_int(parts[0])):
                rows.append(parts)
    return rows


def _is_int(text: str) -> bool:
    return bool(re.fullmatch(r"-?\d+", text))


def _celeba_landmarks(path: Path | None) -> dict[str, list[list[float]]]:
    """``list_landmarks[_align]_celeba.txt``: a count line, a header line, then
    ``000001.jpg lefteye_x lefteye_y righteye_x ... rightmouth_y`` (image-left first)."""
    if path is None:
        return {}
    table = {}
    for parts in _read_columns(path):
        if len(parts) == 11 and all(_is_int(p) for p in parts[1:]):
            values = [float(p) for p in parts[1:]]
            table[parts[0]] = [values[i:i + 2] for i in range(0, 10, 2)]
    return table


# -- datasets ------------------------------------------------------------------------------
@DATASETS.register("celeba")
class CelebA(AlignedFaceDataset):
    """CelebA (Liu et al. 2015), 10,177 identities.

    Raw layout (either the Google Drive tree or torchvision's flat one)::

        root/img_align_celeba/000001.jpg ...  (or root/Img/img_align_celeba, root/img_celeba)
        root/identity_CelebA.txt              (or root/Anno/): "000001.jpg 2880" per line
        root/list_eval_partition.txt          (optional, or root/Eval/): "000001.jpg 0|1|2"
        root/list_landmarks_align_celeba.txt  (optional, or root/Anno/): 5 points per image

    With the landmarks file, raw images are warped onto the template with CelebA's own
    landmarks. ``partition`` (train/val/test) keeps one official partition (identity-disjoint in
    CelebA); it needs list_eval_partition.txt (prepare copies the partition into the manifest).
    """

    layout_params = ("identity_file", "image_dir")
    registered_name = "celeba"
    PARTITIONS = {"0": "train", "1": "val", "2": "test"}

    def __init__(self, root: str, image_size: int = 256, partition: str | None = None,
                 identity_file: str | None = None, image_dir: str | None = None, mask: str = "template"):
        if partition not in (None, "train", "val", "test"):
            raise UserError(f"celeba: partition must be train, val, test or null, got {partition!r}")
        self.partition = partition
        super().__init__(root, image_size, mask, identity_file=identity_file, image_dir=image_dir)

    def _keep(self, extra: dict) -> bool:
        if self.partition is None:
            return True
        if "partition" not in extra:
            raise UserError(f"celeba: partition={self.partition!r} needs list_eval_partition.txt "
                            f"(in the raw root, or present when `prepare` ran)")
        return extra["partition"] == self.partition

    @classmethod
    def scan_raw(cls, root, identity_file: str | None = None, image_dir: str | None = None) -> list[RawEntry]:
        root = Path(root)
        image_dir = _inside(root, image_dir, "celeba: image_dir") if image_dir else None
        images = _find_dir(root, [image_dir] if image_dir else
                           ["img_align_celeba", "Img/img_align_celeba", "img_celeba", "Img/img_celeba"], "CelebA image")
        identity_path = _find_file(root, identity_file, "identity_CelebA.txt", ["", "Anno"])
        identities = {parts[0]: parts[1] for parts in _read_columns(identity_path) if len(parts) >= 2}
        near = ["", "Anno", "Eval", identity_path.parent]
        partition_path = _find_file(root, None, "list_eval_partition.txt", near, required=False)
        partitions = {p[0]: cls.PARTITIONS.get(p[1], p[1]) for p in _read_columns(partition_path)
                      if len(p) >= 2} if partition_path else {}
        aligned = "align" in images.name
        landmarks = _celeba_landmarks(_find_file(
            root, None, "list_landmarks_align_celeba.txt" if aligned else "list_landmarks_celeba.txt", near,
            required=False))
        entries = []
        for path in list_images(images, recursive=False):
            extra = {"partition": partitions[path.name]} if path.name in partitions else {}
            entries.append(RawEntry(_relative(path, root), identities.get(path.name), extra, landmarks.get(path.name)))
        return entries


@DATASETS.register("celebahq")
class CelebAHQ(AlignedFaceDataset):
    """CelebA-HQ (Karras et al. 2018), 30,000 images of 6,217 CelebA identities.

    Raw layout (CelebAMask-HQ's)::

        root/CelebA-HQ-img/0.jpg ... 29999.jpg     (any name whose trailing digits are the HQ index)
        root/CelebA-HQ-to-CelebA-mapping.txt       "idx orig_idx orig_file" header, then "0 119613 119614.jpg"
        root/identity_CelebA.txt                   CelebA's identity file (or root/Anno/; or identity_file)

    The identity of HQ image ``idx`` is CelebA's identity of ``orig_file``.
    """

    layout_params = ("identity_file", "mapping_file", "image_dir")
    registered_name = "celebahq"

    def __init__(self, root: str, image_size: int = 256, identity_file: str | None = None,
                 mapping_file: str | None = None, image_dir: str | None = None, mask: str = "template"):
        super().__init__(root, image_size, mask, identity_file=identity_file, mapping_file=mapping_file,
                         image_dir=image_dir)

    @classmethod
    def scan_raw(cls, root, identity_file: str | None = None, mapping_file: str | None = None,
                 image_dir: str | None = None) -> list[RawEntry]:
        root = Path(root)
        image_dir = _inside(root, image_dir, "celebahq: image_dir") if image_dir else None
        images = _find_dir(root, [image_dir] if image_dir else ["CelebA-HQ-img", "."], "CelebA-HQ image")
        mapping_path = _find_file(root, mapping_file, "CelebA-HQ-to-CelebA-mapping.txt", ["", images.parent])
        identity_path = _find_file(root, identity_file, "identity_CelebA.txt", ["", "Anno", mapping_path.parent])
        original = {int(p[0]): p[2] for p in _read_columns(mapping_path, skip_header=True)
                    if len(p) >= 3 and _is_int(p[0])}
        identities = {p[0]: p[1] for p in _read_columns(identity_path) if len(p) >= 2}
        entries = []
        for path in list_images(images, recursive=False):
            digits = re.search(r"(\d+)$", path.stem)
            orig_file = original.get(int(digits.group(1))) if digits else None
            extra = {"celeba_file": orig_file} if orig_file else {}
            entries.append(RawEntry(_relative(path, root), identities.get(orig_file) if orig_file else None, extra))
        return entries


@DATASETS.register("vggface2")
class VGGFace2(AlignedFaceDataset):
    """VGGFace2 (Cao et al. 2018), 9,131 identities.

    Raw layout: ``root/n000002/0001_01.jpg``; ``root`` may also hold ``train/`` and ``test/``
    (``subset`` picks one). The identity is the image's parent folder name (``n000002``), so
    both subsets can be read at once (their identities are disjoint).
    """

    layout_params = ("subset",)
    registered_name = "vggface2"

    def __init__(self, root: str, image_size: int = 256, subset: str | None = None, mask: str = "template"):
        super().__init__(root, image_size, mask, subset=subset)

    @classmethod
    def scan_raw(cls, root, subset: str | None = None) -> list[RawEntry]:
        root = Path(root)
        base = root / _inside(root, subset, "vggface2: subset") if subset else root
        if not base.is_dir():
            raise UserError(f"vggface2: no folder {base}")
        entries = []
        for path in list_images(base):
            identity = path.parent.name if path.parent != base else None
            entries.append(RawEntry(_relative(path, root), identity))
        return entries


@DATASETS.register("identity_folder")
class IdentityFolder(AlignedFaceDataset):
    """Any ``root/<identity>/<image>`` tree (your own photos, LFW, CASIA-WebFace, ...).

    The identity is the first folder under ``root`` (deeper sub-folders belong to it); images
    directly in ``root`` are unlabelled (-1).
    """

    registered_name = "identity_folder"

    def __init__(self, root: str, image_size: int = 256, mask: str = "template"):
        super().__init__(root, image_size, mask)

    @classmethod
    def scan_raw(cls, root) -> list[RawEntry]:
        root = Path(root)
        entries = []
        for path in list_images(root):
            parts = Path(_relative(path, root)).parts
            entries.append(RawEntry(_relative(path, root), parts[0] if len(parts) > 1 else None))
        return entries


@DATASETS.register("ffhq")
class FFHQ(AlignedFaceDataset):
    """FFHQ (Karras et al. 2019), 70,000 unlabelled faces: every identity is -1 (pairs come from
    two augmentations of one image).

    Raw layout: ``root/images1024x1024/00000/00000.png`` (used when that folder exists, so the
    thumbnails beside it are not read twice) or any image files under ``root``.
    """

    labelled = False
    registered_name = "ffhq"

    def __init__(self, root: str, image_size: int = 256, mask: str = "template"):
        super().__init__(root, image_size, mask)

    @classmethod
    def scan_raw(cls, root) -> list[RawEntry]:
        root = Path(root)
        base = root / "images1024x1024" if (root / "images1024x1024").is_dir() else root
        return [RawEntry(_relative(path, root)) for path in list_images(base)]
