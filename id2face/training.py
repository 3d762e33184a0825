"""Training runs: one fixed folder per (experiment, ablation, seed), resumable after preemption.

``runs/<experiment>/<ablation>/seed<k>/`` holds ``config.yaml`` (the resolved config),
``split.json`` (the identity-disjoint split, unless ``data.split_file`` names one that runs share),
``checkpoints/last.ckpt`` (+ periodic ones), ``tb/`` (TensorBoard: losses, throughput and MFU
(``TrainingThroughput``), the image grids of ``log_images()``) and ``train_state.json``. Starting a
run whose folder has a checkpoint resumes it: a requeued SLURM task or a rerun of the same command
continues where it stopped.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf

from .config import save_config
from .errors import UserError, one_line
from .flops import images_in, training_step_flops


class Preempted(UserError):
    """Training stopped on SIGTERM/SIGUSR1 after saving a checkpoint; rerun to resume."""


def run_dir(cfg: DictConfig) -> Path:
    return Path(str(cfg.run.root)) / str(cfg.run.experiment) / str(cfg.run.ablation) / f"seed{int(cfg.run.seed)}"


def split_path(cfg: DictConfig, folder: Path) -> Path:
    """The run's identity split: ``data.split_file`` when the config names one (a split that runs
    share), else the run folder's ``split.json``."""
    named = OmegaConf.select(cfg, "data.split_file")
    return Path(str(named)) if named else folder / "split.json"


def resume_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint of a run: ``last.ckpt`` or a SLURM requeue (``hpc_ckpt_*.ckpt``)."""
    candidates = [folder / "checkpoints" / "last.ckpt", *folder.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


class LogImages(Callback):
    """Writes ``pl_module.log_images(batch)`` grids ([0, 1], CHW) to TensorBoard every ``every_n_steps``."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = int(every_n_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        for name, grid in pl_module.log_images(batch).items():
            experiment.add_image(f"images/{name}", grid.float().cpu(), step)  # grids are in [0, 1]


def optimizer_fingerprint(optimizer_state: dict) -> float:
    """A number that changes with any optimizer moment or step count (to check a resume restored them)."""
    total = 0.0
    for state in optimizer_state.get("state", {}).values():
        for value in state.values():
            if hasattr(value, "double"):
                total += float(value.double().abs().sum())
    return total


class RunState(Callback):
    """Keeps ``train_state.json`` current (status, step, where it resumed from), for monitoring a
    sweep and for checking that a resumed run restored its step and optimizer state."""

    def __init__(self, path: Path, resumed_from: Path | None):
        self.path = Path(path)
        self.state: dict[str, Any] = {"status": "starting", "resumed_from": str(resumed_from) if resumed_from else None}

    def write(self, trainer, **update: Any) -> None:
        self.state.update(update, global_step=int(trainer.global_step))
        if trainer.is_global_zero:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state, indent=2))
            os.replace(tmp, self.path)

    def on_train_start(self, trainer, pl_module) -> None:
        optimizers = trainer.optimizers
        fingerprint = optimizer_fingerprint(optimizers[0].state_dict()) if optimizers else None
        self.write(trainer, status="running", start_step=int(trainer.global_step),
                   start_optimizer_fingerprint=fingerprint)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self.write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer, status="finished", epoch=int(trainer.current_epoch))

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.write(trainer, status=f"failed: {type(exception).__name__}")


class CheckpointOnSignal(Callback):
    """On SIGTERM or SIGUSR1, save ``last.ckpt`` at the current step and stop, mid-epoch.

    Lightning notes SIGTERM (``trainer.received_sigterm``) but, in one process, stops only at the
    end of the epoch; under SLURM its own USR1 handler saves and requeues. This callback covers
    the rest, so a killed local run loses at most one step. Under SLURM auto-requeue, USR1 stays
    Lightning's.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.signal_received: int | None = None
        self.saved = False
        self._previous_usr1: Any = None

    def _on_usr1(self, signum, frame) -> None:
        self.signal_received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        if not ("SLURM_JOB_ID" in os.environ and _slurm_auto_requeue(trainer)):
            self._previous_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.signal_received is None and getattr(trainer, "received_sigterm", False):
            self.signal_received = signal.SIGTERM
        if self.signal_received is not None and not self.saved:
            self.save(trainer)
            trainer.should_stop = True

    def on_exception(self, trainer, pl_module, exception) -> None:
        # Lightning raises SIGTERMException where it notices the signal (e.g. in validation).
        if isinstance(exception, SIGTERMException) and not self.saved:
            self.signal_received = self.signal_received or signal.SIGTERM
            self.save(trainer)

    def save(self, trainer) -> None:
        # ``last.ckpt`` may be the periodic checkpoints' link to the newest one: writing through it
        # would overwrite that step's checkpoint with this later state.
        # Rank 0 alone: it writes the file, and another rank's unlink could take the new one.
        if getattr(trainer, "is_global_zero", True) and self.path.is_symlink():
            self.path.unlink(missing_ok=True)
        trainer.save_checkpoint(self.path)
        self.saved = True

    def on_train_end(self, trainer, pl_module) -> None:
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)


class StepCheckpoints(ModelCheckpoint):
    """Lightning's checkpoint every ``every_n_train_steps`` steps with ``last.ckpt`` linking to the
    newest, plus one at the step training ends on: with a step interval Lightning saves nothing at
    the end, so the steps after the last multiple were lost to ``eval`` and retrained by a rerun.
    Not after ``CheckpointOnSignal`` saved that step (a preempted job has seconds left)."""

    def __init__(self, *args: Any, on_signal: CheckpointOnSignal | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.on_signal = on_signal

    def on_train_end(self, trainer, pl_module) -> None:
        saved = self.on_signal is not None and self.on_signal.saved
        if not saved and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


class TrainingThroughput(Callback):
    """Logs ``throughput/images_per_s`` (all devices), ``throughput/tflops_per_s`` and, where one
    device's peak is known, ``throughput/mfu`` (per device) at the steps Lightning logs the losses
    (every ``trainer.log_every_n_steps``), over the time since the last log: data loading,
    optimiser, EMA and checkpoints included; validation and the first batch (compilation, cuDNN's
    search) left out. FLOPs are counted once, on the first batch (``flops.training_step_flops``,
    as ``benchmarks/train_step.py`` counts them), without gradient checkpointing's recomputation:
    model FLOPs, on which MFU is defined. A model the meta device cannot run (a component that reads
    a value back to the host) trains all the same: a warning, and images/s only. At the end of
    training, one line gives the same figures over all the logged intervals.

    Not Lightning's ``ThroughputMonitor``: it calls ``torch.cuda.synchronize()`` after every batch,
    which empties the GPU's queue each step (the host no longer runs ahead). Here the clock is read
    after one synchronisation where a log is written, where Lightning's logging of the losses
    waits for the GPU anyway.

    ``peak_flops``: one device's peak FLOP/s (``run.peak_flops``); ``None`` asks Lightning's table
    for the device and ``trainer.precision`` (H100 SXM bf16: 989e12; none for a CPU).
    """

    def __init__(self, peak_flops: float | str | None = None, clock: Callable[[], float] = time.perf_counter):
        self.peak_flops = None if peak_flops is None else float(peak_flops)
        self.clock = clock
        self.flops_per_image: float | None = None  # None: not counted (yet, or the model cannot run on meta)
        self._counted = False
        self._started: float | None = None  # clock at the last log (None: before the first batch ended)
        self._paused = 0.0  # seconds of the interval before a validation
        self._images = 0
        self._step = -1
        self._since = 0  # the first step of the interval being timed
        # all logged intervals, for the line at the end
        self._run_first_step = self._run_last_step = self._run_images = 0
        self._run_seconds = 0.0

    def setup(self, trainer, pl_module, stage: str) -> None:
        device = trainer.strategy.root_device
        if self.peak_flops is None and device.type != "cpu":
            from lightning.fabric.utilities.throughput import get_available_flops

            precision = str(trainer.precision)
            dtype = (torch.bfloat16 if precision.startswith("bf16") else
                     torch.float16 if precision.startswith("16") else torch.float32)
            self.peak_flops = get_available_flops(device, dtype)

    def _now(self, trainer) -> float:
        device = trainer.strategy.root_device
        if device.type == "cuda":  # the interval ends when its queued kernels have run
            torch.cuda.synchronize(device)
        return self.clock()

    def _active(self, trainer) -> bool:
        return trainer.is_global_zero and bool(trainer.loggers) and not trainer.sanity_checking

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._counted or not self._active(trainer):
            return
        self._counted = True
        try:
            flops = training_step_flops(pl_module.model, batch, recomputation=False)
        except Exception as err:  # noqa: BLE001 - a model the meta device cannot run still trains
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"throughput: the training step's FLOPs could not be counted on the meta device "
                          f"({type(err).__name__}: {message}); logging images/s only", stacklevel=1)
            return
        self.flops_per_image = flops.total / images_in(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._active(trainer):
            return
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        if self._started is None:
            self._started = self._now(trainer)
            self._since = trainer.global_step + 1
            return
        self._images += images_in(batch)
        if not stepped or trainer.log_every_n_steps < 1 or trainer.global_step % trainer.log_every_n_steps:
            return
        now = self._now(trainer)
        seconds, images = self._paused + now - self._started, self._images
        self._started, self._paused, self._images = now, 0.0, 0
        if seconds <= 0:  # a clock too coarse to time the interval
            return
        self._run_first_step = self._run_first_step or self._since
        self._run_last_step = trainer.global_step
        self._run_images += images
        self._run_seconds += seconds
        self._since = trainer.global_step + 1
        for logger in trainer.loggers:
            logger.log_metrics(self._figures(images, seconds, trainer.world_size), step=trainer.global_step)

    def _figures(self, images: int, seconds: float, world_size: int) -> dict[str, float]:
        per_device = images / seconds
        figures = {"throughput/images_per_s": per_device * world_size}
        if self.flops_per_image is not None:
            flops_per_s = self.flops_per_image * per_device
            figures["throughput/tflops_per_s"] = flops_per_s / 1e12
            if self.peak_flops:
                figures["throughput/mfu"] = flops_per_s / self.peak_flops
        return figures

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._active(trainer) or self._run_seconds <= 0:
            return
        figures = self._figures(self._run_images, self._run_seconds, trainer.world_size)
        line = (f"throughput: {figures['throughput/images_per_s']:.1f} images/s over steps "
                f"{self._run_first_step}-{self._run_last_step}")
        if "throughput/tflops_per_s" in figures:
            line += f", {figures['throughput/tflops_per_s']:.3f} TFLOP/s a device"
        if "throughput/mfu" in figures:
            line += f", MFU {100 * figures['throughput/mfu']:.1f} %"
        print(line, flush=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._started is not None and self._active(trainer):
            self._paused += self._now(trainer) - self._started

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._started is not None and self._active(trainer):
            self._started = self._now(trainer)


def _slurm_auto_requeue(trainer) -> bool:
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    return isinstance(env, SLURMEnvironment) and env.auto_requeue


def build_strategy(node: Any) -> Any:
    """``trainer.strategy``: a Lightning name as it is, or ``{name, params}``: the strategy Lightning
    registers under ``name`` with ``params`` added to its own (e.g. ``{name: ddp, params:
    {gradient_as_bucket_view: true}}``, which Lightning's names cannot say; ``ddp_comm_hook`` by
    name: ``ddp_comm_hook``)."""
    if not isinstance(node, dict):
        return node
    from lightning.pytorch.strategies import StrategyRegistry

    unknown = set(node) - {"name", "params"}
    if "name" not in node or unknown:
        raise UserError(f"trainer.strategy as a mapping takes name and params, got {sorted(node)}")
    name = str(node["name"])
    if name not in StrategyRegistry:
        raise UserError(f"trainer.strategy: unknown strategy {name!r}; Lightning's are "
                        f"{', '.join(sorted(StrategyRegistry.available_strategies()))}")
    entry = StrategyRegistry[name]
    params = dict(node.get("params") or {})
    accepted = _strategy_parameters(entry["strategy"])
    wrong = sorted(set(params) - accepted)
    if wrong:
        raise UserError(f"trainer.strategy {name}: unknown params {', '.join(wrong)}; it takes "
                        f"{', '.join(sorted(accepted))}")
    if isinstance(params.get("ddp_comm_hook"), str):
        params["ddp_comm_hook"] = ddp_comm_hook(params["ddp_comm_hook"])
    return entry["strategy"](**{**entry["init_params"], **params})


# torch's default DDP communication hooks, by the name a config gives (`{name}_hook` in torch).
DDP_COMM_HOOKS = ("allreduce", "fp16_compress", "bf16_compress")


def ddp_comm_hook(name: str):
    """``trainer.strategy.params.ddp_comm_hook`` by name: a YAML file cannot hold the function.
    ``bf16_compress`` all-reduces the gradients in bf16 (half the bytes of fp32: 1.7 of 3.5 GB a step
    for the SD-1.5 UNet's 867 M trainable weights), then divides and writes them back in fp32.
    Lightning registers the hook on CUDA only (``build_trainer`` warns elsewhere)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if name not in DDP_COMM_HOOKS:
        raise UserError(f"trainer.strategy ddp_comm_hook: unknown hook {name!r}; valid: {', '.join(DDP_COMM_HOOKS)}")
    return getattr(default_hooks, f"{name}_hook")


def _strategy_parameters(strategy_class) -> set[str]:
    """What a strategy's constructor takes; a DDP strategy also passes DistributedDataParallel's on."""
    import inspect

    from lightning.pytorch.strategies import DDPStrategy

    def named(function) -> set[str]:
        return {p.name for p in inspect.signature(function).parameters.values()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}

    accepted = named(strategy_class.__init__)
    if issubclass(strategy_class, DDPStrategy):
        accepted |= named(torch.nn.parallel.DistributedDataParallel.__init__) - {"module"}
    return accepted


def build_trainer(cfg: DictConfig, folder: Path, callbacks: list[Callback] = (), **overrides: Any) -> L.Trainer:
    """``lightning.Trainer(**cfg.trainer)`` writing into the run folder (``trainer.strategy`` through
    ``build_strategy``); ``overrides`` win."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if "strategy" in kwargs:
        kwargs["strategy"] = build_strategy(kwargs["strategy"])
    kwargs.setdefault("default_root_dir", str(folder))
    fast = bool(kwargs.get("fast_dev_run"))
    if not fast:
        kwargs.setdefault("logger", TensorBoardLogger(save_dir=str(folder), name="tb", version=""))
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), *callbacks]
    kwargs.update(overrides)
    try:
        trainer = L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, TypeError) as err:
        # The Trainer checks its arguments here, and they are the config's trainer section.
        raise UserError(f"trainer: {one_line(err, limit=1000)} (config section: trainer)") from None
    if getattr(trainer.strategy, "_ddp_comm_hook", None) is not None and trainer.strategy.root_device.type != "cuda":
        warnings.warn("trainer.strategy ddp_comm_hook: Lightning registers DDP communication hooks on CUDA "
                      "only; this run all-reduces uncompressed", stacklevel=2)
    return trainer


def latent_cache_hint(cfg: DictConfig, model) -> str | None:
    """A line for a run whose autoencoder first stage encodes every image in every step: at SD-1.5
    size the two 512 px encodes are half the step's FLOPs (2.58x the bare UNet step on an H100,
    1.09x from a cache; BENCHMARKS.md)."""
    if cfg.data.get("latent_cache") or model.first_stage.downscale == 1:
        return None
    return ("id2face train: no data.latent_cache: the first stage encodes each image and its masked copy in "
            "every step (half a step's FLOPs at SD-1.5 size); encode them once with `id2face cache-latents "
            "CONFIG -o DIR` and train with data.latent_cache=DIR")


def out_of_memory_message(cfg: DictConfig, step: int, err: BaseException) -> str:
    """One line for a CUDA out-of-memory error in training: what ran out, and the config keys that
    lower a step's memory (their effect at SD-1.5 size: BENCHMARKS.md, "Memory of a training step")."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    backbone = cfg.model.backbone.params
    remedies = ["lower data.batch_size"]
    if "mixed" in str(cfg.trainer.precision) and not backbone.get("low_precision_norms"):
        remedies.append("set model.backbone.params.low_precision_norms=true (its norms' activations in bf16)")
    if not backbone.get("gradient_checkpointing"):
        remedies.append("set model.backbone.params.gradient_checkpointing=true (activations recomputed: "
                        "+25% UNet FLOPs)")
    return (f"training ran out of GPU memory at step {step} with data.batch_size={cfg.data.batch_size} pairs a device "
            f"({detail}): {', or '.join(remedies)}; `python benchmarks/train_step.py --memory` estimates a step's "
            "memory without a GPU")


# What may differ between a run's starts: how long it trains, on what hardware, how it logs, where
# its files are, and switches that change the speed, not the arithmetic. Anything else would make
# one run of two configs under a config.yaml that describes neither.
RESUMABLE_CHANGES = (
    "run.root", "run.checkpoint_every_n_steps", "run.log_images_every_n_steps", "run.peak_flops",
    "trainer.max_steps", "trainer.max_epochs", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.limit_val_batches", "trainer.num_sanity_val_steps", "trainer.log_every_n_steps",
    "trainer.val_check_interval", "trainer.enable_progress_bar", "trainer.benchmark",
    "data.num_workers", "data.pixel_transport", "data.latent_cache", "data.split_file", "data.dataset.params.root",
    "model.identity_encoder.params.weights", "model.first_stage.params.path", "model.backbone.params.pretrained",
    "model.backbone.params.gradient_checkpointing", "model.backbone.params.channels_last",
    "model.backbone.params.compile", "model.backbone.params.sdpa_backends", "model.first_stage.params.channels_last",
    "model.first_stage.params.compile", "model.harmonizer.params.attention", "model.optim.fused", "eval",
)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    return {key: value for name, child in node.items() for key, value in _flat(child, f"{prefix}{name}.").items()} \
        if node else {prefix: {}}


def config_changes(previous: Any, current: Any) -> list[str]:
    """``key: old -> new`` for each value both configs hold that differs and may not change on a resume."""
    old, new = _flat(previous), _flat(current)
    changes = []
    for key in old.keys() & new.keys():
        name = key.rstrip(".")
        if old[key] != new[key] and not any(name == a or name.startswith(f"{a}.") for a in RESUMABLE_CHANGES):
            changes.append(f"{name}: {old[key]!r} -> {new[key]!r}")
    return sorted(changes)


def check_resumable(cfg: DictConfig, config_path: Path, checkpoint: Path) -> None:
    """Refuse to resume the run in ``config_path``'s folder with a config that computes something else."""
    if not config_path.is_file():
        return
    previous = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    changes = config_changes(previous, OmegaConf.to_container(cfg, resolve=True))
    if changes:
        more = f", and {len(changes) - 3} more" if len(changes) > 3 else ""
        raise UserError(f"{config_path.parent} holds a run ({checkpoint.name}) of another config: "
                        f"{'; '.join(changes[:3])}{more}; resume it with {config_path}, start over with "
                        "--no-resume, or give this config its own run.experiment or run.ablation")


def fit(cfg: DictConfig, resume: bool = True, callbacks: list[Callback] = (), **trainer_overrides: Any) -> Path:
    """Train the run described by ``cfg`` in its run folder; returns the folder.

    ``callbacks`` are added to the run's own. Raises ``Preempted`` if a signal stopped it (the
    checkpoint is saved; rerun to resume).
    """
    from .data.datamodule import FacePairDataModule
    from .lit_module import ID2FaceModule

    if OmegaConf.select(cfg, "model.backbone.params.dtype") not in (None, "float32"):
        raise UserError("model.backbone.params.dtype is for sampling (the UNet's weights in half precision): "
                        "training keeps fp32 weights; use trainer.precision=bf16-mixed")
    folder = run_dir(cfg)
    # torch.compile's kernels (model.backbone.params.compile) are cached beside the runs, not in
    # the node's /tmp: a requeued or sibling run compiles from a warm cache (tiny UNet, CPU: 63 s
    # -> 4 s; minutes at SD-1.5 size). Cache keys hash the graph and code, so runs can share it.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str((Path(cfg.run.root) / ".torchinductor").resolve()))
    L.seed_everything(int(cfg.run.seed), workers=True, verbose=False)
    checkpoint_dir = folder / "checkpoints"
    ckpt = resume_checkpoint(folder) if resume else None
    if ckpt is not None:
        check_resumable(cfg, folder / "config.yaml", ckpt)
    on_signal = CheckpointOnSignal(checkpoint_dir / "last.ckpt")
    run_state = RunState(folder / "train_state.json", ckpt)
    callbacks = [on_signal, run_state, LogImages(int(cfg.run.log_images_every_n_steps)),
                 TrainingThroughput(cfg.run.get("peak_flops")), *callbacks]
    if not cfg.trainer.get("fast_dev_run"):
        # last.ckpt links to the newest periodic checkpoint instead of being a second copy of it:
        # one write, not two, of the 14 GB an SD-1.5 run's checkpoint holds (BENCHMARKS.md).
        callbacks.append(StepCheckpoints(dirpath=str(checkpoint_dir), save_last="link", save_top_k=-1,
                                         every_n_train_steps=int(cfg.run.checkpoint_every_n_steps),
                                         on_signal=on_signal))
    trainer = build_trainer(cfg, folder, callbacks, **trainer_overrides)
    if ckpt is not None and trainer.is_global_zero:
        print(f"resuming {folder} from {ckpt.name}", flush=True)
    module = ID2FaceModule(cfg)
    hint = latent_cache_hint(cfg, module.model)
    if hint and trainer.is_global_zero:
        print(hint, file=sys.stderr, flush=True)
    # The split is saved in the run folder so evaluation (and a resumed run) use the same identities.
    # Its training order depends on run.seed (seeds are replicates) and resumes mid-epoch.
    datamodule = FacePairDataModule(cfg.data, split_file=split_path(cfg, folder), shuffle_seed=int(cfg.run.seed))
    # Written once the trainer and the model have taken the config: one they refuse leaves no run folder.
    config_path = folder / "config.yaml"
    resumed_config = config_path.read_text() if ckpt is not None and config_path.is_file() else None
    save_config(cfg, config_path)
    try:
        with warnings.catch_warnings():
            # The frozen roles (identity encoder, first stage) are in eval mode by design.
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            # The module's batch hooks (stream copy, uint8 pixels) are meant to serve every datamodule.
            warnings.filterwarnings("ignore", message=r"You have overridden `\w+` in `LightningModule` but have "
                                                      r"passed in a `LightningDataModule`")
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    except SIGTERMException:  # a SystemExit with code 0: it must not pass for a finished run
        pass
    except torch.OutOfMemoryError as err:
        run_state.write(trainer, status="failed: out of GPU memory")
        raise UserError(out_of_memory_message(cfg, trainer.global_step, err)) from None
    except ValueError as err:  # Lightning's check of the loop settings against the data: a config error
        if "val_check_interval" not in str(err):
            raise
        raise UserError(f"{' '.join(str(err).split())} (config key: trainer.val_check_interval)") from None
    except RuntimeError as err:  # the folder's checkpoint is of another model: a size or a variant changed
        if ckpt is None or "Error(s) in loading state_dict" not in str(err):
            raise
        if resumed_config is not None:
            config_path.write_text(resumed_config)  # it describes the checkpoint, which stays
        detail = one_line((str(err).strip().splitlines()[1:] or [""])[0], limit=200).rstrip(".")
        raise UserError(f"{ckpt} is a checkpoint of another model than this config describes ({detail}); resume it "
                        f"with {config_path}, start over with --no-resume, or give this config its own "
                        "run.experiment or run.ablation") from None
    if on_signal.signal_received is not None:
        run_state.write(trainer, status=f"preempted: {signal.Signals(on_signal.signal_received).name}")
        raise Preempted(f"stopped by signal {signal.Signals(on_signal.signal_received).name} at step {trainer.global_step}; "
                        f"checkpoint saved to {on_signal.path}; rerun the same command to resume")
    return folder


def final_checkpoint(folder: Path) -> Path:
    path = folder / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise UserError(f"no checkpoint in {folder}/checkpoints (did training run?)")
    return path
