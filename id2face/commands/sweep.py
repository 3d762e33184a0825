"""`id2face sweep SWEEP.yaml [--launcher slurm|local] [--dry-run] [key=value...]`."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file (base x ablations x seeds, resources)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every task")
    parser.add_argument("--launcher", choices=("slurm", "local"), default="slurm")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the tasks and print the sbatch script after the same checks (configs, resources, "
                             "the evaluation's judges); submit nothing")
    parser.add_argument("--wait", action="store_true", help="slurm: wait for every task and report failures")
    parser.add_argument("--folder", default=None, help="slurm logs (default: <run.root>/<experiment>/slurm)")
    for key in ("partition", "account", "qos", "constraint"):
        parser.add_argument(f"--{key}", default=None)
    for key in ("nodes", "gpus-per-node", "cpus-per-task", "mem-gb", "timeout-min", "array-parallelism"):
        parser.add_argument(f"--{key}", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from ..errors import UserError
    from ..launch.launchers import launch_local, launch_slurm, sbatch_script
    from ..launch.sweep import check_judges, check_resources, load_sweep, with_slurm_layout

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(f"'{bad[0]}' is not key=value (one sweep file per call)")
    sweep = load_sweep(args.sweep, args.overrides)
    resources = dict(sweep.resources)
    for key in ("partition", "account", "qos", "constraint", "nodes", "gpus_per_node", "cpus_per_task",
                "mem_gb", "timeout_min", "array_parallelism"):
        value = getattr(args, key)
        if value is not None:
            resources[key] = value
    check_resources(resources, "command line")
    if args.launcher == "slurm":
        # Each task's Trainer takes the layout SLURM gives it (the list below shows it), --dry-run too.
        sweep = with_slurm_layout(sweep, resources)
    check_judges(sweep)
    root = Path(str(sweep.tasks[0].config().run.root))
    folder = Path(args.folder) if args.folder else root / sweep.experiment / "slurm"

    for task in sweep.tasks:
        print(f"{task.name}\t{' '.join([*task.files, *task.all_overrides])}")
    if args.dry_run:
        if args.launcher == "slurm":
            print(sbatch_script(sweep, folder, resources))
        print(f"{len(sweep.tasks)} task(s); nothing launched (--dry-run)", file=sys.stderr)
        return 0
    if args.launcher == "local":
        launch_local(sweep)
    else:
        launch_slurm(sweep, folder, resources, wait=args.wait)
    return 0
