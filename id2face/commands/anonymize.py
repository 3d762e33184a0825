"""`id2face anonymize --checkpoint CKPT -i INPUT... -o OUTPUT [--key KEY] [--steps N] ...`

Every face of every photo (files, or folders searched recursively; the output mirrors each
folder's tree) is detected (MTCNN), aligned, anonymized in batches across photos, and pasted back;
everything outside the faces is unchanged. Per photo a JSON sidecar (``<output name>.json``: faces
with box, score, status, residual identity similarity), and ``anonymize_summary.json`` for the run.
A rerun skips finished photos. See ``id2face/anonymize.py`` for the pipeline and its guarantees.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..precision import PRECISION_CHOICES
from . import resolve_device

EPILOG = """exit status: 0 every photo written, every face anonymized; 1 some photos not written
(unreadable, detection or write error: listed in the summary); 2 bad arguments; 3 every photo
written, but some faces were covered (fail-closed) instead of anonymized."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="checkpoint of `id2face train` (its config defines the model)")
    parser.add_argument("-i", "--input", required=True, nargs="+", metavar="INPUT",
                        help="photos or folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                        help="output folder (not inside an input); a folder input's tree is mirrored into it")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--key", help="secret key: the same person gets the same substitute identity in every photo "
                                   "(visible in the process list: prefer --key-file)")
    key.add_argument("--key-file", metavar="FILE",
                     help="read the secret key from FILE (surrounding whitespace ignored)")
    parser.add_argument("--steps", type=int, metavar="N", help="sampler steps (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="faces per model call (default 8)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="sampling arithmetic (default auto: the checkpoint's trainer.precision on cuda, "
                             "32-true on cpu)")
    parser.add_argument("--compile", action="store_true",
                        help="channels_last + torch.compile of the UNet and the SD VAE: minutes of compilation "
                             "first, faster sampling after (the last batch is padded to --batch-size, so one "
                             "shape is compiled); for large jobs on a GPU")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="cuDNN times each convolution's algorithms in the first call at each batch size and "
                             "keeps the fastest (seconds, once; on a GPU, for large jobs)")
    parser.add_argument("--vae-dtype", choices=("float32", "bfloat16", "float16"),
                        help="an SD VAE first stage's weights and arithmetic in this dtype, whatever --precision "
                             "(bfloat16: about half the memory traffic of its encode and decode; default: the "
                             "checkpoint's)")
    parser.add_argument("--unet-dtype", choices=("float32", "bfloat16", "float16"),
                        help="the UNet's (and harmonizer's) weights and arithmetic in this dtype, norms included, "
                             "as diffusers pipelines sample (bfloat16: ~2/3 of the memory traffic of a UNet step "
                             "under --precision's autocast; default: fp32 weights under that autocast)")
    parser.add_argument("--harmonizer-attention", choices=("weights", "sdpa"),
                        help="how a decoupled harmonizer computes its cross-attention (same values): sdpa, two "
                             "fused attention kernels, has fewer kernels and bytes without a backward pass "
                             "(default: sdpa on cuda, the checkpoint's on cpu)")
    parser.add_argument("--attention-backends", nargs="+", metavar="NAME",
                        help="the UNet's attention kernels in order of preference, the first that takes a shape runs "
                             "it: flash_attention, efficient_attention, cudnn_attention, math (default: PyTorch's "
                             "order, which never reaches cudnn_attention; which is fastest on a GPU: "
                             "benchmarks/attention_backends.py --forward-only)")
    parser.add_argument("--tiny-decoder", metavar="DIR",
                        help="decode with this tiny autoencoder (a local diffusers AutoencoderTiny folder: "
                             "madebyollin/taesd for SD 1.x/2.x VAEs) instead of the checkpoint's VAE: ~1/18 of "
                             "the decode's arithmetic at 512 px, softer detail; for large jobs")
    parser.add_argument("--tiny-encoder", action="store_true",
                        help="with --tiny-decoder: its autoencoder encodes the masked image too (~1/9 of the SD VAE "
                             "encode's arithmetic at 512 px; its latents approximate the SD VAE's, so the model's "
                             "condition is slightly off; the fastest pipeline)")
    parser.add_argument("--io-workers", type=int, default=None, metavar="N",
                        help="threads that decode the next photos and write the finished ones while the model "
                             "runs (default: min(4, CPUs); 0: all in one thread)")
    parser.add_argument("--pipeline-depth", type=int, default=None, metavar="N",
                        help="photos in flight beside the sampling: up to N detected, aligned and identity-encoded "
                             "ahead, and N pasted back and audited behind, in two worker threads (each on its own "
                             "CUDA stream; each photo held decoded in memory); same results (default: "
                             "min(--batch-size, 16) on cuda, 0 on cpu, where the threads would share the sampling's "
                             "cores)")
    parser.add_argument("--detect-workers", type=int, default=None, metavar="N",
                        help="with --pipeline-depth > 0: threads that detect and align the photos ahead (each on "
                             "its own CUDA stream); identity encoding stays in input order, so the results do not "
                             "depend on N. They matter where detection, not sampling, sets the pace: the closing "
                             "line's busy seconds say (default: min(4, CPUs))")
    parser.add_argument("--detect-device", metavar="DEVICE",
                        help="where MTCNN detects the faces (default: --device); cpu leaves the GPU to the "
                             "sampling, at a few cores' cost with --detect-workers")
    parser.add_argument("--seed", type=int, help="sampling noise seed (default: random, recorded in the summary; with "
                        "--key the substitutes come from the key, the noise from this)")
    parser.add_argument("--min-score", type=float, default=0.8, help="detector score of a face (default 0.8)")
    parser.add_argument("--min-face-size", type=int, default=20,
                        help="smallest face MTCNN looks for, px (default 20)")
    parser.add_argument("--detect-max-side", type=int, default=None,
                        help="photos larger than this are downscaled for detection only (default 2048)")
    parser.add_argument("--cover", choices=("fill", "blur"), default="fill",
                        help="how a face that cannot be anonymized is covered (default fill)")
    parser.add_argument("--audit-recognizer", default="auto", metavar="NAME",
                        help="residual-identity judge: dlib, oracle, encoder, none, a {name, params} node, or auto "
                             "(the first of the config's eval.recognizers that loads; default)")
    parser.add_argument("--audit-workers", type=int, default=None, metavar="N",
                        help="processes that run a dlib audit or --cluster-by dlib (dlib holds the GIL: in "
                             "processes it runs beside the sampling and in parallel; default: min(4, CPUs); 0: in "
                             "this process)")
    parser.add_argument("--cover-if-recognized", action="store_true",
                        help="also cover faces the audit recognizer still matches to the source")
    parser.add_argument("--cluster-by", default="encoder", metavar="NAME",
                        help="embedding that groups faces into persons with --key: encoder (the model's, default), "
                             "dlib, oracle")
    parser.add_argument("--cluster-threshold", type=float,
                        help="with --key: same person at cosine >= this (encoder, oracle; default 0.5, in [-1, 1]) "
                             "or at a distance < this (dlib; default its own 0.6)")
    parser.add_argument("--face-scale", type=float,
                        help="align to the ArcFace template x this instead of the training data's template "
                             "(at most 1.14: larger puts the inner face past the crop)")
    parser.add_argument("--format", choices=("keep", "png"), default="keep", dest="output_format",
                        help="keep each photo's format (JPEG re-encoded at quality 95) or write lossless PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _parse_node(text: str):
    if text.lstrip().startswith("{"):
        from omegaconf import OmegaConf

        from ..errors import UserError, one_line

        try:
            return OmegaConf.to_container(OmegaConf.create(text), resolve=True)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"cannot parse recognizer node {text!r}: {one_line(err, 200)}") from None
    return text


def _read_key(args):
    from pathlib import Path

    from ..errors import UserError

    if args.key_file is None:
        return args.key
    try:
        key = Path(args.key_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read --key-file {args.key_file}: {getattr(err, 'strerror', None) or err}") from None
    if not key:
        raise UserError(f"--key-file {args.key_file} is empty")
    return key


def audit_pace_note(audit, device: str) -> str | None:
    """A line for a GPU run whose audit judge computes on the CPU (dlib: two crops a face, ~0.1 s
    each on one core): at GPU rates it sets the pace (BENCHMARKS.md)."""
    from ..metrics.recognizers import DlibRecognizer

    if isinstance(audit, DlibRecognizer) and str(device).startswith("cuda"):
        where = f"in {audit.workers} processes" if audit.workers else "in this process"
        return (f"id2face anonymize: the dlib audit runs on the CPU {where} (two crops a face) and may set the "
                "pace; --audit-workers N, or --audit-recognizer encoder (on the GPU) or none for throughput")
    return None


def default_audit_workers() -> int:
    """dlib worker processes by default: min(4, CPUs). Even on 2 cores beside the CPU sampling they
    pay (BENCHMARKS.md: 12 photos, dlib audit, 13.45 -> 8.98 s); they start at the first audit."""
    return min(4, os.cpu_count() or 1)


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from ..anonymize import (DEFAULT_DETECT_WORKERS, DEFAULT_IO_WORKERS, DETECT_MAX_SIDE, AnonymizeSettings,
                             Anonymizer, anonymize_files, build_audit_recognizer, check_paths, exit_code, plan_jobs,
                             training_template)
    from ..data.prepare import FaceDetector
    from ..errors import UserError
    from ..inference import load_model
    from ..precision import resolve_precision
    from ..registry import recognizer_nodes
    from ..user_cache import user_cache

    settings = AnonymizeSettings(key=_read_key(args), steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                 pad_last_batch=args.compile, cudnn_benchmark=args.cudnn_benchmark,
                                 min_score=args.min_score, cover=args.cover, cluster_threshold=args.cluster_threshold,
                                 cover_if_recognized=args.cover_if_recognized, face_scale=args.face_scale)
    settings.check()
    detect_max_side = DETECT_MAX_SIDE if args.detect_max_side is None else args.detect_max_side
    if args.min_face_size < 4 or detect_max_side < 32:
        raise UserError("--min-face-size must be >= 4 and --detect-max-side >= 32")
    for flag in ("io_workers", "pipeline_depth", "audit_workers"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    if args.detect_workers is not None and args.detect_workers < 1:
        raise UserError(f"--detect-workers must be >= 1, got {args.detect_workers}")
    roots, target = check_paths(args.input, args.output)
    plan_jobs(roots, target, args.output_format)  # refuse bad inputs before loading anything heavy
    device = str(resolve_device(args.device))
    detect_device = device if args.detect_device is None else str(resolve_device(args.detect_device, "--detect-device"))
    if args.compile:  # minutes at SD size: the next job on any node loads the kernels instead
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(user_cache("torchinductor")))

    # Same values either way; without a backward pass the fused kernels move fewer bytes (BENCHMARKS.md).
    attention = args.harmonizer_attention or ("sdpa" if device.startswith("cuda") else None)
    model, cfg, info = load_model(args.checkpoint, device, compile=args.compile, first_stage_dtype=args.vae_dtype,
                                  tiny_decoder=args.tiny_decoder, tiny_encoder=args.tiny_encoder,
                                  unet_dtype=args.unet_dtype, harmonizer_attention=attention,
                                  attention_backends=args.attention_backends)
    train_timesteps = model.sampler.scheduler.config.num_train_timesteps
    if settings.steps is not None and settings.steps > train_timesteps:  # else every face would fail, and be covered
        raise UserError(f"--steps must be <= {train_timesteps} (the model's training timesteps), got {settings.steps}")
    settings.precision = resolve_precision(args.precision, device, OmegaConf.select(cfg, "trainer.precision"))
    size = int(cfg.data.image_size)
    template, info["template"] = training_template(cfg, size, settings.face_scale)

    audit_workers = default_audit_workers() if args.audit_workers is None else args.audit_workers
    audit_arg = _parse_node(args.audit_recognizer)
    audit, audit_note = None, None
    if audit_arg == "auto":
        for node in recognizer_nodes(cfg.eval):
            try:
                audit = build_audit_recognizer(node, cfg, model, dlib_workers=audit_workers)
                break
            except UserError as err:  # a judge that is not installed or trained here: try the next
                name = node if isinstance(node, str) else node.get("name")
                audit_note = f"audit recognizer {name} unavailable: {err}"
        if audit is None:
            print(f"id2face anonymize: no audit ({audit_note or 'eval.recognizers is empty'}); "
                  "choose one with --audit-recognizer", file=sys.stderr)
    else:
        audit = build_audit_recognizer(audit_arg, cfg, model, dlib_workers=audit_workers)
    if audit is not None:
        audit = audit.to(device)
        note = audit_pace_note(audit, device)
        if note and not args.quiet:
            print(note, file=sys.stderr)
    cluster_arg = _parse_node(args.cluster_by)
    cluster_by = None if cluster_arg == "encoder" else build_audit_recognizer(cluster_arg, cfg, model,
                                                                               dlib_workers=audit_workers)
    if cluster_by is not None:
        cluster_by = cluster_by.to(device)

    detector = FaceDetector(min_face_size=args.min_face_size, max_side=detect_max_side, device=detect_device)
    pipeline_depth = args.pipeline_depth
    if pipeline_depth is None:
        pipeline_depth = min(settings.batch_size, 16) if device.startswith("cuda") else 0
    detect_workers = DEFAULT_DETECT_WORKERS if args.detect_workers is None else args.detect_workers
    anonymizer = Anonymizer(model, size, template, settings, detector=detector, audit=audit, cluster_by=cluster_by,
                            device=device, pipeline_depth=pipeline_depth, detect_workers=detect_workers)
    summary = anonymize_files(args.input, args.output, anonymizer, info=info, output_format=args.output_format,
                              progress=not args.quiet,
                              io_workers=DEFAULT_IO_WORKERS if args.io_workers is None else args.io_workers)
    images, faces = summary["images"], summary["faces"]
    worst = summary["worst_residual"]
    verdict = ""
    if worst:
        judged = {True: ", the same person", False: ", another person"}.get(worst["residual_same_person"], "")
        verdict = (f"; closest to its source: {worst['image']} face {worst['face']} (distance "
                   f"{worst['residual_distance']:.3f}, cosine {worst['residual_similarity']:.3f}{judged})")
    print(f"id2face anonymize: {images['written']} photo(s) written ({images['skipped']} by an earlier run), "
          f"{images['failed']} failed; {faces['anonymized']} face(s) anonymized, {faces['covered']} covered"
          f"{verdict}; {summary['faces_per_second']:.2f} faces/s (busy s: "
          f"{', '.join(f'{stage} {busy:.1f}' for stage, busy in summary['stage_seconds'].items())})", file=sys.stderr)
    return exit_code(summary)
