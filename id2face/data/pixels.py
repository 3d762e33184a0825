"""How a pair batch's pixels travel from the loader's workers to the model (``data.pixel_transport``).

``float32``: as the items are (images in [-1, 1], masks in {0, 1}). ``uint8``: each item's image
is quantised to its 8-bit levels and its mask to 0/1 bytes in the worker, before collation, and
``unpack_pixels`` turns them back into float32 on the device (``ID2FaceModule`` does it in
``on_after_batch_transfer``). A quarter of the bytes to stack into shared memory, hand between
processes, pin and copy to the GPU: the training loader made 13-29 % more images a second at 256
and 512 px with one or two workers (``benchmarks/data_loading.py``; at 128 px the quantising costs
more than it saves). Lossless for images decoded from 8-bit files (the real datasets'
crops: ``u / 127.5 - 1`` back to ``u``); rendered or resampled pixels (SynthFaces, the augmented
partner of a one-image identity) get the rounding that saving them as PNG would give.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..errors import UserError
from .latent_cache import collate_pairs


def quantise_item(item: Mapping[str, Any]) -> dict:
    """An item with its image as uint8 levels (-1 -> 0, 1 -> 255) and its mask as 0/1 bytes."""
    # +0.5 then truncation by the cast: the nearest level, with one temporary instead of three.
    levels = item["image"].mul(127.5).add_(127.5 + 0.5).clamp_(0.0, 255.0).to(torch.uint8)
    return {**item, "image": levels, "mask": (item["mask"] > 0.5).to(torch.uint8)}


def collate_pairs_uint8(pairs: list[Mapping[str, Mapping[str, Any]]]) -> dict:
    """``collate_pairs`` of the pairs' quantised items."""
    return collate_pairs([{side: quantise_item(item) for side, item in pair.items()} for pair in pairs])


PAIR_COLLATES: dict[str, Callable[[list], dict]] = {"float32": collate_pairs, "uint8": collate_pairs_uint8}


def pair_collate(transport: str) -> Callable[[list], dict]:
    """The collate function of a ``data.pixel_transport`` value."""
    try:
        return PAIR_COLLATES[transport]
    except KeyError:
        raise UserError(f"data.pixel_transport must be one of {', '.join(PAIR_COLLATES)}, got {transport!r}") from None


def unpack_pixels(batch: dict) -> dict:
    """A pair batch with uint8 images and masks made float32 (images in [-1, 1], as the items'
    ``tensor / 127.5 - 1``, bit for bit); float batches are returned as they are."""
    out = {}
    for side, items in batch.items():
        items = dict(items)
        if items["image"].dtype == torch.uint8:
            items["image"] = items["image"].float() / 127.5 - 1.0
        if items["mask"].dtype == torch.uint8:
            items["mask"] = items["mask"].float()
        out[side] = items
    return out
