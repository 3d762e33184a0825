"""The training loop as users run it against the step it is made of: Lightning's ``fit`` of
``ID2FaceModule`` on ``FacePairDataModule`` (loader workers, the batch's copy and unpacking, EMA,
logging, the LR schedule, gradient clipping) vs the same module's step on a batch already on the
device (forward, backward, clipping, AdamW), in one process.

``train_step.py`` measures the step against the bare UNet's; this measures what the loop adds to
the step: where the loop waits for the loader, copies batches on the compute stream's critical
path, reads device values, or updates the EMA, its per-step time exceeds the step's.

    .venv/bin/python benchmarks/train_loop.py [--profile tiny|sd15] [--device cpu|cuda] [--pairs P]
        [--steps N] [--warmup W] [--workers K] [--override key=value ...]

The data: ``id2face prepare``'s layout of photo crops at the profile's image size, written to a
temporary folder (``data_loading.py``'s). The config's ``trainer.precision``, ``data.pixel_transport``,
``model.optim.ema_every`` and ``trainer.gradient_clip_val`` hold in both; the loop logs every
``trainer.log_every_n_steps``. Prints a table; the last line is a JSON object with every figure,
``ratio_loop_over_step`` among them.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from data_loading import write_prepared_folder  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(C.PROFILE_IMAGE_SIZE), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=None, help="pairs a step (default data.batch_size)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=2, help="steps of each before the timed ones")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default data.num_workers)")
    parser.add_argument("--files", type=int, default=None, help="photo crops written (default: enough for the steps)")
    parser.add_argument("--override", nargs="*", action="extend", default=[], help=C.OVERRIDE_HELP)
    return parser.parse_args(argv)


class StepWindow:
    """Wall time of optimiser steps ``first`` .. ``last`` (1-based) of a fit, the device drained at both ends."""

    def __init__(self, first: int, last: int, device: torch.device):
        self.first, self.last, self.device = first, last, device
        self.started = self.seconds = None

    def callback(self):
        from lightning.pytorch import Callback

        window = self

        class _Window(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == window.first - 1:
                    C.synchronize(window.device)
                    window.started = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == window.last:
                    C.synchronize(window.device)
                    window.seconds = time.perf_counter() - window.started

        return _Window()


def kept_logs():
    """A Lightning logger that keeps what it is given: ``(step, metrics)`` in ``.logged``."""
    from lightning.pytorch.loggers.logger import Logger

    class Kept(Logger):
        name, version = "kept", 0

        def __init__(self):
            super().__init__()
            self.logged = []

        def log_metrics(self, metrics, step=None):
            self.logged.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    return Kept()


def loop_seconds(cfg, device: torch.device, args) -> tuple[float, object, list]:
    """Seconds a step of ``fit`` over ``args.steps`` steps after ``args.warmup``, the module, and the
    ``(step, metrics)`` the fit's ``TrainingThroughput`` logged (as a training run logs them)."""
    import lightning as L

    from id2face.data.datamodule import FacePairDataModule
    from id2face.lit_module import ID2FaceModule
    from id2face.training import TrainingThroughput

    total = args.warmup + args.steps
    window = StepWindow(args.warmup + 1, total, device)
    torch.manual_seed(0)
    module = ID2FaceModule(cfg)
    logs = kept_logs()
    trainer = L.Trainer(accelerator=device.type, devices=1, precision=cfg.trainer.precision, max_steps=total,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=logs, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=cfg.trainer.gradient_clip_val,
                        log_every_n_steps=int(cfg.trainer.log_every_n_steps),
                        callbacks=[window.callback(), TrainingThroughput(cfg.run.get("peak_flops"))])
    C.progress(f"fit: {args.warmup} + {args.steps} steps")
    with warnings.catch_warnings():  # as id2face.training.fit: notices about choices made on purpose
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        warnings.filterwarnings("ignore", message=r"You have overridden `\w+` in `LightningModule`")
        trainer.fit(module, datamodule=FacePairDataModule(cfg.data))
    if window.seconds is None:
        raise SystemExit(f"the fit ended at step {trainer.global_step}, before step {total}: more --files")
    throughput = [(step, m) for step, m in logs.logged if "throughput/images_per_s" in m]
    return window.seconds / args.steps, module, throughput


def step_seconds(module, cfg, device: torch.device, args) -> float:
    """Seconds of the module's own step (the loop's arithmetic, nothing around it) on one batch on the device."""
    from id2face.data.datamodule import FacePairDataModule
    from id2face.precision import autocast

    datamodule = FacePairDataModule(cfg.data)
    batch = next(iter(datamodule.train_dataloader()))  # on the device as the loop's hooks put it there
    batch = module.on_after_batch_transfer(module.transfer_batch_to_device(batch, device, 0), 0)
    optimizer = module.configure_optimizers()["optimizer"]
    params = [p for p in module.parameters() if p.requires_grad]
    clip = cfg.trainer.gradient_clip_val
    precision = str(cfg.trainer.precision)

    def step():
        with autocast(precision, device):
            loss = module.model.training_losses(batch)["loss"]
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, float(clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    C.progress(f"step: {args.warmup} + {args.steps} steps")
    for _ in range(args.warmup):
        step()
    return C.timed(lambda: [step() for _ in range(args.steps)], device) / args.steps


def main(argv=None) -> int:
    args = parse_args(argv)
    device = C.resolve_device(args.device)
    base = C.profile_config(args.profile, args.override)
    pairs = int(args.pairs or base.data.batch_size)
    workers = int(base.data.num_workers if args.workers is None else args.workers)
    size = C.PROFILE_IMAGE_SIZE[args.profile]
    # The training split (0.9 of the identities) must last the fit's steps: one epoch, no restart.
    files = args.files or int(2.5 * pairs * (args.warmup + args.steps + 2)) + 16
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "prepared"
        C.progress(f"writing {files} crops of {size} px")
        write_prepared_folder(root, files, 4, size)
        cfg = C.profile_config(args.profile, [
            *args.override, f"trainer.accelerator={device.type}", "trainer.devices=1",
            "data.dataset={name: identity_folder, params: {root: " + str(root) + "}}", f"data.image_size={size}",
            f"data.batch_size={pairs}", f"data.num_workers={workers}", "data.split_fractions=[0.9,0.05,0.05]"])
        loop_s, module, logged = loop_seconds(cfg, device, args)
        step_s = step_seconds(module, cfg, device, args)

    images = 2 * pairs
    figures = {"benchmark": "train_loop", "profile": args.profile, "device": C.machine_description(device),
               "pairs": pairs, "images_per_step": images, "image_size": size, "workers": workers,
               "precision": str(cfg.trainer.precision), "pixel_transport": str(cfg.data.get("pixel_transport")),
               "ema_every": int(cfg.model.optim.get("ema_every", 1)), "steps": args.steps, "warmup": args.warmup,
               "loop_step_s": loop_s, "step_s": step_s, "ratio_loop_over_step": loop_s / step_s,
               "loop_overhead_ms": (loop_s - step_s) * 1e3, "loop_ema_updates": module._ema_updates,
               "torch": torch.__version__}
    # What the run's own log says: its last interval, when it lies in the timed window.
    every = int(cfg.trainer.log_every_n_steps)
    step, last = logged[-1] if logged else (None, {})
    in_window = step is not None and step - every >= args.warmup
    figures.update({"logged_step": step if in_window else None,
                    **{f"logged_{k.split('/')[1]}": (v if in_window else None) for k, v in last.items()}})
    print(f"training loop vs its step, profile {args.profile} on {figures['device']}: {images} images a step "
          f"({pairs} pairs), {size} px, {workers} loader workers, precision {figures['precision']}, "
          f"pixel_transport {figures['pixel_transport']}, ema_every {figures['ema_every']}; "
          f"{args.steps} timed steps after {args.warmup}")
    C.print_table(["run", "ms a step", "img/s"],
                  [["fit (loader, copy, EMA, logging, schedule)", f"{loop_s * 1e3:.1f}", f"{images / loop_s:.1f}"],
                   ["the step alone (one batch on the device)", f"{step_s * 1e3:.1f}", f"{images / step_s:.1f}"]]
                  + ([[f"fit, as its run logs it (throughput/*, steps {step - every + 1}-{step})",
                       f"{images / figures['logged_images_per_s'] * 1e3:.1f}", f"{figures['logged_images_per_s']:.1f}"]]
                     if in_window else []))
    if in_window and "logged_tflops_per_s" in figures:  # absent where the model's FLOPs could not be counted
        mfu = figures.get("logged_mfu")
        print(f"logged: {figures['logged_tflops_per_s']:.3f} TFLOP/s a device"
              + (f", MFU {100 * mfu:.1f} %" if mfu is not None else " (no peak known for this device: run.peak_flops)"))
    elif not in_window:
        print(f"logged: no throughput log inside the timed steps (trainer.log_every_n_steps={every})")
    print(f"ratio loop / step: {figures['ratio_loop_over_step']:.3f} ({figures['loop_overhead_ms']:+.1f} ms a step)")
    C.print_json(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
