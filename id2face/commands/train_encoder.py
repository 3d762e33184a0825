"""`id2face train-encoder CONFIG... [key=value...] -o WEIGHTS.pt`: train the identity encoder of
``model.identity_encoder`` (the ``tiny`` one, typically) on the identity labels of ``data.dataset``.

Identities are split as the datamodule splits them (``data.split_seed``, ``data.split_fractions``,
``data.split_file``): the training split trains (a cosine-margin softmax over its identities); the
val + test identities, never seen in training, measure retrieval top-1 (one gallery image per
identity, the others as queries) before and after training.
Training starts from the encoder's ``weights`` when the config names some (fine-tuning). What is
trained and written is the encoder's ``weights_module()``, the part its ``weights`` file loads into
(the timm encoder's backbone, not its seeded projection), so the written file is what
``model.identity_encoder.params.weights`` expects, for every registered encoder.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

from . import resolve_device

HELDOUT_MAX_IDENTITIES = 500
HELDOUT_MAX_IMAGES_PER_IDENTITY = 10
PRELOAD_BUDGET_BYTES = 2 << 30  # training images up to this size are decoded once and kept in memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="FILE|key=value",
                        help="config files (paths or packaged names like `tiny`) then key=value overrides")
    parser.add_argument("-o", "--output", required=True, metavar="WEIGHTS.pt",
                        help="where to write the trained encoder's state dict")
    parser.add_argument("--steps", type=int, default=2000, help="optimisation steps (default 2000)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    parser.add_argument("--lr", type=float, default=6e-3, help="peak AdamW learning rate (warm-up, cosine decay)")
    parser.add_argument("--margin", type=float, default=0.2, help="additive cosine margin (CosFace)")
    parser.add_argument("--scale", type=float, default=16.0, help="logit scale of the cosine classifier")
    parser.add_argument("--device", default="auto", help="torch device; auto = cuda if available, else cpu")


def check_arguments(args: argparse.Namespace) -> None:
    """The numeric options, checked before any work: a one-line UserError instead of a traceback
    from the optimiser or, for NaN, a run that silently writes NaN weights."""
    from ..errors import UserError

    checks = [
        ("--steps", args.steps, args.steps >= 1, ">= 1"),
        # Training-mode BatchNorm1d (arcface's, facenet's) cannot normalise a batch of one.
        ("--batch-size", args.batch_size, args.batch_size >= 2, ">= 2"),
        ("--lr", args.lr, math.isfinite(args.lr) and args.lr > 0, "a finite number > 0"),
        # 0 is a plain cosine softmax; a negative margin would favour the true class instead of demanding a gap.
        ("--margin", args.margin, math.isfinite(args.margin) and args.margin >= 0, "a finite number >= 0"),
        ("--scale", args.scale, math.isfinite(args.scale) and args.scale > 0, "a finite number > 0"),
    ]
    for flag, value, ok, wanted in checks:
        if not ok:
            raise UserError(f"{flag} must be {wanted} (got {value})")
    if Path(args.output).suffix == ".safetensors":
        # The timm encoder reads a .safetensors name as safetensors, which torch.save does not write.
        raise UserError(f"-o {args.output}: train-encoder writes a torch.save file; name it .pt")


class CosineMarginClassifier:
    """CosFace head: logits ``scale * (cos(e, w_k) - margin * [k = label])`` over unit class weights."""

    def __init__(self, num_classes: int, embed_dim: int, scale: float, margin: float, device):
        import torch

        self.weight = torch.nn.Parameter(torch.randn(num_classes, embed_dim, device=device) / embed_dim ** 0.5)
        self.scale, self.margin = scale, margin

    def logits(self, embeddings, labels):
        import torch.nn.functional as F

        cosine = F.normalize(embeddings, dim=-1) @ F.normalize(self.weight, dim=-1).T
        return self.scale * (cosine - self.margin * F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)), cosine


def heldout_items(labels, split):
    """Item indices for the held-out retrieval check: val + test identities with at least two
    images (at most ``HELDOUT_MAX_IDENTITIES`` identities x ``HELDOUT_MAX_IMAGES_PER_IDENTITY``)."""
    import numpy as np

    from ..errors import UserError

    labels = np.asarray(labels)
    heldout = np.concatenate([split.val, split.test])
    identities, counts = np.unique(labels[heldout], return_counts=True)
    identities = identities[(counts >= 2) & (identities >= 0)][:HELDOUT_MAX_IDENTITIES]
    if len(identities) < 2:
        raise UserError("fewer than two held-out (val/test) identities have two or more images: retrieval cannot "
                        "be measured; use more identities or larger val/test data.split_fractions")
    return np.concatenate([heldout[labels[heldout] == i][:HELDOUT_MAX_IMAGES_PER_IDENTITY] for i in identities])


def _stack_images(items):
    import torch

    return torch.stack([item["image"] for item in items])


def load_images(dataset, indices, num_workers: int = 0, batch_size: int = 256):
    """``dataset[i]["image"]`` for ``i`` in ``indices``, stacked: (n, 3, S, S) in [-1, 1]."""
    import torch
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, list(map(int, indices))), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_stack_images)
    return torch.cat(list(loader))


def embed_all(encoder, images, device, batch_size: int = 256):
    """Unit embeddings of ``images`` (n, 3, S, S), computed in batches on ``device``, returned on CPU."""
    import torch

    with torch.no_grad():
        return torch.cat([encoder(images[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(images), batch_size)])


def retrieval_top1(embeddings, labels) -> tuple[float, int]:
    """Identity retrieval top-1 with the first image of each identity as its gallery entry and the
    others as queries (cosine nearest neighbour). Returns (top-1, number of gallery identities);
    chance is 1 / identities."""
    import torch

    labels = torch.as_tensor(labels)
    first: dict[int, int] = {}
    for index, label in enumerate(labels.tolist()):
        first.setdefault(label, index)
    is_gallery = torch.zeros(len(labels), dtype=torch.bool)
    is_gallery[list(first.values())] = True
    gallery, queries = embeddings[is_gallery], embeddings[~is_gallery]
    nearest = (queries @ gallery.T).argmax(dim=1)
    top1 = (labels[is_gallery][nearest] == labels[~is_gallery]).float().mean().item()
    return top1, len(first)


def train(encoder, train_batches, num_classes: int, steps: int, lr: float, margin: float, scale: float,
          device, log=print, log_every: int | None = None):
    """Optimise ``encoder`` (in place) with a cosine-margin softmax on ``train_batches`` of
    (images, class index 0..num_classes-1). Returns the final training loss."""
    import torch
    import torch.nn.functional as F

    parameters = [p for p in encoder.parameters() if p.requires_grad]
    head = CosineMarginClassifier(num_classes, encoder.embed_dim, scale, margin, device)
    optimizer = torch.optim.AdamW([*parameters, head.weight], lr=lr, weight_decay=5e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    log_every = log_every or max(1, steps // 10)
    start, loss = time.time(), None
    # Frozen encoders pin themselves to eval mode; training needs batch statistics in BatchNorm (in the
    # part that is trained and written only: running statistics elsewhere would not be saved).
    torch.nn.Module.train(encoder.weights_module(), True)
    for step in range(1, steps + 1):
        images, labels = next(train_batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits, cosine = head.logits(encoder(images), labels)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            accuracy = (cosine.argmax(1) == labels).float().mean().item()
            log(f"step {step}/{steps}  loss {loss.item():.3f}  train top-1 {accuracy:.3f}  "
                f"({time.time() - start:.1f} s)")
    encoder.eval()
    return loss.detach()


def _batches_from_memory(images, labels, batch_size: int, seed: int):
    """Endless random batches (with horizontal flips) from in-memory tensors."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        index = torch.randint(len(images), (batch_size,), generator=generator)
        batch = images[index]
        flip = torch.rand(batch_size, generator=generator) < 0.5
        batch[flip] = batch[flip].flip(-1)
        yield batch, labels[index]


class _FlipCollate:
    """Batch of (images with random horizontal flips, class indices); picklable for worker processes."""

    def __init__(self, class_of: dict[int, int]):
        self.class_of = class_of

    def __call__(self, items):
        import torch

        images = _stack_images(items)
        flip = torch.rand(len(items)) < 0.5
        images[flip] = images[flip].flip(-1)
        return images, torch.tensor([self.class_of[int(item["identity"])] for item in items])


def _batches_from_loader(dataset, indices, class_of, batch_size: int, num_workers: int, seed: int):
    """Endless shuffled batches streamed from the dataset (when it does not fit in memory)."""
    import torch
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, list(map(int, indices))), batch_size=batch_size, shuffle=True,
                        drop_last=True, num_workers=num_workers, collate_fn=_FlipCollate(class_of),
                        generator=torch.Generator().manual_seed(seed), persistent_workers=num_workers > 0)
    while True:
        yield from loader


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from ..config import load_config, split_args
    from ..data.pairs import load_or_create_split
    from ..errors import UserError
    from ..registry import DATASETS, IDENTITY_ENCODERS

    def say(message: str) -> None:
        print(message, flush=True)  # progress shows up promptly in job logs too

    check_arguments(args)
    output = Path(args.output)
    if output.is_dir():
        raise UserError(f"-o {output} is a directory; give the path of the weights file to write")
    files, overrides = split_args(args.args)
    cfg = load_config(files, overrides)
    device = resolve_device(args.device)
    seed = int(cfg.run.seed)
    torch.manual_seed(seed)

    node = cfg.model.identity_encoder
    with warnings.catch_warnings():  # "untrained" is the point here
        warnings.simplefilter("ignore", UserWarning)
        encoder = IDENTITY_ENCODERS.build(node)
    # Only the part the `weights` file holds is trained: the rest (the timm encoder's seeded projection)
    # is rebuilt untrained by every later build, so anything learnt there would be lost on reload.
    trained = encoder.weights_module().requires_grad_(True)
    encoder.to(device)
    if not any(p.requires_grad for p in trained.parameters()):
        raise UserError(f"identity encoder '{node.name}' has no parameters to train")

    dataset = DATASETS.build(cfg.data.dataset, image_size=int(cfg.data.image_size))
    labels = np.asarray(dataset.identity_labels)
    # The datamodule's identity-disjoint split: the encoder never sees val/test identities.
    split = load_or_create_split(labels, list(cfg.data.split_fractions), int(cfg.data.split_seed),
                                 cfg.data.get("split_file"))
    train_index = split.train[labels[split.train] >= 0]
    train_ids = np.unique(labels[train_index])
    if not split.by_identity or len(train_ids) < 2:
        raise UserError(f"train-encoder needs identity labels: the training split of {cfg.data.dataset.name} "
                        f"has {len(train_ids)} labelled identities")
    class_of = {int(identity): k for k, identity in enumerate(train_ids)}
    heldout_index = heldout_items(labels, split)
    heldout_ids = np.unique(labels[heldout_index])
    size, workers = int(cfg.data.image_size), int(cfg.data.num_workers)
    say(f"train-encoder: {node.name} ({sum(p.numel() for p in trained.parameters()):,d} parameters trained) on "
        f"{cfg.data.dataset.name}: {len(train_ids)} training identities ({len(train_index)} images), "
        f"{len(heldout_ids)} held-out identities ({len(heldout_index)} images), {size} px, device {device}")

    heldout_images = load_images(dataset, heldout_index, workers)
    heldout_labels = torch.as_tensor(labels[heldout_index])
    top1, identities = retrieval_top1(embed_all(encoder, heldout_images, device), heldout_labels)
    say(f"held-out identity retrieval top-1 before training: {top1:.3f} (chance {1 / identities:.3f})")

    if len(train_index) * 3 * size * size * 4 <= PRELOAD_BUDGET_BYTES:
        started = time.time()
        train_images = load_images(dataset, train_index, workers)
        say(f"loaded {len(train_images)} training images in {time.time() - started:.1f} s")
        train_labels = torch.tensor([class_of[int(i)] for i in labels[train_index]])
        batches = _batches_from_memory(train_images, train_labels, args.batch_size, seed)
    else:
        batches = _batches_from_loader(dataset, train_index, class_of, args.batch_size, workers, seed)
    train(encoder, batches, len(train_ids), args.steps, args.lr, args.margin, args.scale, device, log=say)

    top1, identities = retrieval_top1(embed_all(encoder, heldout_images, device), heldout_labels)
    params = OmegaConf.to_container(node.params) if node.get("params") else {}
    params = {k: v for k, v in params.items() if k != "weights"}
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": encoder.weights_state_dict(),
                "encoder": {"name": str(node.name), "params": params},
                "heldout_top1": top1, "steps": args.steps}, output)
    say(f"held-out identity retrieval top-1: {top1:.3f} ({identities} identities not seen in training, "
        f"chance {1 / identities:.3f})")
    say(f"wrote {output}; use it with model.identity_encoder.params.weights={output}")
    return 0
