"""Paper-style tables from run folders (``id2face table``) and the ``metrics.json`` format they read.

``metrics.json`` (written by ``id2face eval`` through ``save_metrics``)::

    {"metrics": {"fid": 23.1, "dlib/top1": 0.02, "dlib/top5": 0.07, "dlib/vr": 0.01,
                 "dlib/diversity": 0.41, "pose": 3.2, "expression": 0.05, ...},
     "meta": {"fid": "<feature convention>", "recognizers": {"dlib": "<description>"},
              "far": 0.001, "attributes": "<estimator>", "num_faces": 1000, ...}}

Metric keys are ``<kind>`` or ``<recognizer>/<kind>``; ``METRIC_KINDS`` knows each kind's label,
direction and precision (unknown kinds are shown without an arrow and never bolded). A run's row
name comes from its ``config.yaml`` (``run.experiment`` / ``run.ablation`` / the identity encoder,
by layout) or from the ``<experiment>/<ablation>/seed<N>`` folder layout; runs sharing a row name
(seeds) become mean +- std (sample std).
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import UserError

FORMATS = ("md", "latex", "csv")
LAYOUTS = ("main", "ablation", "encoders")


@dataclass(frozen=True)
class MetricKind:
    label: str
    higher_is_better: bool | None  # None: no direction (never bolded)
    decimals: int = 3


METRIC_KINDS: dict[str, MetricKind] = {
    "fid": MetricKind("FID", False, 2),
    "top1": MetricKind("Top-1", False, 3),
    "top5": MetricKind("Top-5", False, 3),
    "vr": MetricKind("VR", False, 3),
    "tar": MetricKind("TAR (orig.)", None, 3),
    "diversity": MetricKind("Div.", True, 3),
    "pose": MetricKind("Pose err.", False, 2),
    "expression": MetricKind("Expr. err.", False, 3),
    "id_factor_change": MetricKind("ID-factor change", True, 3),
    "psnr": MetricKind("PSNR", True, 2),
    "ssim": MetricKind("SSIM", True, 3),
    "lpips": MetricKind("LPIPS", False, 3),
}

# which metric kinds each layout shows, in order; recognizer kinds repeat per recognizer
LAYOUT_COLUMNS: dict[str, dict[str, Sequence[str]]] = {
    "main": {"recognizer": ("top1", "top5", "vr"), "plain": ("fid", "pose", "expression", "id_factor_change"),
             "recognizer_tail": ("diversity",), "plain_tail": ("psnr", "ssim", "lpips")},
    "ablation": {"recognizer": ("top1", "vr"), "plain": ("fid", "pose", "expression"),
                 "recognizer_tail": ("diversity",), "plain_tail": ()},
    "encoders": {"recognizer": ("top1", "top5", "vr"), "plain": ("fid",), "recognizer_tail": (), "plain_tail": ()},
}


def save_metrics(run_dir: str | Path, metrics: Mapping[str, float], meta: Mapping[str, Any]) -> Path:
    """Write ``<run_dir>/metrics.json`` in the format above (floats, NaN as null)."""
    path = Path(run_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v))
             for k, v in metrics.items()}
    path.write_text(json.dumps({"metrics": clean, "meta": dict(meta)}, indent=2, sort_keys=False) + "\n")
    return path


@dataclass
class Run:
    path: Path
    metrics: dict[str, float]
    meta: dict[str, Any]
    experiment: str
    ablation: str
    seed: int | None
    encoder: str | None

    def row_name(self, layout: str) -> str:
        if layout == "ablation":
            return self.ablation
        if layout == "encoders":
            return self.encoder or self.experiment
        return self.experiment if self.ablation in ("", "base") else f"{self.experiment} ({self.ablation})"


def load_run(path: str | Path) -> Run:
    """One run folder: its metrics.json (required) and config.yaml (optional, names the row)."""
    path = Path(path)
    file = path / "metrics.json"
    if not path.is_dir():
        raise UserError(f"run folder {path} does not exist")
    if not file.is_file():
        raise UserError(f"{path} is not an evaluated run folder: no metrics.json (run `id2face eval` first)")
    try:
        payload = json.loads(file.read_text())
        metrics = {str(k): (math.nan if v is None else float(v)) for k, v in payload["metrics"].items()}
        meta = dict(payload.get("meta") or {})
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{file} is not an id2face metrics file: {type(err).__name__}: {err}") from None
    experiment, ablation, seed, encoder = _names_from_path(path)
    config = path / "config.yaml"
    if config.is_file():
        try:
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=False)
        except Exception as err:  # a broken config only costs the names
            raise UserError(f"{config}: cannot read YAML: {str(err).splitlines()[0] if str(err) else err}") from None
        run = _section(cfg, "run", config)
        experiment = str(run.get("experiment", experiment))
        ablation = str(run.get("ablation", ablation))
        if run.get("seed") is not None:
            try:
                seed = int(run["seed"])
            except (TypeError, ValueError):
                raise UserError(f"{config}: run.seed must be a whole number, got {run['seed']!r}") from None
        encoder = _section(_section(cfg, "model", config), "identity_encoder", config).get("name", encoder)
    return Run(path, metrics, meta, experiment, ablation, seed, encoder)


def _section(node: Any, key: str, config: Path) -> dict:
    """``node[key]`` of a run's config.yaml as a mapping ({} if absent); a config of another shape is one line."""
    value = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or not isinstance(value, (dict, type(None))):
        where = key if isinstance(node, dict) else "its top level"
        raise UserError(f"{config} is not an id2face run config: {where} is not a section")
    return value or {}


def _names_from_path(path: Path) -> tuple[str, str, int | None, str | None]:
    match = re.fullmatch(r"seed(\d+)", path.name)
    if match and len(path.parts) >= 3:
        return path.parent.parent.name, path.parent.name, int(match.group(1)), None
    return path.name, "base", None, None


@dataclass
class Cell:
    mean: float
    std: float | None  # None for a single run
    n: int


@dataclass
class Table:
    columns: list[str]                      # metric keys
    rows: list[tuple[str, dict[str, Cell]]]
    caption: str
    recognizers: list[str] = field(default_factory=list)
    far: float | None = None

    def header(self, key: str, fmt: str) -> str:
        recognizer, kind = _split_key(key)
        spec = METRIC_KINDS.get(kind)
        label = spec.label if spec else kind
        if fmt == "latex":
            recognizer = _latex_escape(recognizer) if recognizer else recognizer
            label = _latex_escape(label)
        if kind == "vr" and self.far is not None:
            label = f"VR@{_short_number(self.far)}"
        if recognizer and (len(self.recognizers) > 1 or kind == "diversity"):
            label = f"{recognizer} {label}"
        if spec and spec.higher_is_better is not None:
            arrow = {"md": "↑" if spec.higher_is_better else "↓", "csv": "",
                     "latex": r"$\uparrow$" if spec.higher_is_better else r"$\downarrow$"}[fmt]
            label = f"{label} {arrow}".strip()
        return label

RECOGNIZER_KINDS = frozenset(kind for spec in LAYOUT_COLUMNS.values()
                             for kind in (*spec["recognizer"], *spec["recognizer_tail"]))


def _split_key(key: str) -> tuple[str | None, str]:
    if "/" in key:
        recognizer, kind = key.split("/", 1)
        return recognizer, kind
    return None, key


def _short_number(value: float) -> str:
    return f"{value:g}"


def _order_columns(keys: Iterable[str], layout: str, recognizers: Sequence[str]) -> list[str]:
    spec = LAYOUT_COLUMNS[layout]
    present = set(keys)
    ordered = []
    for kind in spec["recognizer"]:
        ordered += [f"{r}/{kind}" for r in recognizers if f"{r}/{kind}" in present]
    ordered += [k for k in spec["plain"] if k in present]
    for kind in spec["recognizer_tail"]:
        ordered += [f"{r}/{kind}" for r in recognizers if f"{r}/{kind}" in present]
    ordered += [k for k in spec["plain_tail"] if k in present]
    return ordered


def build_table(runs: Sequence[Run], layout: str = "main") -> Table:
    if layout not in LAYOUTS:
        raise UserError(f"unknown table layout '{layout}'; valid: {', '.join(LAYOUTS)}")
    if not runs:
        raise UserError("no run folders given")
    recognizers: list[str] = []
    for run in runs:
        for key in run.metrics:
            recognizer, kind = _split_key(key)  # a judge's prefix, not a plain metric's parts (pose/yaw)
            if recognizer and kind in RECOGNIZER_KINDS and recognizer not in recognizers:
                recognizers.append(recognizer)
    columns = _order_columns({k for run in runs for k in run.metrics}, layout, recognizers)
    if not columns:
        raise UserError(f"the runs have no metric the '{layout}' layout shows "
                        f"({', '.join(sorted({k for run in runs for k in run.metrics})) or 'none'})")
    groups = _replicate_groups(runs, layout)
    rows = []
    for name, members in groups.items():
        cells = {}
        for key in columns:
            values = [run.metrics[key] for run in members if key in run.metrics and math.isfinite(run.metrics[key])]
            if not values:
                continue
            mean = sum(values) / len(values)
            std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None)
            cells[key] = Cell(mean, std, len(values))
        rows.append((name, cells))
    columns = [key for key in columns if any(key in cells for _, cells in rows)]  # drop all-missing
    fars = {run.meta.get("far") for run in runs if run.meta.get("far") is not None}
    far = next(iter(fars)) if len(fars) == 1 else None
    shows_vr = any(_split_key(key)[1] == "vr" for key in columns)
    caption = _caption(runs, recognizers, fars if shows_vr else set(), max(len(m) for m in groups.values()))
    return Table(columns, rows, caption, recognizers, far)


def _replicate_groups(runs: Sequence[Run], layout: str) -> dict[str, list[Run]]:
    """Rows of runs to average: one per row name, its runs the seeds. Runs of one name that share a
    seed are not replicates but other evaluations of one model (``id2face eval`` under other
    switches into other folders): each such run keeps a row of its own, named by its folder."""
    named: dict[str, list[Run]] = {}
    for run in runs:
        named.setdefault(run.row_name(layout), []).append(run)
    groups: dict[str, list[Run]] = {}
    for name, members in named.items():
        seeds = [run.seed for run in members]
        if len(set(seeds)) == len(seeds):
            groups[name] = members
            continue
        for run in members:
            label = f"{name} [{run.path.name}]"
            groups[label if label not in groups else f"{name} [{run.path}]"] = [run]
    return groups


def _distinct(values: Iterable[str | None]) -> list[str]:
    out: list[str] = []
    for value in values:
        if value and value not in out:
            out.append(value)
    return out


def _caption(runs: Sequence[Run], recognizers: Sequence[str], fars: set, max_seeds: int) -> str:
    parts = []
    if recognizers:
        described = []
        for name in recognizers:
            descriptions = _distinct((run.meta.get("recognizers") or {}).get(name) for run in runs)
            differ = " differs between rows" if len(descriptions) > 1 else ""  # another judge: not comparable
            described.append(f"{name}{differ}: {' / '.join(descriptions)}" if descriptions else name)
        far_text = (f"; VR = verification rate at FAR {', '.join(_short_number(f) for f in sorted(fars))} "
                    "(threshold calibrated on the originals)") if fars else ""
        parts.append(f"Identity by {'; '.join(described)} (retrieval: gallery = originals, query = anonymized"
                     f"{far_text})")
    fid = _distinct(run.meta.get("fid") for run in runs)
    if fid:
        parts.append(("FID conventions differ between rows: " if len(fid) > 1 else "") + "; ".join(fid))
    attributes = _distinct(run.meta.get("attributes") for run in runs)
    if attributes:
        parts.append("Attributes: " + "; ".join(attributes))
    tail = "↓ lower is better, ↑ higher is better; best in bold"
    if max_seeds > 1:
        tail += "; mean ± std over seeds"
    parts.append(tail)
    return ". ".join(parts) + "."


def _format_value(key: str, value: float) -> str:
    spec = METRIC_KINDS.get(_split_key(key)[1])
    return f"{value:.{spec.decimals if spec else 3}f}"


def _best(table: Table) -> dict[str, str]:
    """Column -> the best displayed mean (ties at display precision are all best)."""
    best = {}
    for key in table.columns:
        spec = METRIC_KINDS.get(_split_key(key)[1])
        if spec is None or spec.higher_is_better is None:
            continue
        values = [cells[key].mean for _, cells in table.rows if key in cells]
        if len(values) > 1:
            chosen = max(values) if spec.higher_is_better else min(values)
            best[key] = _format_value(key, chosen)
    return best


def _cell_text(table: Table, key: str, cells: Mapping[str, Cell], best: Mapping[str, str], fmt: str) -> str:
    if key not in cells:
        return "–" if fmt == "md" else "--"
    cell = cells[key]
    text = _format_value(key, cell.mean)
    is_best = best.get(key) == text
    if cell.std is not None:
        text += (" ± " if fmt == "md" else r" $\pm$ ") + _format_value(key, cell.std)
    if is_best:
        text = f"**{text}**" if fmt == "md" else rf"\textbf{{{text}}}"
    return text


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "<": r"$<$", ">": r"$>$", "↓": r"$\downarrow$", "↑": r"$\uparrow$", "±": r"$\pm$"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def render_table(table: Table, fmt: str = "md") -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown table format '{fmt}'; valid: {', '.join(FORMATS)}")
    if fmt == "csv":
        return _render_csv(table)
    best = _best(table)
    if fmt == "md":
        header = ["Run"] + [table.header(k, "md") for k in table.columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * len(table.columns)) + "|"]
        for name, cells in table.rows:
            lines.append("| " + " | ".join([name] + [_cell_text(table, k, cells, best, "md") for k in table.columns]) + " |")
        return "\n".join(lines) + f"\n\nTable: {table.caption}\n"
    header = ["Run"] + [table.header(k, "latex") for k in table.columns]
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex_escape(table.caption)}}}",
             r"\begin{tabular}{l" + "c" * len(table.columns) + "}", r"\toprule",
             " & ".join(header) + r" \\", r"\midrule"]
    for name, cells in table.rows:
        lines.append(" & ".join([_latex_escape(name)] + [_cell_text(table, k, cells, best, "latex")
                                                          for k in table.columns]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _render_csv(table: Table) -> str:
    """Full-precision numbers: ``run, n, <key>, <key>_std, ...`` (std empty for a single run)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "n"] + [c for key in table.columns for c in (key, f"{key}_std")])
    for name, cells in table.rows:
        n = max((cell.n for cell in cells.values()), default=0)
        row: list[Any] = [name, n]
        for key in table.columns:
            cell = cells.get(key)
            row += [repr(cell.mean) if cell else "", repr(cell.std) if cell and cell.std is not None else ""]
        writer.writerow(row)
    return buffer.getvalue()


def make_table(run_dirs: Sequence[str | Path], fmt: str = "md", layout: str = "main") -> str:
    """The whole pipeline: run folders -> table text."""
    if fmt not in FORMATS:
        raise UserError(f"unknown table format '{fmt}'; valid: {', '.join(FORMATS)}")
    return render_table(build_table([load_run(d) for d in run_dirs], layout), fmt)
