"""Run a sweep's tasks: ``local`` (here, one after another) or ``slurm`` (one array job)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from ..errors import UserError, one_line
from .sweep import Sweep, SweepTask, with_slurm_layout


def run_task(task: SweepTask) -> dict:
    """Train (resuming from the run folder if it has a checkpoint), then evaluate: metrics dict.

    Module-level and picklable: this is what a SLURM array task executes.
    """
    from .task import train_and_evaluate

    return train_and_evaluate(task.config())


def run_slurm_task(task: SweepTask) -> dict:
    """``run_task`` as a SLURM array task executes it: SIGUSR1 requeues it wherever it comes, and a
    task whose training a signal stopped (checkpoint saved) raises ``Requeued``, no result.

    SLURM's requeue ends the running task with SIGTERM: fit stops with ``Preempted``, and as an
    error submitit would write it as the task's result, which ``--wait`` took for a failure while
    the requeued run went on to succeed. Without a result the waiter goes by SLURM's state
    (requeued, pending, running: not done) until the restarted run writes its own.
    """
    from ..training import Preempted
    from .task import RequeueOnUSR1, Requeued, train_and_evaluate

    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) and "SUBMITIT_FOLDER" in os.environ:
        import submitit

        # An earlier run of this requeued task may have left this rank's result as it was stopped
        # (a rank that failed as its peers went): not this run's, and the waiter would take it for it.
        submitit.JobEnvironment().paths.result_pickle.unlink(missing_ok=True)
    with RequeueOnUSR1() as requeue:
        try:
            return train_and_evaluate(task.config(), callbacks=[requeue])
        except Preempted as err:
            raise Requeued(f"{task.name}: {err}: no result from this run; requeued, the task resumes from it")


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


def _failure(job) -> str:
    """Why a finished array task failed, on one line: its exception (rank 0's first), or SLURM's
    state if it left no result, and the log to read."""
    from submitit.core.utils import FailedJobError

    ranks = [job.task(i) for i in range(job.num_tasks)]
    failed = next(((rank, err) for rank in ranks if (err := rank.exception()) is not None), None)
    if failed is None:
        return "no result"
    rank, err = failed
    text = str(err)
    if isinstance(err, FailedJobError):
        # The task's traceback, between submitit's dashed lines: its last block ends with the exception.
        trace = re.search(r"with trace:\n-+\n(.*)\n-+\nYou can check", text, re.DOTALL)
        last = (trace.group(1) if trace else text).split("Traceback (most recent call last):")[-1].splitlines()
        message = "\n".join(line for line in last if line.strip() and not line.startswith(" "))
        kind, _, detail = message.partition(": ")
        reason = f"{kind.rsplit('.', 1)[-1]}: {detail}" if detail else kind.rsplit(".", 1)[-1]
    else:
        state = re.search(r"has not produced any output \(state: ([^)]*)\)", text)
        reason = f"ended without a result (SLURM state: {state.group(1)})" if state else text
    return f"{one_line(reason, limit=500)} (log: {rank.paths.stderr})"


def wait_for_tasks(sweep: Sweep, jobs) -> list[dict]:
    """Each task's metrics (rank 0's: the other ranks return {}), once every task has finished;
    ``UserError`` naming each failed task and why. A requeued task is not finished: it leaves no
    result (``run_slurm_task``) and SLURM's state says pending or running again."""
    results, failures = [], []
    for task, job in zip(sweep.tasks, jobs):
        try:
            # result() refuses a job of several tasks (ranks): one result per rank.
            results.append(job.results()[0])
        except Exception:  # a failed task must not hide the others' results
            failures.append(f"{task.name}: {_failure(job)}")
    if failures:
        raise UserError(f"{len(failures)} task(s) failed: " + "; ".join(failures))
    return results


def launch_slurm(sweep: Sweep, folder: Path, resources: dict, wait: bool = False):
    import contextlib
    import io
    import shutil

    from submitit.core.utils import FailedJobError, FailedSubmissionError

    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: the slurm launcher needs a SLURM cluster (or use --launcher local)")
    sweep = with_slurm_layout(sweep, resources)
    executor = _slurm_executor(sweep, folder, resources)
    try:
        # submitit prints a refused sbatch's stderr before raising it: it is in the error, once.
        with contextlib.redirect_stderr(io.StringIO()):
            jobs = executor.map_array(run_slurm_task, sweep.tasks)
    except (FailedJobError, FailedSubmissionError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        # sbatch may warn before its error line; an output it printed without a job id is one line.
        errors = [line for line in lines if "error" in line.lower()] or lines
        reason = errors[0] if isinstance(err, FailedSubmissionError) else errors[-1]
        raise UserError(f"sbatch refused the array job: {reason}") from None
    print(f"submitted array job {jobs[0].job_id.split('_')[0]} with {len(jobs)} task(s); logs in {folder}",
          file=sys.stderr, flush=True)
    if wait:
        wait_for_tasks(sweep, jobs)
    return jobs
