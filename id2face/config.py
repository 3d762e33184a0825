"""Layered configs: packaged default <- files in order <- ``key=value`` overrides.

Struct mode everywhere: a key that the default does not define is an error naming the key and the
layer it came from. A component node is ``{name, params}``; a layer that changes ``name`` replaces
the whole node, so no parameter of the previous variant leaks into the new one (the new variant's
constructor defaults apply to what the layer does not set).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError

SECTIONS = ("run", "model", "data", "trainer", "eval")
# The framework's own counts, their ranges and whether null is one (components check their params
# themselves): a null, 2.5 or -1 here was int()'s TypeError or numpy's seed error deep inside a
# run, or a silent 2.
SEED_RANGE = (0, 2**32 - 1, False)
COUNTS = {
    "run.seed": SEED_RANGE,
    "run.checkpoint_every_n_steps": (0, None, False),  # 0: only the last step's and one on SIGTERM/SIGUSR1
    "run.log_images_every_n_steps": (0, None, False),  # 0: no image grids
    "model.context_dim": (1, None, False),
    "model.optim.warmup_steps": (0, None, False),
    "model.optim.ema_every": (1, None, False),
    "data.image_size": (1, None, False),
    "data.batch_size": (1, None, False),
    "data.num_workers": (0, None, False),
    "data.split_seed": SEED_RANGE,
    "trainer.max_steps": (-1, None, False),  # -1: Lightning's "no step limit"
    "eval.limit": (1, None, True),  # null: the whole test split
    "eval.batch_size": (1, None, False),
    "eval.diversity_k": (1, None, False),  # 1: no diversity metric
}
FLAGS = ("model.optim.fused",)
# Values lightning.Trainer takes and then fails on mid-run (accumulate_grad_batches=0 and
# val_check_interval=0 divide by zero) or uses against the run (a negative clip value scales every
# gradient by a negative factor: gradient ascent).
BOUNDS = {"trainer.accumulate_grad_batches": (">= 1", lambda v: v >= 1),
          "trainer.val_check_interval": ("> 0", lambda v: v > 0),
          "trainer.gradient_clip_val": (">= 0", lambda v: v >= 0)}


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be applied; the message names the source."""


def packaged_config_path(name: str) -> Path:
    return Path(str(resources.files("id2face") / "configs" / f"{name}.yaml"))


def resolve_config_path(arg: str) -> Path:
    """A path, or the bare name of a packaged config (``tiny`` -> id2face/configs/tiny.yaml)."""
    path = Path(arg)
    if path.is_file():
        return path
    if path.suffix == "" and "/" not in arg and packaged_config_path(arg).is_file():
        return packaged_config_path(arg)
    packaged = sorted(p.stem for p in packaged_config_path("default").parent.glob("*.yaml"))
    raise ConfigError(f"config '{arg}' not found: neither a file nor a packaged config ({', '.join(packaged)})")


def _read_yaml(path: Path) -> DictConfig:
    try:
        layer = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{path}: cannot read YAML: {_first_line(err)}") from None
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: cannot read YAML: {_first_line(err)}") from None
    if layer is None:
        return OmegaConf.create({})
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping at the top level")
    return layer


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _is_component(node) -> bool:
    return isinstance(node, DictConfig) and "name" in node and set(node.keys()) <= {"name", "params"}


def _replace_swapped_components(base: DictConfig, layer: DictConfig, prefix: str = "") -> None:
    """Where ``layer`` names a different variant than ``base``, reset the base node to it, keeping
    the base's values of the params the layer lists under ``keep_params`` (an ablation that swaps
    the variant and nothing else: the sizes both variants take stay the run's)."""
    for key in list(layer.keys()):
        if key not in base:
            continue  # the struct merge reports it
        new, old = layer[key], base[key]
        path = f"{prefix}{key}"
        if isinstance(new, DictConfig) and _is_component(old) and "name" in new:
            keep = new.pop("keep_params", None) or []
            keep = [str(keep)] if isinstance(keep, str) else [str(param) for param in keep]
            if new.name != old.name:
                params = old.get("params") or {}
                OmegaConf.set_struct(base, False)
                base[key] = {"name": new.name, "params": {p: params[p] for p in keep if p in params}}
                OmegaConf.set_struct(base, True)
        elif isinstance(new, DictConfig) and isinstance(old, DictConfig):
            _replace_swapped_components(old, new, path + ".")


def _open_params(cfg: DictConfig) -> None:
    """A component's params are checked against its constructor at build time, not here.

    A variant that came in by a swap starts with empty params, so its keys must be addable.
    """
    for key in cfg.keys():
        node = cfg[key]
        if _is_component(node):
            if "params" in node and isinstance(node.params, DictConfig):
                OmegaConf.set_struct(node.params, False)
        elif isinstance(node, DictConfig):
            _open_params(node)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_kinds_stay(base: DictConfig, layer: DictConfig, source: str, prefix: str = "") -> None:
    """Where ``base`` holds a number, ``layer`` must give one: ``data.batch_size=eight`` fails here,
    naming the key and the layer, not as ``int()``'s ValueError deep inside a run. A string that
    reads as a number passes (the code converts it), and so do null, lists (``attention_head_dim``
    takes one per level) and interpolations. A section stays a section: OmegaConf lets
    ``model.backbone=3`` replace the whole node, which no run could use."""
    for key in layer.keys():
        if key not in base or OmegaConf.is_interpolation(layer, key) or OmegaConf.is_interpolation(base, key) \
                or OmegaConf.is_missing(base, key):
            continue
        new, old = layer[key], base[key]
        if isinstance(new, DictConfig) and isinstance(old, DictConfig):
            _check_kinds_stay(old, new, source, f"{prefix}{key}.")
        elif isinstance(old, DictConfig):
            raise ConfigError(f"{source}: {prefix}{key} is a section (keys: {', '.join(map(str, old.keys()))}), "
                              f"got {new!r}; set one of its keys ({prefix}{key}.KEY=VALUE)")
        elif isinstance(old, ListConfig) and isinstance(new, DictConfig):
            raise ConfigError(f"{source}: {prefix}{key} takes a list, got a mapping: write it as [{{...}}]")
        elif _is_number(old) and (isinstance(new, DictConfig) or isinstance(new, str) and not _reads_as_number(new)):
            shown = OmegaConf.to_container(new) if isinstance(new, DictConfig) else new
            raise ConfigError(f"{source}: {prefix}{key} takes a number (it was {old}), got {shown!r}")


def merge_layer(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    _replace_swapped_components(base, layer)
    _check_kinds_stay(base, layer, source)
    _open_params(base)
    try:
        merged = OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        if "not in struct" in str(err) or type(err).__name__ == "ConfigKeyError":
            parent = str(key).rsplit(".", 1)[0] if key and "." in str(key) else ""
            valid = OmegaConf.select(base, parent) if parent else base
            hint = f" (valid keys{' at ' + repr(parent) if parent else ''}: {', '.join(map(str, valid.keys()))})" if isinstance(valid, DictConfig) else ""
            raise ConfigError(f"{source}: unknown key '{key}'{hint}") from None
        raise ConfigError(f"{source}: {_first_line(err)}") from None
    OmegaConf.set_struct(merged, True)
    _open_params(merged)
    return merged


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not of the form key=value")
    for override in overrides:  # one at a time, so that an error names its override
        try:
            OmegaConf.from_dotlist([override])
        except Exception as err:  # OmegaConf's errors, and yaml's for a value that is not YAML
            problem = ": ".join(filter(None, (getattr(err, "context", None), getattr(err, "problem", None))))
            hint = " (YAML wants a space after each colon: key={a: 1, b: [2, 3]})" if "':'" in problem else ""
            raise ConfigError(f"override '{override}': {problem or _first_line(err)}{hint}") from None
    return OmegaConf.from_dotlist(list(overrides))


def load_config(files: Iterable[str] = (), overrides: Sequence[str] = (), base: Mapping | None = None,
                base_source: str = "saved config") -> DictConfig:
    """The resolved config: default <- ``base`` (a config saved whole, such as a checkpoint's; named
    ``base_source`` in errors) <- each file in order <- ``key=value`` overrides."""
    cfg = _read_yaml(packaged_config_path("default"))
    OmegaConf.set_struct(cfg, True)
    _open_params(cfg)
    if base is not None:
        plain = OmegaConf.to_container(base, resolve=True) if OmegaConf.is_config(base) else base
        cfg = merge_layer(cfg, OmegaConf.create(plain), base_source)
    for arg in files:
        path = resolve_config_path(arg)
        cfg = merge_layer(cfg, _read_yaml(path), str(arg))
    if overrides:
        cfg = merge_layer(cfg, parse_overrides(overrides), "command line")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve interpolation: {_first_line(err)}") from None
    _check_framework_values(cfg)
    return cfg


def _check_framework_values(cfg: DictConfig) -> None:
    for key in FLAGS:
        if not isinstance(OmegaConf.select(cfg, key), bool):
            raise ConfigError(f"{key} is true or false, got {OmegaConf.select(cfg, key)!r}")
    for key, (low, high, nullable) in COUNTS.items():
        check_whole_number(key, OmegaConf.select(cfg, key), low, high, nullable)
    for key, (bound, holds) in BOUNDS.items():
        value = OmegaConf.select(cfg, key)
        if _is_number(value) and not holds(value):
            raise ConfigError(f"{key} must be {bound}, got {value}")


def check_whole_number(key: str, value, low: int, high: int | None = None, nullable: bool = False) -> None:
    """``value`` is a whole number in ``low..high`` (a float such as 4.0, a string of digits), or
    null where ``nullable``; else a ConfigError naming ``key``."""
    if value is None and nullable:
        return
    whole = _is_number(value) and float(value).is_integer() or isinstance(value, str) and value.strip().isdigit()
    if not whole or int(float(value)) < low or high is not None and int(float(value)) > high:
        span = (f"{low}..{high}" if high is not None else f">= {low}") + (" or null" if nullable else "")
        raise ConfigError(f"{key} takes a whole number {span}, got {value!r}")


def split_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """CLI positional arguments -> (config files, key=value overrides)."""
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return files, overrides


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path
