"""Throughput of `id2face anonymize` (faces/s) against --batch-size, on SynthFaces group photos.

    python benchmarks/anonymize_throughput.py [--photos 12] [--faces-per-photo 4] [--batch-sizes 1 4 16]
        [--steps N] [--checkpoint CKPT | --profile tiny|sd15 [--override FILE|KEY=VALUE ...]] [--device cpu|cuda]
        [--precision auto|32-true|bf16-mixed|16-mixed]
        [--compile] [--vae-dtype float32|bfloat16|float16] [--unet-dtype float32|bfloat16|float16]
        [--tiny-decoder DIR|random [--tiny-encoder]] [--threads 1]
        [--io-workers 0 4] [--pipeline-depth 0 16] [--detect-workers 1 4]
        [--photo-format png|jpg] [--photo-size 640 480] [--audit-recognizer none|dlib|encoder|...] [--steady]

Writes N photos (skimage backgrounds, 640 x 480 unless --photo-size, each with K SynthFaces faces
of 112-128 px that MTCNN detects), then runs the whole file pipeline (`anonymize_files`: decode,
MTCNN, alignment, batched sampling, paste-back, atomic writes, sidecars; the audit recognizer of
--audit-recognizer, none by default) once per batch size and number of I/O threads
(`--io-workers`, as `id2face anonymize --io-workers`) into a fresh folder, after a warm-up run
with the largest batch's faces.
Detection alone and file decode + encode alone are timed too (the parts batching cannot speed up;
I/O threads overlap the second with the model).
A run's faces/s includes the pipeline's fill (the first batch waits for its photos' decoding and
detection) and drain (the last batch's paste-back and writes wait for nothing to overlap with):
with a few batches that is a large share of the run. ``--steady`` also times each setting on the
photos twice over (each a second time, as a copy) and reports the marginal rate of the extra
photos, (faces_2N - faces_N) / (seconds_2N - seconds_N): fill and drain cancel, and what is left is
the rate a long job runs at.
Without --checkpoint the --profile model (tiny, or sd15: the SD-1.5-sized paper config at 512 px)
is built untrained: its speed does not depend on the weights; ``--override`` changes its config
(an ablation file, key=value). Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, a sibling of this script

import torch  # noqa: E402

import _common as C  # noqa: E402

from id2face.anonymize import (DEFAULT_IO_WORKERS, DETECT_MAX_SIDE, AnonymizeSettings, Anonymizer,  # noqa: E402
                               anonymize_files, build_audit_recognizer, training_template)
from id2face.errors import UntrainedWeightsWarning  # noqa: E402
from id2face.inference import load_model  # noqa: E402
from id2face.precision import resolve_precision  # noqa: E402


def _backgrounds() -> list[np.ndarray]:
    """Sample photos as backgrounds; of the astronaut only the part below her face (MTCNN would find it)."""
    coffee, chelsea, astronaut, rocket = C.sample_photos()
    return [coffee, chelsea, astronaut[300:], rocket]


def make_photos(folder: Path, count: int, faces: int, seed: int = 0, size=(640, 480), fmt: str = "png",
                prefix: str = "group") -> None:
    from id2face.data.synthfaces import render_sample

    backgrounds = _backgrounds()
    rng = np.random.default_rng(seed)
    for index in range(count):
        photo = np.asarray(Image.fromarray(backgrounds[index % len(backgrounds)]).convert("RGB")
                           .resize(tuple(size), Image.BILINEAR)).copy()
        for slot in range(faces):  # a 4 x 2 grid of slots, faces in the first K
            side = int(rng.integers(112, 129))
            x = 20 + (slot % 4) * 155 + int(rng.integers(0, 150 - side + 1))
            y = 20 + (slot // 4) * 230 + int(rng.integers(0, 100))
            item = render_sample((index * faces + slot) % 8, 0, side)  # sample 0 of identities 0-7: MTCNN finds them
            photo[y:y + side, x:x + side] = np.rint((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5)
        Image.fromarray(photo).save(folder / f"{prefix}{index:03d}.{fmt}", **({"quality": 92} if fmt == "jpg" else {}))


def untrained_model(profile: str, device: str, compile: bool, vae_dtype: str | None, unet_dtype: str | None = None,
                    harmonizer_attention: str | None = None, attention_backends: list[str] | None = None,
                    overrides: list[str] = ()):
    """(model, cfg, info) of a profile's model with its initial weights, built here, as ``load_model``
    builds a checkpoint's (its speed does not depend on the weights): ``tiny``, or ``sd15`` (the
    SD-1.5-sized paper config at 512 px, random init, built without writing a checkpoint), with
    ``overrides`` (config files and key=value, as the CLI takes them)."""
    from id2face.inference import inference_overrides
    from id2face.model import ID2Face

    switches = inference_overrides(C.profile_config(profile, overrides).model, compile, vae_dtype, unet_dtype,
                                   harmonizer_attention, attention_backends)
    cfg = C.profile_config(profile, [*overrides, *switches])
    torch.manual_seed(0)
    model = ID2Face.from_config(cfg.model).to(device).eval()
    source = " ".join([f"untrained {profile} profile", *overrides])
    info = {"checkpoint": None, "config_source": source, "ema_weights": False,
            "compiled": compile, "first_stage_dtype": vae_dtype, "unet_dtype": unet_dtype}
    return model, cfg, info


def timed_run(folder: Path, output: Path, anonymizer, info: dict, io_workers: int, device: str) -> tuple[dict, float]:
    """(summary, seconds) of ``anonymize_files`` over ``folder``, the device's queue drained at both ends."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    summary = anonymize_files([folder], output, anonymizer, info=info, progress=False, io_workers=io_workers)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return summary, time.perf_counter() - started


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=12)
    parser.add_argument("--faces-per-photo", type=int, default=4, choices=range(1, 9))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, help="sampler steps (default: the checkpoint's; tiny: 10)")
    parser.add_argument("--checkpoint", help="an `id2face train` checkpoint (default: an untrained --profile model)")
    parser.add_argument("--profile", choices=("tiny", "sd15"), default="tiny",
                        help="without --checkpoint: the untrained model measured (sd15: 512 px, SD-1.5 size)")
    parser.add_argument("--override", nargs="*", action="extend", default=[],
                        help=f"the --profile model's config: {C.OVERRIDE_HELP}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", help="sampling precision, as `id2face anonymize --precision`")
    parser.add_argument("--compile", action="store_true", help="speed switches, as `id2face anonymize --compile`")
    parser.add_argument("--vae-dtype", choices=("float32", "bfloat16", "float16"),
                        help="an SD VAE checkpoint's first stage in this dtype, as `id2face anonymize --vae-dtype`")
    parser.add_argument("--unet-dtype", choices=("float32", "bfloat16", "float16"),
                        help="the UNet's weights and arithmetic in this dtype, as `id2face anonymize --unet-dtype`")
    parser.add_argument("--harmonizer-attention", choices=("weights", "sdpa"),
                        help="a decoupled harmonizer's attention path, as `id2face anonymize --harmonizer-attention`")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="cuDNN's algorithm search at each batch size's first call, as `id2face anonymize "
                             "--cudnn-benchmark`")
    parser.add_argument("--attention-backends", nargs="+", metavar="NAME",
                        help="the UNet's SDPA kernels, best first, as `id2face anonymize --attention-backends`")
    parser.add_argument("--tiny-decoder", metavar="DIR|random",
                        help="decode with this tiny autoencoder folder, as `id2face anonymize --tiny-decoder`; "
                             "random: TAESD's architecture untrained (the same cost)")
    parser.add_argument("--tiny-encoder", action="store_true",
                        help="the --tiny-decoder autoencoder encodes too, as `id2face anonymize --tiny-encoder`")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--io-workers", type=int, nargs="+", default=[0, DEFAULT_IO_WORKERS],
                        help=f"file I/O threads, each a run (default: 0 and {DEFAULT_IO_WORKERS})")
    parser.add_argument("--pipeline-depth", type=int, nargs="+", default=[0], metavar="N",
                        help="photos detected ahead and pasted back behind in worker threads while the model "
                             "samples, each a run, as `id2face anonymize --pipeline-depth` (default: 0)")
    parser.add_argument("--detect-workers", type=int, nargs="+", default=[1], metavar="N",
                        help="with a depth > 0: threads that detect and align ahead, each a run, as `id2face "
                             "anonymize --detect-workers` (default: 1; the command's own: min(4, CPUs))")
    parser.add_argument("--audit-recognizer", default="none", metavar="NAME",
                        help="the residual-identity judge, as `id2face anonymize --audit-recognizer` (default none; "
                             "the command's own default is dlib where installed)")
    parser.add_argument("--audit-workers", type=int, default=0, metavar="N",
                        help="a dlib audit's worker processes, as `id2face anonymize --audit-workers` (default 0)")
    parser.add_argument("--steady", action="store_true",
                        help="also time each setting on the photos twice over and report the marginal faces/s of "
                             "the second half (the pipeline's fill and drain cancel: a long job's rate)")
    parser.add_argument("--detect-devices", nargs="+", metavar="DEVICE",
                        help="where MTCNN runs, each a row of the grid, as `id2face anonymize --detect-device` "
                             "(default: --device)")
    parser.add_argument("--detect-max-side", type=int, default=DETECT_MAX_SIDE,
                        help=f"photos downscaled to this for detection, as `id2face anonymize --detect-max-side` "
                             f"(default {DETECT_MAX_SIDE}, the command's)")
    parser.add_argument("--photo-format", choices=("png", "jpg"), default="png")
    parser.add_argument("--photo-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"),
                        help="photo size (>= 640 x 480; e.g. 4032 3024, a 12 MP phone photo)")
    args = parser.parse_args(argv)
    if args.checkpoint and args.override:
        parser.error("--override changes the untrained --profile model; a --checkpoint runs with its own config")
    if args.tiny_encoder and not args.tiny_decoder:
        parser.error("--tiny-encoder encodes with the --tiny-decoder autoencoder: give --tiny-decoder DIR|random")
    if args.photo_size[0] < 640 or args.photo_size[1] < 480:
        parser.error("--photo-size must be at least 640 480 (the faces are placed on a 640 x 480 grid)")
    args.detect_devices = args.detect_devices or [args.device]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UntrainedWeightsWarning)  # the untrained --profile models

    from id2face.data.prepare import FaceDetector

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos, warm = tmp / "photos", tmp / "warm"
        photos.mkdir()
        warm.mkdir()
        make_photos(photos, args.photos, args.faces_per_photo, size=args.photo_size, fmt=args.photo_format)
        twice = tmp / "twice"  # --steady: the same photos, each also as a copy (same work, twice the files)
        if args.steady:
            twice.mkdir()
            for photo in sorted(photos.iterdir()):
                for copy in ("", "copy-"):
                    shutil.copyfile(photo, twice / f"{copy}{photo.name}")
        # The warm-up fills the largest batch: under --compile a batch of a shape not seen yet
        # recompiles the UNet (minutes at SD size), which must not land in the timed run. One photo
        # at the timed size warms detection and paste-back; the others are small (the faces'
        # crops, hence the model's shapes, do not depend on the photo's size).
        warm_photos = -(-max(args.batch_sizes) // args.faces_per_photo)
        make_photos(warm, 1, args.faces_per_photo, seed=1, size=args.photo_size, fmt=args.photo_format)
        make_photos(warm, warm_photos - 1, args.faces_per_photo, seed=2, fmt=args.photo_format, prefix="small")
        C.progress(f"{args.photos} photos made ({args.photo_size[0]}x{args.photo_size[1]} {args.photo_format}), "
                   f"{warm_photos} for the warm-up")
        if args.checkpoint:
            model, cfg, info = load_model(args.checkpoint, args.device, compile=args.compile,
                                          first_stage_dtype=args.vae_dtype, unet_dtype=args.unet_dtype,
                                          harmonizer_attention=args.harmonizer_attention,
                                          attention_backends=args.attention_backends)
        else:
            model, cfg, info = untrained_model(args.profile, args.device, args.compile, args.vae_dtype,
                                               args.unet_dtype, args.harmonizer_attention, args.attention_backends,
                                               args.override)
        if args.tiny_decoder:
            from id2face.inference import with_tiny_decoder

            path = None if args.tiny_decoder == "random" else args.tiny_decoder
            model.first_stage = with_tiny_decoder(model.first_stage, path, also_encodes=args.tiny_encoder,
                                                  channels_last=args.compile, compile=args.compile,
                                                  dtype=args.vae_dtype, random_init=path is None).to(args.device)
            info["tiny_decoder"], info["tiny_encoder"] = args.tiny_decoder, args.tiny_encoder
        model_name = Path(args.checkpoint).name if args.checkpoint else info["config_source"]
        size = int(cfg.data.image_size)
        template, info["template"] = training_template(cfg, size)
        precision = resolve_precision(args.precision, args.device, cfg.trainer.get("precision"))
        detectors = {where: FaceDetector(max_side=args.detect_max_side, device=where) for where in args.detect_devices}
        detector = detectors[args.detect_devices[0]]  # "detection alone" below
        audit = build_audit_recognizer(args.audit_recognizer, cfg, dlib_workers=args.audit_workers)
        audit = audit.to(args.device) if audit is not None else None
        C.progress(f"model, detector and audit built on {args.device}")

        from id2face.anonymize import write_photo
        from id2face.data.imageio import read_image

        started = time.perf_counter()
        pixels = [read_image(p).pixels for p in sorted(photos.glob(f"*.{args.photo_format}"))]
        for index, p in enumerate(pixels):
            write_photo(p, tmp / f"io{index}.{args.photo_format}")
        io_seconds = time.perf_counter() - started
        C.progress(f"file decode + encode alone: {io_seconds:.2f} s")
        detector(pixels[0])
        started = time.perf_counter()
        detected = sum(int((detector(p)[1] >= 0.8).sum()) for p in pixels)
        detect_seconds = time.perf_counter() - started
        C.progress(f"detection alone: {detect_seconds:.2f} s")

        settings_grid = [(b, w, a, d, where) for b in args.batch_sizes for w in args.io_workers
                         for a in args.pipeline_depth for d in (args.detect_workers if a else [1])  # in turn: none
                         for where in args.detect_devices]
        for batch, workers, ahead, detecting, where in settings_grid:
            settings = AnonymizeSettings(steps=args.steps, batch_size=batch, seed=0, precision=precision,
                                         pad_last_batch=args.compile,  # as `anonymize --compile`
                                         cudnn_benchmark=args.cudnn_benchmark)
            anonymizer = Anonymizer(model, size, template, settings, detector=detectors[where], audit=audit,
                                    device=args.device, pipeline_depth=ahead, detect_workers=detecting)
            run = f"{len(rows)}-{batch}-{workers}-{ahead}-{detecting}"  # a fresh folder per row, repeated settings too
            anonymize_files([warm], tmp / f"warm{run}", anonymizer, info=info, progress=False, io_workers=workers)
            C.progress(f"warm-up run done: batch {batch}, io {workers}, depth {ahead}, detect threads {detecting} "
                       f"on {where}"
                       f"{' (compiles first)' if args.compile else ''}")
            load = os.getloadavg()[0]
            summary, wall = timed_run(photos, tmp / f"out{run}", anonymizer, info, workers, args.device)
            faces = summary["faces"]["total"]
            C.progress(f"timed run: {faces} faces in {wall:.2f} s")
            row = {"batch_size": batch, "io_workers": workers, "pipeline_depth": ahead, "detect_workers": detecting,
                   "detect_device": where,
                   "photos": summary["images"]["written"], "faces": faces,
                   "anonymized": summary["faces"]["anonymized"], "seconds": round(wall, 2),
                   "faces_per_s": round(faces / wall, 3), "photos_per_s": round(args.photos / wall, 3),
                   "load_average_1min": round(load, 2), "stage_seconds": summary["stage_seconds"]}
            if args.steady:
                twice_summary, twice_wall = timed_run(twice, tmp / f"twice{run}", anonymizer, info, workers,
                                                      args.device)
                twice_faces = twice_summary["faces"]["total"]
                C.progress(f"timed run twice over: {twice_faces} faces in {twice_wall:.2f} s")
                steady = (twice_faces - faces) / (twice_wall - wall) if twice_wall > wall else None
                row.update(photos_twice=twice_summary["images"]["written"], faces_twice=twice_faces,
                           seconds_twice=round(twice_wall, 2),
                           steady_faces_per_s=None if steady is None else round(steady, 3))
            rows.append(row)

    steps = args.steps or int(cfg.model.sampler.params.num_inference_steps)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'cpu'}"
    print(f"anonymize throughput: {args.photos} photos {args.photo_size[0]}x{args.photo_size[1]} "
          f"{args.photo_format} x {args.faces_per_photo} SynthFaces faces, audit {args.audit_recognizer}"
          f"{f' in {args.audit_workers} processes' if args.audit_workers else ''}; model "
          f"{model_name} at {size} px, {steps} {cfg.model.sampler.name} steps, {precision}"
          f"{', compiled' if args.compile else ''}{f', VAE in {args.vae_dtype}' if args.vae_dtype else ''}"
          f"{f', UNet in {args.unet_dtype}' if args.unet_dtype else ''}"
          f"{f', tiny decoder {args.tiny_decoder}' if args.tiny_decoder else ''}"
          f"{' (encodes too)' if args.tiny_encoder else ''}; "
          f"device {args.device} ({device}), "
          f"{args.threads} torch thread(s), {os.cpu_count()} CPUs")
    print(f"MTCNN detection alone: {detect_seconds:.2f} s for {args.photos} photos "
          f"({args.photos / detect_seconds:.2f} photos/s, {detected} faces)")
    print(f"file decode + encode alone, one thread: {io_seconds:.2f} s for {args.photos} photos")
    steady_header = f" {'2N s':>7} {'steady faces/s':>14}" if args.steady else ""
    print(f"{'batch':>5} {'io':>3} {'depth':>5} {'detect':>6} {'on':>6} {'photos':>6} {'faces':>5} {'anonymized':>10} "
          f"{'seconds':>8} {'faces/s':>8} {'photos/s':>8} {'load':>5} {'busy s: detect/encode/sample/finish':>35}"
          f"{steady_header}")
    for r in rows:
        steady = (f" {r['seconds_twice']:>7.2f} {r['steady_faces_per_s'] or float('nan'):>14.3f}"
                  if args.steady else "")
        busy = "/".join(f"{seconds:.2f}" for seconds in r["stage_seconds"].values())
        print(f"{r['batch_size']:>5} {r['io_workers']:>3} {r['pipeline_depth']:>5} {r['detect_workers']:>6} "
              f"{r['detect_device']:>6} {r['photos']:>6} {r['faces']:>5} {r['anonymized']:>10} "
              f"{r['seconds']:>8.2f} {r['faces_per_s']:>8.3f} {r['photos_per_s']:>8.3f} {r['load_average_1min']:>5.2f}"
              f" {busy:>35}{steady}")
    print("detect: threads that detect and align ahead (with depth > 0), on: MTCNN's device. busy s: the seconds "
          "each stage worked on the N photos (detection and alignment, summed over its threads; identity "
          "encoding; sampling, waiting for the GPU included; paste-back and audit): in worker threads the busiest "
          "(detect's over its threads) sets the pace")
    if args.steady:
        print("steady faces/s: (faces of 2N photos - faces of N) / (seconds of 2N - seconds of N), the photos twice "
              "over: the pipeline's fill and drain cancel")
    best = max(rows, key=lambda r: r["faces_per_s"])
    steady_rates = [r["steady_faces_per_s"] for r in rows if r.get("steady_faces_per_s")]
    print(json.dumps({"benchmark": "anonymize_throughput", "device": args.device, "threads": args.threads,
                      "steps": steps, "image_size": size, "precision": precision, "compile": args.compile,
                      "vae_dtype": args.vae_dtype, "unet_dtype": args.unet_dtype, "tiny_decoder": args.tiny_decoder,
                      "tiny_encoder": args.tiny_encoder,
                      "harmonizer_attention": args.harmonizer_attention, "attention_backends": args.attention_backends,
                      "cudnn_benchmark": args.cudnn_benchmark, "model": model_name,
                      "guidance": model.guidance.registered_name, "faces_per_s": best["faces_per_s"],
                      "steady_faces_per_s": max(steady_rates) if steady_rates else None,
                      "best_batch_size": best["batch_size"], "best_io_workers": best["io_workers"],
                      "best_pipeline_depth": best["pipeline_depth"], "best_detect_workers": best["detect_workers"],
                      "best_detect_device": best["detect_device"],
                      "photo_size": args.photo_size, "photo_format": args.photo_format,
                      "audit_recognizer": args.audit_recognizer, "audit_workers": args.audit_workers,
                      "io_seconds_one_thread": round(io_seconds, 3),
                      "detect_photos_per_s": round(args.photos / detect_seconds, 3),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
