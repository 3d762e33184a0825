"""Sweep files: a grid of base config x ablations x seeds, expanded into tasks.

A sweep file (``experiments/*.sweep.yaml``)::

    base: [tiny, experiments/synth_main.yaml]   # config files every task starts from
    ablations:                                  # name -> files layered on top (`base: []` = none)
      base: []
      harmonizer_sum: [ablations/harmonizer_sum.yaml]
    seeds: [0, 1, 2]
    overrides: [trainer.max_steps=100]          # key=value for every task
    resources: {gpus_per_node: 1, nodes: 1, timeout_min: 240, partition: null, account: null}

``ablations`` may also be a plain list of files; each task's name is then the file's stem.
Every task's config is resolved (and so validated) when the sweep is expanded, before anything
is launched: a typo in one ablation stops the whole sweep at submission, not hours later;
``check_judges`` does the same for the files its evaluation reads (recognizers, Inception).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..config import SEED_RANGE, ConfigError, check_whole_number, load_config, resolve_config_path
from ..errors import UserError
from ..model import check_loss
from ..optim import check_optim
from ..registry import check_components

SWEEP_KEYS = {"base", "ablations", "seeds", "overrides", "resources"}
RESOURCE_DEFAULTS = {
    "partition": None,
    "account": None,
    "qos": None,
    "nodes": 1,
    "gpus_per_node": 1,
    "cpus_per_task": 8,
    "mem_gb": 64,
    "timeout_min": 24 * 60,
    "array_parallelism": 64,
    "constraint": None,
    "signal_delay_s": 90,
}
# The counts' lowest values. mem_gb=0 is SLURM's "all of the node's memory"; gpus_per_node may be
# null (no GPU request), no other count.
RESOURCE_MINIMUMS = {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 0, "timeout_min": 1,
                     "array_parallelism": 1, "signal_delay_s": 0}


def check_resources(resources: dict, where: str) -> None:
    """sbatch would refuse these after the grid was resolved, or take timeout_min=0 as no limit."""
    for key, low in RESOURCE_MINIMUMS.items():
        try:
            check_whole_number(f"resources.{key}", resources[key], low, nullable=key == "gpus_per_node")
        except ConfigError as err:
            raise UserError(f"{where}: {err}") from None


@dataclass
class SweepTask:
    """One run of the grid: files + overrides that resolve to its config, and where it lives."""

    experiment: str
    ablation: str
    seed: int
    files: list[str]
    overrides: list[str] = field(default_factory=list)

    @property
    def all_overrides(self) -> list[str]:
        return [*self.overrides, f"run.ablation={self.ablation}", f"run.seed={self.seed}"]

    def config(self) -> DictConfig:
        return load_config(self.files, self.all_overrides)

    @property
    def name(self) -> str:
        return f"{self.experiment}/{self.ablation}/seed{self.seed}"


@dataclass
class Sweep:
    path: Path
    tasks: list[SweepTask]
    resources: dict

    @property
    def experiment(self) -> str:
        return self.tasks[0].experiment


def _as_list(value, what: str, path: Path) -> list:
    if value is None:
        return []
    if isinstance(value, (ListConfig, list)):
        return [str(v) if not isinstance(v, int) else v for v in value]
    if isinstance(value, (str, int)):
        return [value]
    raise UserError(f"{path}: '{what}' must be a list")


def load_sweep(path: str | Path, extra_overrides: list[str] = ()) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} not found")
    try:
        spec = OmegaConf.load(path)
    except Exception as err:
        raise UserError(f"{path}: cannot read YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(spec, DictConfig):
        raise UserError(f"{path}: a sweep file is a mapping with keys {sorted(SWEEP_KEYS)}")
    unknown = set(spec.keys()) - SWEEP_KEYS
    if unknown:
        raise UserError(f"{path}: unknown sweep key(s) {sorted(unknown)}; valid: {sorted(SWEEP_KEYS)}")

    base = [str(f) for f in _as_list(spec.get("base"), "base", path)]
    ablations_spec = spec.get("ablations") or {"base": []}
    if isinstance(ablations_spec, (ListConfig, list)):
        ablations = {}
        for f in map(str, ablations_spec):
            if Path(f).stem in ablations:  # one task, one folder: the later file would replace the earlier
                raise UserError(f"{path}: ablations {ablations[Path(f).stem][0]} and {f} would share the name "
                                f"'{Path(f).stem}'; name them in a mapping (ablations: {{name: [file]}})")
            ablations[Path(f).stem] = [f]
    else:
        ablations = {str(k): [str(f) for f in _as_list(v, f"ablations.{k}", path)] for k, v in ablations_spec.items()}
    seeds = list(_as_list(spec.get("seeds"), "seeds", path)) or [0]
    for index, seed in enumerate(seeds):
        try:
            check_whole_number(f"seeds[{index}]", seed, *SEED_RANGE[:2])
        except ConfigError as err:
            raise UserError(f"{path}: {err}") from None
    seeds = [int(float(seed)) for seed in seeds]
    overrides = [str(o) for o in _as_list(spec.get("overrides"), "overrides", path)] + list(extra_overrides)
    for override in overrides:  # each task's own are layered last: these would be dropped unsaid
        if override.split("=", 1)[0].strip() in ("run.seed", "run.ablation"):
            raise UserError(f"{path}: override {override!r}: a sweep sets run.seed and run.ablation per task "
                            "from its seeds and ablations")

    resources = dict(RESOURCE_DEFAULTS)
    given = OmegaConf.to_container(spec.get("resources") or OmegaConf.create({}))
    bad = set(given) - set(RESOURCE_DEFAULTS)
    if bad:
        raise UserError(f"{path}: unknown resource(s) {sorted(bad)}; valid: {sorted(RESOURCE_DEFAULTS)}")
    resources.update(given)
    check_resources(resources, str(path))

    tasks = []
    for ablation, files in ablations.items():
        for seed in seeds:
            task = SweepTask("", ablation, seed, [*base, *files], overrides)
            try:
                cfg = task.config()
                check_components(cfg)  # a param typo fails here, not after the task waited in the queue
                check_loss(cfg.model)
                check_optim(cfg.model.optim)
            except UserError as err:
                raise UserError(f"{path}: ablation '{ablation}': {err}") from None
            task.experiment = str(cfg.run.experiment)
            tasks.append(task)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: two tasks share a run folder: {sorted(n for n in names if names.count(n) > 1)}")
    for f in base:
        resolve_config_path(f)
    return Sweep(path, tasks, resources)


def with_slurm_layout(sweep: Sweep, resources: dict) -> Sweep:
    """The sweep with each task's ``trainer.num_nodes`` and ``trainer.devices`` set from the slurm
    launcher's resources (``nodes``, one task per GPU: ``gpus_per_node``, at least 1).

    Lightning checks them on the node against SLURM's ``--nodes`` and ``--ntasks-per-node`` and
    refuses any difference, after the task waited in the queue: the allocation the sbatch request
    asks for is the only layout a task can train on, so the resources (files or flags) decide and
    the configs follow, as the task list shows. A value the sweep's own overrides (or the command
    line's key=value) ask for explicitly is a choice, not a default: one that differs is refused
    here, before anything is queued, instead of being replaced unsaid."""
    layout = {"trainer.num_nodes": int(resources["nodes"]),
              "trainer.devices": max(int(resources["gpus_per_node"] or 0), 1)}
    source = {"trainer.num_nodes": "resources.nodes (--nodes)",
              "trainer.devices": "resources.gpus_per_node (--gpus-per-node)"}
    tasks = []
    for task in sweep.tasks:
        explicit = {k.strip(): v.strip() for k, v in (o.split("=", 1) for o in task.overrides if "=" in o)}
        for key, value in layout.items():
            given = explicit.get(key, str(value))
            if given not in (str(value), "auto"):
                raise UserError(f"{sweep.path}: override {key}={given} contradicts {source[key]}={value}: the "
                                "slurm launcher runs each task on that layout and Lightning refuses another; set the "
                                "resource instead")
        overrides = [o for o in task.overrides if o.split("=", 1)[0].strip() not in layout]
        tasks.append(replace(task, overrides=[*overrides, *(f"{k}={v}" for k, v in layout.items())]))
    return replace(sweep, tasks=tasks)


def check_judges(sweep: Sweep) -> None:
    """Build the evaluation judges of each task once per distinct ``eval`` + ``data`` sections: a
    missing oracle or Inception file stops the sweep before anything is queued, not after each
    task's training. A judge trained on demand (an oracle's ``train_if_missing``) is trained here,
    once, so every task is judged by the same one."""
    from ..commands.eval import build_judges

    seen = set()
    for task in sweep.tasks:
        cfg = task.config()
        key = OmegaConf.to_yaml(OmegaConf.create({"eval": cfg.eval, "data": cfg.data}), resolve=True)
        if key in seen:
            continue
        seen.add(key)
        try:
            build_judges(cfg)
        except UserError as err:
            raise UserError(f"{sweep.path}: ablation '{task.ablation}': {err}") from None
