"""Run a sweep's tasks: ``local`` (here, one after another) or ``slurm`` (one array job)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError
from .sweep import Sweep, SweepTask


def run_task(task: SweepTask) -> dict:
    """Train (resuming from the run folder if it has a checkpoint), then evaluate: metrics dict.

    Module-level and picklable: this is what a SLURM array task executes.
    """
    from .task import train_and_evaluate

    return train_and_evaluate(task.config())


def launch_local(sweep: Sweep) -> list[dict]:
    import torch

    results = []
    for i, task in enumerate(sweep.tasks, 1):
        print(f"[{i}/{len(sweep.tasks)}] {task.name}", file=sys.stderr, flush=True)
        # Each task as if in its own process (as under SLURM): with backbone compile on, a second
        # model through the same compiled forward would be recompiled with dynamic shapes (slower
        # to compile and to run; a tiny CPU run's compile went from 90 s to 240 s that way).
        torch._dynamo.reset()
        results.append(run_task(task))
    return results


def _slurm_executor(sweep: Sweep, folder: Path, resources: dict):
    import submitit

    executor = submitit.SlurmExecutor(folder=str(folder / "%j"), python=sys.executable)
    gpus = int(resources["gpus_per_node"] or 0)
    delay = int(resources["signal_delay_s"])
    params = dict(
        job_name=f"id2face-{sweep.experiment}",
        nodes=int(resources["nodes"]),
        # Lightning under SLURM wants one task per GPU; it reads the rank layout from SLURM.
        ntasks_per_node=max(gpus, 1),
        cpus_per_task=int(resources["cpus_per_task"]),
        mem=f"{int(resources['mem_gb'])}G",
        time=int(resources["timeout_min"]),
        array_parallelism=int(resources["array_parallelism"]),
        signal_delay_s=delay,
        # USR1 before the time limit: Lightning's SLURM plugin saves a checkpoint and requeues
        # the task; on restart the run folder's checkpoint is resumed.
        additional_parameters={"signal": f"USR1@{delay}", "requeue": True},
    )
    if gpus:
        params["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos", "constraint"):
        if resources.get(key):
            params.setdefault("additional_parameters", {})[key] = resources[key]
    executor.update_parameters(**params)
    return executor


def sbatch_script(sweep: Sweep, folder: Path, resources: dict) -> str:
    """The sbatch script the slurm launcher would submit (what `--dry-run` prints)."""
    executor = _slurm_executor(sweep, folder, resources)
    executor.parameters["map_count"] = len(sweep.tasks)
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def launch_slurm(sweep: Sweep, folder: Path, resources: dict, wait: bool = False):
    import shutil

    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: the slurm launcher needs a SLURM cluster (or use --launcher local)")
    executor = _slurm_executor(sweep, folder, resources)
    jobs = executor.map_array(run_task, sweep.tasks)
    print(f"submitted array job {jobs[0].job_id.split('_')[0]} with {len(jobs)} task(s); logs in {folder}",
          file=sys.stderr, flush=True)
    if wait:
        failures = []
        for task, job in zip(sweep.tasks, jobs):
            try:
                job.result()
            except Exception as err:  # a failed task must not hide the others' results
                failures.append(f"{task.name}: {str(err).strip().splitlines()[-1] if str(err).strip() else err}")
        if failures:
            raise UserError(f"{len(failures)} task(s) failed: " + "; ".join(failures))
    return jobs
