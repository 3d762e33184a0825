"""Sampling throughput of ``ID2Face.anonymize`` (faces/s) vs steps, batch, sampler and guidance.

    python benchmarks/sample.py --profile tiny|sd15 [--steps 10 25] [--batch 1 8]
        [--samplers ddim dpm_solver] [--cfg] [--repeats N] [--device cpu|cuda] [--bf16]
        [--channels-last] [--compile] [--threads T] [--decoders own taesd] [--breakdown] [--flops-only] [--traffic]

One anonymize call = identity encoder + identity VAE + identity mapping + attribute encoder +
masked-image encode + N sampler steps + first-stage decode + mask composite (paste-back inside
the aligned crop; detection and paste-back into the full photo are in anonymize_throughput.py).
``--channels-last`` / ``--compile`` switch the UNet and, when the first stage is the SD VAE, its
encoder and decoder (``model.backbone.params`` / ``model.first_stage.params``). Guidance ``none``
runs the UNet on the batch; a configured guidance (``--override ablations/guidance_negative.yaml``)
adds its rows, and ``--cfg`` adds ``cfg`` (identity dropped as the unconditional branch): each
doubles the UNet batch.
Each configuration runs once untimed, then ``--repeats`` times; the table gives the median
seconds per call and faces/s. Last line: one JSON object, ``faces_per_s`` = the best
configuration's figure, ``grid`` = every configuration. ``--flops-only`` / ``--traffic``: no
timing; FLOPs per face by part (meta device), or eager kernels, bytes and their roofline bound by
part (fake tensors, ``_traffic.py``): the fastest any eager run of the call could be; both count the
configured guidance's UNet batch.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402



def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25], help="sampler steps")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="faces per anonymize call")
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpm_solver"], choices=["ddim", "dpm_solver"])
    parser.add_argument("--cfg", action="store_true", help="also measure classifier-free guidance (2x UNet batch)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per configuration")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast around anonymize")
    parser.add_argument("--channels-last", action="store_true", help="UNet and SD VAE in channels_last")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and the SD VAE's encoder "
                                                               "and decoder (module.compile())")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", nargs="*", action="extend", default=[],
                        help=C.OVERRIDE_HELP)
    parser.add_argument("--flops-only", action="store_true",
                        help="no timing: FLOPs per face of one anonymization by part (meta device, any size), and "
                             "the TFLOP/s a faces/s figure needs")
    parser.add_argument("--traffic", action="store_true",
                        help="no timing: eager kernels, bytes and their roofline bound of one anonymization of "
                             "the first --batch faces by part, on fake tensors (any machine; --bf16: CUDA's autocast)")
    C.add_device_arguments(parser, "--traffic: device peak FLOP/s")
    parser.add_argument("--decoders", nargs="+", choices=C.FIRST_STAGE_VARIANTS, default=["own"],
                        help="who decodes the latents, each a row of the grid: own (the first stage), taesd "
                             "(TAESD's architecture, untrained: the cost of `id2face anonymize --tiny-decoder`), "
                             "taesd_both (it encodes the masked image too: `--tiny-decoder --tiny-encoder`); "
                             "taesd* sd15 only. --flops-only / --traffic take one")
    parser.add_argument("--breakdown", action="store_true",
                        help="one more call of the last configuration timed by part (encoders, first-stage "
                             "encode/decode, UNet)")
    args = parser.parse_args(argv)
    if args.traffic and (args.flops_only or args.compile or args.breakdown):
        parser.error("--traffic counts eager kernels on fake tensors: no --flops-only, --compile or --breakdown with it")
    if set(args.decoders) - {"own"} and args.profile != "sd15":
        parser.error("--decoders taesd decodes SD VAE latents: --profile sd15 (tiny samples in pixels)")
    if (args.flops_only or args.traffic) and len(args.decoders) > 1:
        parser.error("--flops-only / --traffic count one call: give one --decoders")
    if min(args.steps) < 1 or min(args.batch) < 1 or args.repeats < 1:
        parser.error("--steps, --batch and --repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.flops_only:
        return flops_only(args)
    if args.traffic:
        return traffic_only(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.resolve_device(args.device)
    from id2face.registry import GUIDANCES, SAMPLERS

    from id2face.model import speed_switch_overrides

    chosen = tuple(key for key, on in (("channels_last", args.channels_last), ("compile", args.compile)) if on)
    switches = speed_switch_overrides(C.profile_config(args.profile, args.override).model, chosen)
    model, cfg = C.build_model(args.profile, device, [*args.override, *switches], seed=args.seed)
    model.eval()
    # One model, one (compiled) UNet: the decoders swap in around it.
    first_stages = {name: C.first_stage_variant(model.first_stage, name, args.channels_last, args.compile)
                    .to(device) for name in args.decoders}
    size = C.PROFILE_IMAGE_SIZE[args.profile]
    samplers = {name: SAMPLERS.build({"name": name, "params": {}}, train_scheduler=model.scheduler).to(device)
                for name in args.samplers}
    # No guidance, the configured one (with its params) and, with --cfg, classifier-free guidance.
    guidances = {"none": GUIDANCES.build({"name": "none", "params": {}}),
                 model.guidance.registered_name: model.guidance}
    if args.cfg and "cfg" not in guidances:
        guidances["cfg"] = GUIDANCES.build({"name": "cfg", "params": {}})

    C.progress(f"model built on {device.type}")
    grid, rows = [], []
    for decoder, batch, steps, sampler, guidance in itertools.product(args.decoders, args.batch, args.steps, samplers,
                                                                       guidances):
        model.first_stage, model.sampler, model.guidance = first_stages[decoder], samplers[sampler], guidances[guidance]
        images, masks = C.face_batch(batch, size, device, seed=args.seed)

        def call():
            generator = torch.Generator(device).manual_seed(args.seed)
            with torch.no_grad(), C.autocast(device, args.bf16):
                model.anonymize(images, masks, generator=generator, key=0, num_inference_steps=steps)

        call()  # warm-up: allocator, cuDNN autotuning, compilation for this shape
        C.progress(f"warm-up call done: {decoder}, batch {batch}, {steps} {sampler} steps, guidance {guidance}")
        seconds = C.median([C.timed(call, device) for _ in range(args.repeats)])
        C.progress(f"timed: {batch / seconds:.2f} faces/s")
        unet_batch = batch * guidances[guidance].unet_copies
        entry = {"decoder": decoder, "batch": batch, "steps": steps, "sampler": sampler, "guidance": guidance,
                 "unet_batch": unet_batch, "s_per_call": seconds, "faces_per_s": batch / seconds,
                 "unet_evals_per_s": unet_batch * steps / seconds}
        grid.append(entry)
        rows.append([decoder, batch, steps, sampler, guidance, unet_batch, f"{seconds:.3f}", f"{batch / seconds:.2f}",
                     f"{entry['unet_evals_per_s']:.1f}"])

    breakdown = call_breakdown(model, call, device) if args.breakdown else None
    best = max(grid, key=lambda e: e["faces_per_s"])
    print(f"anonymize throughput, profile {args.profile} on {C.machine_description(device)}: {size} px faces, "
          f"first stage {C.first_stage_description(model)} (decoders: {', '.join(args.decoders)}), bf16={args.bf16} "
          f"channels_last={args.channels_last} compile={args.compile}; median of {args.repeats} calls after 1 warm-up")
    C.print_table(["decoder", "batch", "steps", "sampler", "guidance", "UNet batch", "s/call", "faces/s",
                   "UNet img-steps/s"],
                  rows)
    figures = {"benchmark": "sample", "profile": args.profile, "device": C.machine_description(device),
               "image_size": size, "first_stage": C.first_stage_description(model), "decoders": args.decoders,
               "bf16": args.bf16,
               "channels_last": args.channels_last, "compile": args.compile, "repeats": args.repeats,
               "torch": torch.__version__, "faces_per_s": best["faces_per_s"], "best": best, "grid": grid}
    if breakdown is not None:
        last = grid[-1]
        print(f"one call of batch {last['batch']}, {last['steps']} {last['sampler']} steps, guidance "
              f"{last['guidance']}, decoder {last['decoder']}, by part, ms (UNet = all its steps)")
        C.print_table(["part", "ms", "share"], [[k, f"{v * 1e3:.1f}", f"{100 * v / breakdown['call']:.1f}%"]
                                                for k, v in breakdown.items()])
        figures["breakdown_s"] = breakdown
    C.print_json(figures)
    return 0


def call_parts(model, cfg, n: int, size: int, device: torch.device) -> dict[str, tuple[Callable, int]]:
    """The parts of one anonymization of ``n`` faces as (call, times per anonymization), on
    ``device`` tensors: the sampler loop itself cannot run on meta or fake tensors (its scheduler
    reads timesteps on the host), so the UNet is one evaluation of the guidance's batch (every
    condition it combines), counted x steps."""
    images, masks = C.face_batch(n, size, torch.device("cpu"))
    images, masks = images.to(device), masks.to(device)
    latents = model.first_stage.encode(images)
    unet_batch = n * model.guidance.unet_copies
    unet_latents = latents.repeat(model.guidance.unet_copies, 1, 1, 1)
    context = torch.randn(unet_batch, C.context_tokens(model), int(cfg.model.context_dim), device=device)
    timesteps = torch.zeros(unet_batch, dtype=torch.long, device=device)
    return {
        "identity encoder + identity VAE": (lambda: model.identity_latent(images), 1),
        "attribute encoder": (lambda: model.attribute_encoder(images, masks), 1),
        "first stage encode (masked image)": (lambda: model.first_stage.encode(images), 1),
        "UNet": (lambda: model.denoise(unet_latents, timesteps, unet_latents, unet_latents[:, :1], context), 0),
        "first stage decode": (lambda: model.first_stage.decode(latents), 1),
    }


def guidance_description(model) -> str:
    copies = model.guidance.unet_copies
    return f"guidance {model.guidance.registered_name}" + (f" (UNet batch x {copies})" if copies > 1 else "")


def flops_per_face_by_part(model, cfg, profile: str, steps: int) -> dict[str, float]:
    """FLOPs per face of one anonymization at ``steps`` sampler steps, by part (the UNet's under
    ``UNet x {steps} steps``), counted on the meta device (``model`` built there)."""
    model.eval()
    n = 2
    # Not under no_grad: FlopCounterMode's module tracker trips over parameters without a graph.
    # Forward only is counted either way (nothing calls backward).
    parts = {(f"UNet x {steps} steps" if name == "UNet" else name): (times or steps) * C.count_flops(fn)
             for name, (fn, times) in call_parts(model, cfg, n, C.PROFILE_IMAGE_SIZE[profile],
                                                 torch.device("meta")).items()}
    return {name: flops / n for name, flops in parts.items()}


def flops_only(args) -> int:
    """FLOPs per face of one anonymization at the first ``--steps``, by part, counted on meta tensors."""
    device = torch.device("meta")
    with device:
        model, cfg = C.build_model(args.profile, device, args.override, seed=args.seed)
        model.first_stage = C.first_stage_variant(model.first_stage, args.decoders[0])
    steps, size = args.steps[0], C.PROFILE_IMAGE_SIZE[args.profile]
    per_face = flops_per_face_by_part(model, cfg, args.profile, steps)
    total = sum(per_face.values())
    target = 20.0
    print(f"FLOPs per face of one anonymization, profile {args.profile} ({size} px), {steps} steps, "
          f"{guidance_description(model)}, decoder {args.decoders[0]}")
    C.print_table(["part", "GFLOP/face", "share"],
                  [[k, f"{v / 1e9:.1f}", f"{100 * v / total:.1f}%"] for k, v in per_face.items()]
                  + [["total", f"{total / 1e9:.1f}", "100%"]])
    print(f"{target:g} faces/s needs {target * total / 1e12:.0f} TFLOP/s sustained over the whole call")
    C.print_json({"benchmark": "sample_flops", "profile": args.profile, "steps": steps, "decoder": args.decoders[0],
                  "guidance": model.guidance.registered_name, "unet_copies": model.guidance.unet_copies,
                  "flops_per_face": total, "flops_per_face_by_part": per_face,
                  "tflop_per_s_for_20_faces_per_s": target * total / 1e12})
    return 0


def traffic_only(args) -> int:
    """Eager kernels, bytes and the per-op roofline bound of one anonymization of ``--batch`` faces
    at the first ``--steps``, by part, counted on fake tensors (``_traffic.py``)."""
    import _traffic as T

    with torch.device("meta"):
        model, cfg = C.build_model(args.profile, torch.device("meta"), args.override, seed=args.seed)
        model.first_stage = C.first_stage_variant(model.first_stage, args.decoders[0])
    model.to_empty(device="cpu").eval()  # uninitialised storage: fake tensors never read it
    n, steps, size = args.batch[0], args.steps[0], C.PROFILE_IMAGE_SIZE[args.profile]
    device = torch.device("cpu")

    def count(fn, runs: int = 1) -> list[T.Traffic]:
        """``runs`` calls of ``fn`` in one autocast region, as the sampler's steps run: autocast
        casts each fp32 weight once per region (its cache), so later calls skip those casts."""
        with C.autocast(device, args.bf16):
            return [T.count_traffic(fn, args.peak_flops, args.bandwidth) for _ in range(runs)]

    figures = {}
    with T.fake_cpu(), torch.no_grad():
        for name, (fn, times) in call_parts(model, cfg, n, size, device).items():
            if name == "UNet":  # the first step, then a later one x (steps - 1)
                first, later = count(fn, 2)
                name, counted = f"UNet x {steps} steps", [(first, 1), (later, steps - 1)]
            else:
                counted = [(count(fn)[0], times)]
            figures[name] = {key: sum(getattr(t, key) * k for t, k in counted)
                             for key in ("kernels", "bytes", "flops", "roofline_s")}
    total_s = sum(f["roofline_s"] for f in figures.values())
    print(f"one anonymization of {n} faces counted on fake tensors, profile {args.profile} ({size} px), {steps} steps, "
          f"{guidance_description(model)}, bf16={args.bf16}, decoder {args.decoders[0]}; roofline: per aten op "
          f"max(FLOPs / {args.peak_flops:.3g}, bytes / {args.bandwidth:.3g} B/s), summed")
    C.print_table(["part", "kernels", "GB", "TFLOP", "roofline ms", "share"],
                  [[k, f["kernels"], f"{f['bytes'] / 1e9:.1f}", f"{f['flops'] / 1e12:.2f}",
                    f"{1e3 * f['roofline_s']:.1f}", f"{100 * f['roofline_s'] / total_s:.1f}%"]
                   for k, f in figures.items()] + [["total", "", "", "", f"{1e3 * total_s:.1f}", "100%"]])
    print(f"eager bound: {n / total_s:.1f} faces/s (no eager run of these kernels can be faster on this device)")
    C.print_json({"benchmark": "sample_traffic", "profile": args.profile, "steps": steps, "batch": n,
                  "decoder": args.decoders[0], "guidance": model.guidance.registered_name,
                  "unet_copies": model.guidance.unet_copies, "bf16": args.bf16, "peak_flops": args.peak_flops,
                  "bandwidth": args.bandwidth, "overrides": list(args.override), "roofline_s": total_s,
                  "faces_per_s_bound": n / total_s, "parts": figures})
    return 0


def call_breakdown(model, call, device) -> dict[str, float]:
    """Seconds of one call by part. The spans wrap the compiled modules from outside (the backbone
    around its UNet, the first stage's methods around the VAE's encoder and decoder), so a compiled
    run is broken down without recompiling or splitting a graph."""
    timer = C.SpanTimer(device)
    roles = ("identity_encoder", "id_mapping", "attribute_encoder", "identity_tokens")
    forwards = [(role, getattr(model, role)) for role in roles] + [("UNet", model.backbone)]
    methods = [("first_stage encode", model.first_stage, "encode"), ("first_stage decode", model.first_stage, "decode")]
    with timer.attached(forwards, methods), timer.span("call"):
        call()
    return timer.seconds()


if __name__ == "__main__":
    sys.exit(main())
