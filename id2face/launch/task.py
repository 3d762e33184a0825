"""What one sweep task does: train in its run folder (resuming), then evaluate into metrics.json.

Under SLURM a task may be requeued at any point of it (``signal_delay_s`` before its time limit
SLURM sends SIGUSR1): ``RequeueOnUSR1`` requeues it wherever the signal comes, and a task whose
training a signal stopped ends with ``Requeued``, no result: the restarted task resumes from the
run folder's checkpoint and its result is the task's.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig


class Requeued(SystemExit):
    """A SLURM task stopped by a signal after saving its checkpoint: not a result. A SystemExit, so
    that submitit (which writes a result for any ``Exception``) writes none and its waiter waits
    for the requeued run instead of reporting the task failed."""


def slurm_job_id() -> str:
    """What `scontrol requeue` takes for this task: an array task's own id (as Lightning's handler
    uses), not the array's, which would requeue its every task."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]


class RequeueOnUSR1(Callback):
    """SIGUSR1 requeues the SLURM task wherever in the task it comes (a context manager for the task).

    Its default action ends the process: outside training (judges, model setup, evaluation) the
    task died there, not requeued, without metrics.json. Lightning sets its own handler in fit only
    where none is set, so while training runs (a callback of that fit) this one hands the signal to
    Lightning's: an ``hpc_ckpt`` of the current step, then the requeue. Elsewhere it requeues only:
    the restarted task resumes from the run folder's checkpoint (0 steps left once training is
    done) and evaluates. Rank 0 requeues; on the others the signal is taken, not fatal.
    """

    def __init__(self):
        self.trainer = None
        self._previous = None

    def __enter__(self) -> "RequeueOnUSR1":
        self._previous = signal.signal(signal.SIGUSR1, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGUSR1, self._previous)

    # From the first training step's start on, Lightning's state is restored and its handlers are set.
    def on_train_start(self, trainer, pl_module) -> None:
        self.trainer = trainer

    def on_train_end(self, trainer, pl_module) -> None:
        self.trainer = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.trainer = None

    def handle(self, signum, frame) -> None:
        from ..training import _slurm_auto_requeue

        lightning = getattr(getattr(self.trainer, "_signal_connector", None), "_slurm_sigusr_handler_fn", None)
        if lightning is not None and _slurm_auto_requeue(self.trainer):
            lightning(signum, frame)  # every rank: its checkpoint save is collective; rank 0 requeues
            return
        if int(os.environ.get("SLURM_PROCID", "0")) != 0:
            return
        job = slurm_job_id()
        print(f"SIGUSR1 outside training: requeueing SLURM job {job}", file=sys.stderr, flush=True)
        try:
            code = subprocess.call(["scontrol", "requeue", job], timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:  # raised here it would fail whatever the task was doing
            code = err
        if code != 0:
            print(f"requeueing SLURM job {job} failed ({code}); the task goes on until its time limit",
                  file=sys.stderr, flush=True)


def train_and_evaluate(cfg: DictConfig, callbacks: list[Callback] = ()) -> dict:
    from lightning.pytorch.utilities import rank_zero_only

    from ..commands.eval import build_judges, evaluate
    from ..lit_module import ID2FaceModule
    from ..metrics.table import save_metrics
    from ..training import final_checkpoint, fit, split_path

    # Rank 0 evaluates: a judge missing there fails the task now, not after its training.
    judges = build_judges(cfg) if rank_zero_only.rank == 0 else None
    folder = fit(cfg, callbacks=callbacks)
    rank = 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning keeps training's process group until exit; evaluation is rank 0 alone, and its
        # metrics would otherwise gather on compute() from ranks that have already returned.
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
    if rank == 0:
        checkpoint = torch.load(final_checkpoint(folder), map_location="cpu", weights_only=False)
        module = ID2FaceModule(cfg)
        module.load_state_dict(checkpoint["state_dict"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        metrics, meta = evaluate(module, cfg, device=device, progress=False,
                                 split_file=split_path(cfg, folder), judges=judges)
        meta["checkpoint"] = str(final_checkpoint(folder))
        save_metrics(folder, metrics, meta)
        return metrics
    return {}
