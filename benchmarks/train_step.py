"""Full ID²Face training step vs the bare diffusers UNet step, in one process on the same inputs.

    python benchmarks/train_step.py --profile tiny|sd15 [--batch N] [--steps N] [--warmup N] [--back-to-back K]
        [--device cpu|cuda] [--bf16] [--channels-last] [--compile] [--cached-latents] [--cudnn-benchmark]
        [--peak-flops F]
        [--threads T] [--breakdown] [--flops-only] [--traffic [--bandwidth B]] [--memory]

``--batch``: images denoised per step (even). The full step takes a pair batch of batch/2 pairs
and runs ``ID2Face.training_losses`` (frozen identity encoder and first stage, identity VAE,
attribute encoder, alignment, identity tokens, harmonized UNet over both directions of the pair)
+ backward + AdamW over every trainable parameter; with ``--cached-latents`` its batch carries the
float16 first-stage latents and identity embeddings a ``data.latent_cache`` batch carries, so it
skips both encodes and the identity encoder. The bare step is a stock
``UNet2DConditionModel`` of the same config (in_channels as ours) on the same noisy/masked
latents, noise and timesteps, with random context tokens of our count and width: MSE on epsilon
+ backward + AdamW. Steps alternate between the two (order flipped every step); the table gives
median step time, images/s, state memory (params + grads + AdamW moments) and the working memory
of one step above the pre-step level (CUDA: exact; CPU: sampled RSS, approximate), FLOPs per step
(``FlopCounterMode``, eager) and on CUDA the model FLOPs utilisation against ``--peak-flops``.
With CUDA, one extra step of each runs under ``torch.cuda.set_sync_debug_mode("warn")`` to count
host-device synchronisations. Last line: one JSON object (``ratio_full_over_bare``, ...).
``--traffic``: no timing either; one steady-state step of each counted on fake tensors (any machine,
SD-1.5 size in seconds): eager kernels, bytes moved, FLOPs and their per-op roofline bound on
a GPU of ``--peak-flops`` and ``--bandwidth`` (``_traffic.py``), and the ops where the two differ.
``--memory``: no timing either; one steady-state step of each on fake tensors under torch's
``MemTracker`` (CUDA's caching-allocator rounding): the device memory it peaks at by kind, and what
a training process holds besides (the EMA weights, DDP's gradient buckets), for a config at a batch
(SD-1.5 size, 32 images, cached latents: 42334 MiB above the pre-step level; 42371 measured on an H100).

Profiles: ``tiny`` = the packaged tiny config (pixel first stage, 32 px, 7 input channels);
``sd15`` = default.yaml with a random-init SD-1.5 AutoencoderKL first stage (512 px images,
64x64x4 latents, 9 input channels), the SD-1.5 UNet (320/640/1280/1280, cross-attention 768)
and a random FaceNet identity encoder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--batch", type=int, default=None,
                        help="images denoised per step, even (default: tiny 16, sd15 32)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each model first")
    parser.add_argument("--back-to-back", type=int, default=0, metavar="K",
                        help="also time K steps of each model with no host wait between them (as a training "
                             "loop without syncs runs them: the GPU queue never drains), in max(1, steps / K) "
                             "blocks; 0: off")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast around forward + loss")
    parser.add_argument("--channels-last", action="store_true", help="UNets and their inputs in channels_last")
    parser.add_argument("--compile", action="store_true", help="torch.compile both UNets (module.compile())")
    parser.add_argument("--eager-bare", action="store_true",
                        help="with --compile: compile our UNet only, the bare one stays eager (half the "
                             "compilation, for the full step's own figures: MFU)")
    parser.add_argument("--no-fused", action="store_true", help="plain AdamW on CUDA (default: fused)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="cuDNN times its convolution algorithms per shape in the warm-up and keeps the fastest "
                             "(torch.backends.cudnn.benchmark, as trainer.benchmark=true sets it; both steps)")
    parser.add_argument("--cached-latents", action="store_true",
                        help="the full step reads float16 first-stage latents and identity embeddings from its "
                             "batch (data.latent_cache), as the bare step gets its latents, instead of encoding "
                             "both images and embedding them")
    C.add_device_arguments(parser, "device peak FLOP/s for MFU and --traffic")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", nargs="*", action="extend", default=[],
                        help=C.OVERRIDE_HELP)
    parser.add_argument("--breakdown", action="store_true",
                        help="after the timed steps, one step of each timed by part (components, cross-attention "
                             "layers, backward, optimizer)")
    parser.add_argument("--kernel-table", type=int, default=0, metavar="N",
                        help="after the timed steps, profile one step of each (torch.profiler) and list the N "
                             "GPU kernels (CPU: aten ops) whose time differs most between full and bare")
    parser.add_argument("--flops-only", action="store_true",
                        help="no timing: build both on the meta device and print FLOPs per image by role "
                             "(works for sd15 on any machine)")
    parser.add_argument("--traffic", action="store_true",
                        help="no timing: count one step of each on fake tensors (any machine): eager kernels, "
                             "bytes moved, FLOPs, per-op roofline bound on --peak-flops / --bandwidth")
    parser.add_argument("--top", type=int, default=12, help="--traffic: ops listed where full and bare differ")
    parser.add_argument("--memory", action="store_true",
                        help="no timing: track one step of each on fake tensors (any machine): the device memory "
                             "at its peak by kind (parameters, optimizer state, activations, gradients), and a "
                             "training process's per-GPU total (+ EMA weights, DDP gradient buckets)")
    parser.add_argument("--host-overhead", action="store_true",
                        help="no GPU: time the host's side of one eager step of each (Python, dispatcher, "
                             "autograd: what issuing the kernels costs) on this CPU, per phase, on a narrow copy "
                             "of the profile (same ops, small widths; sd15), cached latents, at --batch (default "
                             "4) and twice that")
    parser.add_argument("--reps", type=int, default=10, help="--host-overhead: timed steps of each (median)")
    args = parser.parse_args(argv)
    if args.host_overhead and (args.traffic or args.flops_only or args.compile or args.breakdown or args.back_to_back
                               or args.kernel_table):
        parser.error("--host-overhead times eager steps on this CPU: no --traffic, --flops-only, --compile, "
                     "--breakdown, --back-to-back or --kernel-table with it")
    if args.traffic and args.memory:
        parser.error("--traffic and --memory are two runs: give one")
    fake = "--traffic" if args.traffic else "--memory" if args.memory else None
    if fake and (args.flops_only or args.compile or args.breakdown or args.back_to_back or args.kernel_table):
        parser.error(f"{fake} runs one eager step of each on fake tensors: no --flops-only, --compile, "
                     "--breakdown, --back-to-back or --kernel-table with it")
    if args.breakdown and args.compile:
        parser.error("--breakdown hooks into the UNet, which would recompile (and split) the compiled graph: "
                     "break down an eager run")
    if args.eager_bare and not args.compile:
        parser.error("--eager-bare keeps the bare UNet eager under --compile: give --compile too")
    if args.batch is None:  # --host-overhead: the fewest images with every op (the alignment's needs 4)
        args.batch = 4 if args.host_overhead else 16 if args.profile == "tiny" else 32
    if args.batch < 2 or args.batch % 2:
        parser.error("--batch must be an even number >= 2 (pairs x 2 directions)")
    return args


def make_optimizer(params, device, fused: bool):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=fused and device.type == "cuda")


def with_cached_latents(model, batch):
    """``batch`` with each side's float16 first-stage latents and identity embeddings, as a
    ``data.latent_cache`` batch has them."""
    out = {}
    for side, items in batch.items():
        latents, masked = model.first_stage_latents(items["image"], items["mask"])
        out[side] = {**items, "latent": latents.half(), "masked_latent": masked.half(),
                     "identity_embedding": model.identity_embedding(items["image"])}
    return out


def build_on_meta(args):
    """(ours, its config, the bare UNet of the same config), parameters on the meta device."""
    from diffusers import UNet2DConditionModel

    device = torch.device("meta")
    with device:
        model, cfg = C.build_model(args.profile, device, args.override, seed=args.seed)
        bare = UNet2DConditionModel.from_config(model.backbone.unet.config)
    return model, cfg, bare


def step_flops_per_image(model, profile: str, cached_latents: bool) -> tuple[float, dict[str, float]]:
    """(FLOPs per image of one training step of ``model``, forward + backward, the same by top-level
    module): ``id2face.flops.training_step_flops``, which a training run's logged MFU uses too."""
    from id2face.flops import images_in, training_step_flops

    # Two pairs: per-image FLOPs do not depend on the batch, except the alignment's N x N batch
    # statistics (negligible; computed from N = 4 images on).
    batch = C.pair_batch(2, C.PROFILE_IMAGE_SIZE[profile], torch.device("meta"))
    if cached_latents:
        batch = with_cached_latents(model, batch)
    flops, n = training_step_flops(model, batch), images_in(batch)
    return flops.total / n, {name: value / n for name, value in flops.by_role.items()}


def flops_only(args) -> int:
    """FLOPs of one full and one bare training step, counted on meta tensors (no memory, no compute)."""
    device = torch.device("meta")
    model, cfg, bare = build_on_meta(args)
    full, by_role = step_flops_per_image(model, args.profile, args.cached_latents)
    n = 4
    h = C.PROFILE_IMAGE_SIZE[args.profile] // model.first_stage.downscale
    context = torch.empty(n, C.context_tokens(model), int(cfg.model.context_dim), device=device)
    sample = torch.empty(n, bare.config.in_channels, h, h, device=device)
    bare_flops = C.count_flops(lambda: bare(sample, torch.zeros(n, device=device), context,
                                            return_dict=False)[0].float().pow(2).mean().backward()) / n
    print(f"FLOPs per image of one training step (forward + backward), profile {args.profile}, "
          f"first stage {C.first_stage_description(model)}, cached latents {args.cached_latents}")
    C.print_table(["part", "GFLOP/img", "share of full"],
                  [[k, f"{v / 1e9:.1f}", f"{100 * v / full:.1f}%"] for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])]
                  + [["full step", f"{full / 1e9:.1f}", "100%"], ["bare UNet step", f"{bare_flops / 1e9:.1f}", ""]])
    C.print_json({"benchmark": "train_step_flops", "profile": args.profile, "full_flops_per_image": full,
                  "bare_flops_per_image": bare_flops, "flop_ratio_full_over_bare": full / bare_flops,
                  "full_flops_per_image_by_role": by_role})
    return 0


class FakeStepInputs:
    """One step's inputs for both models on fake tensors (inside ``_traffic.fake_cpu()``): our pair
    batch, and the bare UNet's sample and context of our shapes, with the same noise and timesteps."""

    def __init__(self, args, model, cfg, bare):
        images = args.batch
        self.batch = C.pair_batch(images // 2, C.PROFILE_IMAGE_SIZE[args.profile], torch.device("cpu"), seed=args.seed)
        if args.cached_latents:
            self.batch = with_cached_latents(model, self.batch)
        h = C.PROFILE_IMAGE_SIZE[args.profile] // model.first_stage.downscale
        self.noise = torch.randn(images, int(bare.config.out_channels), h, h)
        self.timesteps = torch.randint(0, model.scheduler.num_train_timesteps, (images,))
        self.bare_sample = torch.randn(images, bare.config.in_channels, h, h)
        self.bare_context = torch.randn(images, C.context_tokens(model), int(cfg.model.context_dim))

    def losses(self, model, bare) -> dict:
        """{"full": our loss function, "bare": the bare UNet's}, each of no arguments."""
        return {
            "full": lambda: model.training_losses(self.batch, noise=self.noise, timesteps=self.timesteps)["loss"],
            "bare": lambda: F.mse_loss(bare(self.bare_sample, self.timesteps, encoder_hidden_states=self.bare_context,
                                            return_dict=False)[0].float(), self.noise.float()),
        }


def traffic_only(args) -> int:
    """Kernels, bytes and FLOPs of one steady-state training step of each model on fake tensors."""
    import _traffic as T

    model, cfg, bare = build_on_meta(args)
    # Real CPU modules with uninitialised storage (values are never read under fake tensors).
    model.to_empty(device="cpu").train()
    bare.to_empty(device="cpu").train()
    device = torch.device("cpu")
    images_per_step = args.batch
    with T.fake_cpu():
        losses = FakeStepInputs(args, model, cfg, bare).losses(model, bare)

        def step_of(params, loss_fn):
            # Fake copies carry the optimizer (fake gradients cannot go into real parameters' .grad).
            shadows = [torch.empty_like(p) for p in params]
            optimizer = torch.optim.AdamW(shadows, lr=1e-4, weight_decay=0.01, fused=not args.no_fused)

            def step():
                with C.autocast(device, args.bf16):
                    loss = loss_fn()
                for shadow, grad in zip(shadows, torch.autograd.grad(loss, params)):
                    shadow.grad = grad
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return step

        steps = {"full": step_of([p for p in model.parameters() if p.requires_grad], losses["full"]),
                 "bare": step_of(list(bare.parameters()), losses["bare"])}
        traffic = {}
        for name, step in steps.items():
            step()  # the optimizer's first step allocates its state: count a later one
            traffic[name] = T.count_traffic(step, args.peak_flops, args.bandwidth)

    full, bare_t = traffic["full"], traffic["bare"]
    print(f"one training step counted on fake tensors, profile {args.profile}: {images_per_step} images, "
          f"bf16={args.bf16} cached_latents={args.cached_latents} fused_adamw={not args.no_fused}; roofline: "
          f"per aten op max(FLOPs / {args.peak_flops:.3g}, bytes / {args.bandwidth:.3g} B/s), summed")
    rows = [[name, str(t.kernels), f"{t.bytes / 1e9:.1f}", f"{t.flops / images_per_step / 1e9:.1f}",
             f"{1e3 * t.roofline_s:.1f}"] for name, t in traffic.items()]
    rows.append(["full / bare", f"{full.kernels / bare_t.kernels:.3f}", f"{full.bytes / bare_t.bytes:.3f}",
                 f"{full.flops / bare_t.flops:.3f}", f"{full.roofline_s / bare_t.roofline_s:.3f}"])
    C.print_table(["step", "kernels", "GB moved", "GFLOP/img", "roofline ms"], rows)

    names = set(full.by_op) | set(bare_t.by_op)
    zero = T.OpCost()
    delta = {n: (full.by_op.get(n, zero), bare_t.by_op.get(n, zero)) for n in names}
    top = sorted(delta, key=lambda n: -abs(delta[n][0].roofline_s - delta[n][1].roofline_s))[:args.top]
    print("aten ops where full and bare differ most (by roofline time)")
    C.print_table(["op", "kernels full / bare", "GB full / bare", "roofline ms full - bare"],
                  [[n, f"{delta[n][0].kernels} / {delta[n][1].kernels}",
                    f"{delta[n][0].bytes / 1e9:.2f} / {delta[n][1].bytes / 1e9:.2f}",
                    f"{1e3 * (delta[n][0].roofline_s - delta[n][1].roofline_s):+.2f}"] for n in top])
    C.print_json({
        "benchmark": "train_step_traffic", "profile": args.profile, "batch_images": images_per_step,
        "bf16": args.bf16, "cached_latents": args.cached_latents, "peak_flops": args.peak_flops,
        "bandwidth": args.bandwidth, "overrides": list(args.override),
        **{name: {"kernels": t.kernels, "bytes": t.bytes, "flops": t.flops, "roofline_s": t.roofline_s}
           for name, t in traffic.items()},
        "kernel_ratio_full_over_bare": full.kernels / bare_t.kernels,
        "byte_ratio_full_over_bare": full.bytes / bare_t.bytes,
        "roofline_ratio_full_over_bare": full.roofline_s / bare_t.roofline_s,
    })
    return 0


def memory_only(args) -> int:
    """Device memory of one steady-state training step of each model, tracked on fake tensors."""
    import _traffic as T

    model, cfg, bare = build_on_meta(args)
    device = torch.device("cpu")
    mib = 2 ** 20
    figures = {}
    with T.fake_cpu():
        model.to_empty(device="cpu").train()  # fake parameters: their gradients are fake too
        bare.to_empty(device="cpu").train()
        losses = FakeStepInputs(args, model, cfg, bare).losses(model, bare)
        for name, module in {"full": model, "bare": bare}.items():
            params = [p for p in module.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=not args.no_fused)
            for p in params:  # a first step allocates AdamW's moments: the tracked one is a later step's
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            def loss_fn(loss_of=losses[name]):
                with C.autocast(device, args.bf16):
                    return loss_of()

            with T.cuda_autocast_fp32():
                peak = T.track_memory(loss_fn, optimizer, module)
            static = peak["Parameter"] + peak["Buffer"] + peak["Optstate"]
            figures[name] = {"params": sum(p.numel() for p in module.parameters()),
                             "trainable_params": sum(p.numel() for p in params), "peak_bytes": peak["Total"],
                             "step_peak_bytes": peak["Total"] - static, "by_kind_at_peak_bytes": peak}
            C.progress(f"{name} step tracked")
    trainable_bytes = 4 * figures["full"]["trainable_params"]  # fp32 weights
    process = figures["full"]["peak_bytes"] + 2 * trainable_bytes
    print(f"one training step on fake tensors, profile {args.profile}: {args.batch} images, bf16={args.bf16} "
          f"cached_latents={args.cached_latents} fused_adamw={not args.no_fused}; device memory at the step's peak, "
          f"MiB (CUDA allocator rounding; no CUDA context, cuDNN workspaces or fragmentation)")
    kinds = ["Parameter", "Buffer", "Optstate", "Activation", "Gradient", "Temp"]
    C.print_table(["step", *[k.lower() for k in kinds], "step peak (above pre-step)", "peak total"],
                  [[name, *[f"{f['by_kind_at_peak_bytes'][k] / mib:.0f}" for k in kinds],
                    f"{f['step_peak_bytes'] / mib:.0f}", f"{f['peak_bytes'] / mib:.0f}"]
                   for name, f in figures.items()])
    # With gradient_as_bucket_view the gradients are views of the buckets: no copy beside them, and
    # the step's peak (which counts its gradients) bounds what the buckets add.
    process_views = figures["full"]["peak_bytes"] + trainable_bytes
    print("a training process of ours per GPU: the full step's peak + EMA weights + DDP's gradient buckets "
          "(both fp32 copies of the trainable parameters; none beside the gradients with gradient_as_bucket_view, "
          "the paper configs' strategy: at most)")
    C.print_table(["DDP", "full step peak", "EMA weights", "DDP buckets", "per-GPU total"],
                  [[label, f"{figures['full']['peak_bytes'] / mib:.0f}", f"{trainable_bytes / mib:.0f}",
                    f"{buckets / mib:.0f}", f"{total / mib:.0f}"]
                   for label, buckets, total in (("ddp", trainable_bytes, process),
                                                 ("gradient_as_bucket_view", 0, process_views))])
    C.print_json({"benchmark": "train_step_memory", "profile": args.profile, "batch_images": args.batch,
                  "bf16": args.bf16, "cached_latents": args.cached_latents, "overrides": list(args.override),
                  **figures, "ema_bytes": trainable_bytes, "ddp_bucket_bytes": trainable_bytes,
                  "training_process_bytes": process, "training_process_bytes_gradient_views": process_views})
    return 0


def host_overhead_only(args) -> int:
    """Host seconds per phase of one eager step of each model, on a narrow copy, on this CPU: at
    ``--batch`` and twice that, and their extrapolation to no arithmetic (``2 t(B) - t(2B)``: the
    CPU's arithmetic grows with the batch, issuing the kernels does not)."""
    import _host as H

    torch.set_num_threads(args.threads or 1)  # the host issues kernels from one thread
    batches = (args.batch, 2 * args.batch)
    steps = {b: H.narrow_steps(args.profile, b, args.bf16, args.override, seed=args.seed) for b in batches}
    kernels = {name: H.kernels_by_phase(step) for name, step in steps[args.batch].items()}
    seconds = {b: {name: H.host_phases(step, args.reps) for name, step in steps[b].items()} for b in batches}
    issue_s = {name: {phase: max(2 * seconds[batches[0]][name][phase] - seconds[batches[1]][name][phase], 0.0)
                      for phase in kernels[name]} for name in kernels}
    print(f"host time of one eager training step, profile {args.profile} narrowed to its structure "
          f"({H.NARROW_IMAGE_SIZE[args.profile]} px, narrow widths), bf16={args.bf16}, cached latents, fused "
          f"AdamW; {C.machine_description(torch.device('cpu'))}, {torch.get_num_threads()} thread(s), median of "
          f"{args.reps}; 'issue': extrapolated to no arithmetic")
    b1, b2 = batches
    rows = []
    for name in kernels:
        phases = [p for p in H.PHASES if p in kernels[name]]
        for phase in [*phases, "step"]:
            chosen = phases if phase == "step" else [phase]
            n = sum(kernels[name][p] for p in chosen)
            t1, t2 = (sum(seconds[b][name][p] for p in chosen) for b in batches)
            issue = sum(issue_s[name][p] for p in chosen)
            rows.append([name, phase, str(n), f"{1e3 * t1:.1f}", f"{1e3 * t2:.1f}", f"{1e3 * issue:.1f}",
                         f"{1e6 * issue / max(n, 1):.1f}"])
    C.print_table(["step", "phase", "kernels", f"host ms, {b1} img", f"host ms, {b2} img", "issue ms",
                   "issue us / kernel"], rows)
    issue_full, issue_bare = sum(issue_s["full"].values()), sum(issue_s["bare"].values())
    print(f"issue ms full - bare: {1e3 * (issue_full - issue_bare):+.1f}; before the UNet's first kernel (a GPU "
          f"with an empty queue idles meanwhile): {1e3 * issue_s['full']['conditioning']:.1f}")
    C.print_json({"benchmark": "train_step_host", "profile": args.profile, "batches": list(batches),
                  "bf16": args.bf16, "overrides": list(args.override), "threads": torch.get_num_threads(),
                  "reps": args.reps, "device": C.machine_description(torch.device("cpu")),
                  **{name: {"kernels": sum(kernels[name].values()), "kernels_by_phase": kernels[name],
                            "host_s_by_phase": {str(b): seconds[b][name] for b in batches},
                            "issue_s_by_phase": issue_s[name], "issue_s": sum(issue_s[name].values())}
                     for name in kernels},
                  "issue_s_full_minus_bare": issue_full - issue_bare})
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.flops_only:
        return flops_only(args)
    if args.traffic:
        return traffic_only(args)
    if args.memory:
        return memory_only(args)
    if args.host_overhead:
        return host_overhead_only(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.resolve_device(args.device)
    if args.cudnn_benchmark:  # the warm-up steps time the algorithms; the timed ones use the fastest
        torch.backends.cudnn.benchmark = True
    from diffusers import UNet2DConditionModel

    pairs, images_per_step = args.batch // 2, args.batch
    switches = ["model.backbone.params.channels_last=true"] if args.channels_last else []
    model, cfg = C.build_model(args.profile, device, [*args.override, *switches], seed=args.seed)
    model.train()
    size = C.PROFILE_IMAGE_SIZE[args.profile]
    batch = C.pair_batch(pairs, size, device, seed=args.seed)
    if args.cached_latents:
        batch = with_cached_latents(model, batch)

    # Shared inputs: the noise, timesteps and (for the bare step) the latents and conditioning the
    # full model sees, computed once outside the timed region.
    g = torch.Generator().manual_seed(args.seed)
    images = torch.cat([batch["a"]["image"], batch["b"]["image"]])
    masks = torch.cat([batch["a"]["mask"], batch["b"]["mask"]])
    with torch.no_grad():
        latents = model.first_stage.encode(images)
        masked_latents, latent_masks = model.inpainting_condition(images, masks)
        attr_tokens = model.attribute_encoder(images, masks).shape[1]
    noise = torch.randn(latents.shape, generator=g).to(device)
    timesteps = torch.randint(0, model.scheduler.num_train_timesteps, (images_per_step,), generator=g).to(device)
    noisy = model.scheduler.add_noise(latents, noise, timesteps)
    bare_sample = torch.cat([noisy, masked_latents, latent_masks], dim=1)
    context_tokens = model.identity_tokens.num_tokens + attr_tokens
    context_dim = int(cfg.model.context_dim)
    bare_context = torch.randn(images_per_step, context_tokens, context_dim, generator=g).to(device)

    torch.manual_seed(args.seed)
    bare = UNet2DConditionModel.from_config(model.backbone.unet.config).to(device).train()
    if args.channels_last:  # ours through model.backbone.params.channels_last (see build_model above)
        bare.to(memory_format=torch.channels_last)
        bare_sample = bare_sample.contiguous(memory_format=torch.channels_last)

    full_params = [p for p in model.parameters() if p.requires_grad]
    bare_params = list(bare.parameters())
    fused = not args.no_fused
    full_opt = make_optimizer(full_params, device, fused)
    bare_opt = make_optimizer(bare_params, device, fused)
    C.progress(f"both models built on {device.type}, inputs ready")

    def full_step(timer=C.NullTimer()):
        with timer.span("forward"), C.autocast(device, args.bf16):
            loss = model.training_losses(batch, noise=noise, timesteps=timesteps)["loss"]
        with timer.span("backward"):
            loss.backward()
        with timer.span("optimizer"):
            full_opt.step()
            full_opt.zero_grad(set_to_none=True)

    def bare_step(timer=C.NullTimer()):
        with timer.span("forward"), C.autocast(device, args.bf16):
            prediction = bare(bare_sample, timesteps, encoder_hidden_states=bare_context, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), noise.float())
        with timer.span("backward"):
            loss.backward()
        with timer.span("optimizer"):
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)

    # FLOPs on the eager modules (one step each; it also allocates the AdamW states).
    from torch.utils.flop_counter import FlopCounterMode

    full_flop_counter = FlopCounterMode(display=False)
    with full_flop_counter:
        full_step()
    full_flops = int(full_flop_counter.get_total_flops())
    # FlopCounterMode names modules by class; the top level ones are the model's components.
    flops_by_role = {name: int(sum(ops.values())) for name, ops in full_flop_counter.get_flop_counts().items()
                     if "." not in name and name != "Global"}
    bare_flops = C.count_flops(bare_step)
    C.progress(f"FLOPs counted (one eager step each): full {full_flops / 1e12:.2f}, bare {bare_flops / 1e12:.2f} TFLOP")

    bare_compiled = args.compile and not args.eager_bare
    if args.compile:  # what model.backbone.params.compile does, after the eager FLOP count
        model.backbone.unet.compile()
    if bare_compiled:
        bare.compile()

    steps = {"full": full_step, "bare": bare_step}
    memory = {"full": 0, "bare": 0}
    warmup = max(args.warmup, 1)
    for index in range(warmup):
        for name, fn in steps.items():
            out = {}
            with C.peak_memory(device, out):
                fn()
            # The first warm-up step compiles under --compile: its memory is not the step's.
            if index > 0 or warmup == 1:
                memory[name] = max(memory[name], out["peak"])
            C.progress(f"warm-up step {index + 1} of {name} done{' (compiles first)' if args.compile else ''}")

    syncs = {}
    if device.type == "cuda":
        for name, fn in steps.items():
            syncs[name] = len(C.host_syncs(fn))

    times = {"full": [], "bare": []}
    for step in range(args.steps):
        order = ("full", "bare") if step % 2 == 0 else ("bare", "full")
        for name in order:
            times[name].append(C.timed(steps[name], device))
    C.progress(f"{args.steps} timed steps each: median full {C.median(times['full']) * 1e3:.1f} ms, "
               f"bare {C.median(times['bare']) * 1e3:.1f} ms")

    # Each timed step above starts with an empty GPU queue, so a step's host-bound start (our
    # conditioning networks' small kernels) is exposed; back to back, it overlaps the previous step.
    back_to_back = {"full": [], "bare": []}
    if args.back_to_back:
        k = args.back_to_back
        for block in range(max(1, args.steps // k)):
            for name in (("full", "bare") if block % 2 == 0 else ("bare", "full")):
                back_to_back[name].append(C.timed(lambda: [steps[name]() for _ in range(k)], device) / k)

    # What training adds after the step (ID2FaceModule.update_ema every model.optim.ema_every steps):
    # one lerp over the trainable weights, memory-bound.
    ema_weights, live = [p.detach().clone() for p in full_params], [p.detach() for p in full_params]
    ema_update_s = C.median([C.timed(lambda: torch._foreach_lerp_(ema_weights, live, 1e-4), device)
                             for _ in range(5)])
    del ema_weights

    breakdown = step_breakdown(model, bare, steps, device) if args.breakdown else None
    kernels = {name: C.kernel_times(fn, device) for name, fn in steps.items()} if args.kernel_table else None

    figures = {
        "benchmark": "train_step", "profile": args.profile, "device": C.machine_description(device),
        "batch_images": images_per_step, "pairs": pairs, "image_size": size,
        "latent_shape": list(latents.shape[1:]), "unet_in_channels": int(bare.config.in_channels),
        "context_tokens": context_tokens, "context_dim": context_dim,
        "first_stage": C.first_stage_description(model), "bf16": args.bf16,
        "channels_last": args.channels_last, "compile": args.compile, "bare_compiled": bare_compiled,
        "fused_adamw": fused and device.type == "cuda", "cached_latents": args.cached_latents,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "steps": args.steps, "warmup": args.warmup,
        "torch": torch.__version__,
    }
    rows = []
    for name, params, flops in (("full", full_params, full_flops), ("bare", bare_params, bare_flops)):
        t = C.median(times[name])
        entry = {
            "step_s": t, "img_per_s": images_per_step / t, "min_step_s": min(times[name]),
            "trainable_params": sum(p.numel() for p in params), "state_bytes": C.state_bytes(params),
            "step_peak_bytes": int(memory[name]), "flops_per_step": flops,
            "tflop_per_s": flops / t / 1e12,
        }
        if device.type == "cuda":
            entry["mfu"] = flops / t / args.peak_flops
            entry["host_syncs_per_step"] = syncs.get(name)
        if back_to_back[name]:
            entry["back_to_back_step_s"] = C.median(back_to_back[name])
        figures[name] = entry
        rows.append([name, f"{t * 1e3:.1f}", f"{images_per_step / t:.1f}", f"{entry['trainable_params'] / 1e6:.2f}",
                     f"{entry['state_bytes'] / 2**20:.0f}", f"{entry['step_peak_bytes'] / 2**20:.0f}",
                     f"{flops / images_per_step / 1e9:.2f}", f"{entry['tflop_per_s']:.3f}",
                     f"{100 * entry['mfu']:.1f}" if "mfu" in entry else "-",
                     entry.get("host_syncs_per_step", "-"),
                     f"{entry['back_to_back_step_s'] * 1e3:.1f}" if back_to_back[name] else "-"])
    figures["ratio_full_over_bare"] = figures["full"]["step_s"] / figures["bare"]["step_s"]
    figures["back_to_back"] = args.back_to_back
    if args.back_to_back:
        figures["ratio_full_over_bare_back_to_back"] = (figures["full"]["back_to_back_step_s"]
                                                        / figures["bare"]["back_to_back_step_s"])
    figures["flop_ratio_full_over_bare"] = full_flops / bare_flops
    figures["ema_update_s"] = ema_update_s
    figures["full_flops_by_role"] = flops_by_role
    if device.type == "cuda":
        figures["peak_flops"] = args.peak_flops

    print(f"train step, profile {args.profile} on {figures['device']}: {images_per_step} images/step "
          f"({pairs} pairs x 2 directions), {size} px -> latents {tuple(latents.shape[1:])}, "
          f"first stage {figures['first_stage']}, context {context_tokens} x {context_dim}, "
          f"bf16={args.bf16} channels_last={args.channels_last} compile={args.compile}"
          f"{' (ours only: the bare step eager)' if args.compile and not bare_compiled else ''} "
          f"cached_latents={args.cached_latents} cudnn_benchmark={figures['cudnn_benchmark']}; "
          f"median of {args.steps} interleaved steps after {args.warmup} warm-up")
    C.print_table(["step", "ms", "img/s", "Mparams", "state MiB", "step MiB", "GFLOP/img", "TFLOP/s", "MFU %",
                   "syncs", f"ms, {args.back_to_back} back to back"], rows)
    print(f"ratio full / bare: {figures['ratio_full_over_bare']:.3f} (FLOPs ratio "
          f"{figures['flop_ratio_full_over_bare']:.3f})"
          + (f"; back to back: {figures['ratio_full_over_bare_back_to_back']:.3f}" if args.back_to_back else ""))
    print(f"EMA update after a step (not in the step above): {ema_update_s * 1e3:.2f} ms, "
          f"{100 * ema_update_s / figures['full']['step_s']:.1f} % of the full step each step, a tenth of that at "
          f"model.optim.ema_every=10")
    share = {k: f"{100 * v / full_flops:.1f}%" for k, v in sorted(flops_by_role.items(), key=lambda kv: -kv[1]) if v}
    print("full-step FLOPs by role: " + ", ".join(f"{k} {v}" for k, v in share.items()))
    if breakdown is not None:
        figures["breakdown_s"] = breakdown
        print_breakdown(breakdown)
    if kernels is not None:
        figures["kernel_table"] = print_kernel_table(kernels, args.kernel_table, device)
    C.print_json(figures)
    return 0


def print_kernel_table(kernels: dict[str, dict[str, tuple[int, float]]], top: int, device) -> dict:
    """The ``top`` kernels (CPU: aten ops) by |full - bare| time of one profiled step; returns the
    totals and those rows for the JSON."""
    def of(name, kernel):  # (calls, seconds); a kernel only one of the steps runs is (0, 0) in the other
        return kernels[name].get(kernel, (0, 0.0))

    names = set(kernels["full"]) | set(kernels["bare"])
    delta = {k: of("full", k)[1] - of("bare", k)[1] for k in names}
    rows = sorted(delta, key=lambda k: -abs(delta[k]))[:top]
    total = {name: sum(t for _, t in times.values()) for name, times in kernels.items()}
    what = "GPU kernels" if device.type == "cuda" else "aten ops (self CPU time)"
    print(f"{what} of one profiled step: full {1e3 * total['full']:.1f} ms, bare {1e3 * total['bare']:.1f} ms; "
          f"the {len(rows)} that differ most")
    C.print_table(["kernel", "calls full / bare", "ms full / bare", "ms full - bare"],
                  [[k[:90], f"{of('full', k)[0]} / {of('bare', k)[0]}",
                    f"{1e3 * of('full', k)[1]:.2f} / {1e3 * of('bare', k)[1]:.2f}", f"{1e3 * delta[k]:+.2f}"]
                   for k in rows])
    return {"total_s": total, "top": [{"kernel": k, "calls": [of("full", k)[0], of("bare", k)[0]],
                                       "s": [of("full", k)[1], of("bare", k)[1]]} for k in rows]}


def step_breakdown(model, bare, steps, device) -> dict[str, dict[str, float]]:
    """Seconds of one more step of each model by part: forward (and within it each component of
    ours, the first-stage encodes, and the UNet's cross-attention layers: the harmonizer's processors
    in ours, stock attention in the bare one), backward, optimizer (``C.SpanTimer``)."""
    result = {}
    for name, unet in (("full", model.backbone.unet), ("bare", bare)):
        timer = C.SpanTimer(device)
        forwards = [("cross-attention layers", m) for path, m in unet.named_modules() if path.endswith("attn2")]
        methods = []
        if name == "full":
            forwards += [(role, m) for role, m in model.named_children() if role != "first_stage"]
            methods = [("first_stage", model.first_stage, "encode")]
        with timer.attached(forwards, methods):
            steps[name](timer)
        result[name] = timer.seconds()
    return result


def print_breakdown(breakdown: dict[str, dict[str, float]]) -> None:
    order = ["forward", "first_stage", "identity_encoder", "id_vae", "attribute_encoder", "alignment",
             "identity_tokens", "backbone", "cross-attention layers", "backward", "optimizer"]
    names = [n for n in order if any(n in b for b in breakdown.values())]
    print("one step by part, ms (component rows are inside 'forward'; cross-attention layers inside the UNet)")
    C.print_table(["part", *breakdown], [[n, *(f"{b[n] * 1e3:.1f}" if n in b else "-" for b in breakdown.values())]
                                          for n in names])


if __name__ == "__main__":
    sys.exit(main())
