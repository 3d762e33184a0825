"""`id2face cache-latents CONFIG... [key=value...] -o DIR`: encode every image of ``data.dataset``
with ``model.first_stage`` once (the image and its masked copy) and embed it with the frozen
``model.identity_encoder``, for training with ``data.latent_cache=DIR``: the step then skips both
encodes (47 % of its FLOPs at SD-1.5 size) and the identity encoder (hundreds of small kernels).

The model is built as training builds it (seeded with ``run.seed``), so a random-init first stage
caches the same latents a run of that config would compute. DIR is a new folder; training checks
that its data and first stage match the run's, and uses the identity embeddings only with the
identity encoder that made them (see ``id2face.data.latent_cache``). A failed run leaves neither DIR
nor ``DIR.partial`` (where the rows are written until complete) behind.

``--precision`` (default: the config's ``trainer.precision`` on CUDA, fp32 on a CPU): the encodes'
arithmetic. bf16 autocast is what a training step without a cache encodes in, and on a GPU's tensor
cores many times faster than fp32 (an H100: 989 vs 67 TFLOP/s dense); the rows are float16 either way.
"""
from __future__ import annotations

import argparse

from ..precision import PRECISION_CHOICES
from . import resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="FILE|key=value",
                        help="config files (paths or packaged names like `tiny`) then key=value overrides "
                             "(the same data and model.first_stage as the training run)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="the cache folder to create")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encode (default 32)")
    parser.add_argument("--device", default="auto", help="torch device; auto = cuda if available, else cpu")
    parser.add_argument("--num-workers", type=int, default=None, help="data loader workers (default data.num_workers)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="the encodes' arithmetic (default auto: the config's trainer.precision on cuda, "
                             "32-true on cpu); recorded in the cache's meta.json")


def run(args: argparse.Namespace) -> int:
    import time

    import torch
    from omegaconf import OmegaConf

    from ..config import load_config, split_args
    from ..data.latent_cache import write_latent_cache
    from ..errors import UserError
    from ..model import ID2Face
    from ..precision import resolve_precision
    from ..registry import DATASETS

    # Checked before anything is built or written (torch's own checks come as tracebacks, late).
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {args.num_workers}")
    cfg = load_config(*split_args(args.args))  # checks data.num_workers
    workers = int(cfg.data.num_workers if args.num_workers is None else args.num_workers)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device, OmegaConf.select(cfg, "trainer.precision"))
    dataset = DATASETS.build(cfg.data.dataset, image_size=int(cfg.data.image_size))
    torch.manual_seed(int(cfg.run.seed))
    model = ID2Face.from_config(cfg.model).eval()
    description = {"dataset": OmegaConf.to_container(cfg.data.dataset, resolve=True),
                   "first_stage": OmegaConf.to_container(cfg.model.first_stage, resolve=True),
                   "identity_encoder": OmegaConf.to_container(cfg.model.identity_encoder, resolve=True)}
    start = time.perf_counter()
    folder = write_latent_cache(dataset, model.first_stage, model.first_stage_latents, args.output, description,
                                batch_size=args.batch_size, num_workers=workers, device=device,
                                identity_encoder=model.identity_encoder, embed=model.identity_embedding,
                                precision=precision)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in folder.glob("*.npy"))
    print(f"id2face cache-latents: {len(dataset)} images in {seconds:.1f} s ({len(dataset) / seconds:.1f} img/s "
          f"on {device}, {precision}) -> {folder} ({size / 2**20:.1f} MiB); train with data.latent_cache={folder}")
    return 0
