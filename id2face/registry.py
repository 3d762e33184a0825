"""One registry per plug-in role; components are chosen by short registered names.

A config node ``{name: gated, params: {...}}`` picks the class registered as ``gated`` in the
``harmonizer`` registry and calls it with ``params`` plus runtime facts (``build(node, in_dim=...)``).
Each registry lists the modules that define its entries and imports them on first use, so
``id2face --help`` never pays for torch.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Iterable, Mapping

from .errors import UserError, one_line


class RegistryError(UserError, KeyError):
    """An unknown, duplicate or mis-parametrised component name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ComponentValueError(UserError, ValueError):
    """A component's constructor refused a value of its config node (``num_inference_steps: 0``)."""


class Registry:
    def __init__(self, role: str, modules: Iterable[str] = ()):
        self.role = role
        self._modules = tuple(modules)
        self._entries: dict[str, type | Callable] = {}
        self._loaded = False

    def register(self, name: str) -> Callable:
        def decorator(obj):
            if name in self._entries and self._entries[name] is not obj:
                raise RegistryError(
                    f"{self.role} '{name}' is already registered by {_qualname(self._entries[name])}"
                )
            self._entries[name] = obj
            return obj

        return decorator

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._modules:
                importlib.import_module(module)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str):
        self._load()
        if name not in self._entries:
            raise RegistryError(
                f"unknown {self.role} '{name}'; valid names: {', '.join(self.names()) or '(none)'}"
            )
        return self._entries[name]

    def declares(self, name: str, param: str) -> bool:
        """Whether variant ``name``'s constructor names ``param`` (not merely takes ``**kwargs``)."""
        accepted = _accepted_kwargs(self.get(name))
        return accepted is not None and param in accepted

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def check(self, node: Mapping[str, Any] | str, runtime: Iterable[str] = ()):
        """What ``build`` refuses before it constructs anything: an unknown variant, or a param its
        constructor does not take (``runtime``: the names of the facts ``build`` passes). Returns
        the registered class."""
        name, params = variant_name(node), _params(node)
        cls = self.get(name)
        accepted = _accepted_kwargs(cls)
        unknown = sorted(set(params) - accepted) if accepted is not None else []
        if unknown:
            raise RegistryError(
                f"{self.role} '{name}' has no parameter {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(sorted(accepted - set(runtime))) or '(none)'}"
            )
        # A switch given a word would be on whatever the word (compile: 'no' is truthy).
        defaults = _defaults(cls)
        not_switched = {n: v for n, v in to_plain(params).items()
                        if isinstance(defaults.get(n), bool) and not isinstance(v, bool)}
        if not_switched:
            raise RegistryError(f"{self.role} '{name}': {', '.join(not_switched)} is true or false, got "
                                f"{', '.join(map(repr, not_switched.values()))}")
        return cls

    def build(self, node: Mapping[str, Any] | str, **runtime: Any):
        """Instantiate ``node`` = ``{name, params}`` (or a bare name) with runtime keyword facts.

        Runtime facts are passed only if the constructor accepts them, so a variant that has no
        use for ``in_dim`` need not declare it.
        """
        cls = self.check(node, runtime)
        name, params = variant_name(node), _params(node)
        accepted = _accepted_kwargs(cls)
        extra = {k: v for k, v in runtime.items() if accepted is None or k in accepted}
        missing = sorted(_required_kwargs(cls) - set(params) - set(extra))
        if missing:
            raise RegistryError(f"{self.role} '{name}' needs parameter{'s' * (len(missing) > 1)} "
                                f"{', '.join(map(repr, missing))} in its params")
        try:
            return cls(**to_plain(params), **extra)
        except ValueError as err:  # constructors check their values: the arguments are the config
            raise ComponentValueError(f"{self.role} '{name}': {one_line(err)}") from None
        except TypeError as err:  # int(None) and the like: the config's fault only if a value is of another kind
            suspects = _off_kind_params(cls, params)
            if not suspects:
                raise
            raise ComponentValueError(f"{self.role} '{name}': {one_line(err)} (check {'; '.join(suspects)})") from None

    def __repr__(self) -> str:
        return f"Registry({self.role!r}, {self.names()})"


def variant_name(node: Mapping[str, Any] | str) -> str:
    """The registered name a config node ``{name, params}`` (or a bare name) asks for."""
    return node if isinstance(node, str) else node["name"]


def _params(node: Mapping[str, Any] | str) -> dict:
    return {} if isinstance(node, str) else dict(node.get("params") or {})


def _accepted_kwargs(cls) -> set[str] | None:
    """Names a constructor accepts, or None if it takes **kwargs (accepts anything)."""
    target = cls.__init__ if inspect.isclass(cls) else cls
    signature = inspect.signature(target)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return {n for n, p in signature.parameters.items() if n != "self" and p.kind is not p.VAR_POSITIONAL}


def _required_kwargs(cls) -> set[str]:
    """Names a constructor needs: keyword-passable and without a default."""
    target = cls.__init__ if inspect.isclass(cls) else cls
    return {n for n, p in inspect.signature(target).parameters.items()
            if n != "self" and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _defaults(cls) -> dict[str, Any]:
    target = cls.__init__ if inspect.isclass(cls) else cls
    return {n: p.default for n, p in inspect.signature(target).parameters.items() if p.default is not p.empty}


def _off_kind_params(cls, params: Mapping[str, Any]) -> list[str]:
    """The params set to null where their default is not, or to another kind of value than their
    default (a word for a number, a list for a word), each as ``name=value, default D``."""
    def kind(value):
        if isinstance(value, bool) or value is None:
            return type(value).__name__
        return next((k for k, types in (("number", (int, float)), ("word", str), ("list", (list, tuple)),
                                        ("mapping", dict)) if isinstance(value, types)), type(value).__name__)

    defaults = _defaults(cls)
    return [f"{n}={v!r}, default {defaults[n]!r}" for n, v in to_plain(params).items()
            if n in defaults and defaults[n] is not None and kind(v) != kind(defaults[n])]


def to_plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python, so components never see DictConfig/ListConfig."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def recognizer_nodes(eval_section: Mapping[str, Any]) -> list:
    """``eval.recognizers`` as a list of plain nodes; a single name (``eval.recognizers=dlib``) is a
    list of one, not a string to iterate."""
    nodes = to_plain(eval_section.get("recognizers")) or []
    return nodes if isinstance(nodes, list) else [nodes]


def _qualname(obj) -> str:
    return f"{obj.__module__}.{getattr(obj, '__qualname__', obj)}"


_C = "id2face.components."
IDENTITY_ENCODERS = Registry("identity_encoder", [_C + "identity"])
ID_VAES = Registry("id_vae", [_C + "id_vae"])
ATTRIBUTE_ENCODERS = Registry("attribute_encoder", [_C + "attributes"])
ALIGNMENTS = Registry("alignment", [_C + "alignment"])
HARMONIZERS = Registry("harmonizer", [_C + "harmonizer"])
ID_MAPPINGS = Registry("id_mapping", [_C + "id_mapping"])
GUIDANCES = Registry("guidance", [_C + "guidance"])
BACKBONES = Registry("backbone", [_C + "backbone"])
FIRST_STAGES = Registry("first_stage", [_C + "backbone"])
SCHEDULERS = Registry("scheduler", [_C + "backbone"])
SAMPLERS = Registry("sampler", [_C + "backbone"])
DATASETS = Registry("dataset", ["id2face.data.synthfaces", "id2face.data.datasets"])
RECOGNIZERS = Registry("recognizer", ["id2face.metrics.recognizers"])

# Roles under `model:` in the config, in build order, with their registry.
MODEL_ROLES: dict[str, Registry] = {
    "identity_encoder": IDENTITY_ENCODERS,
    "id_vae": ID_VAES,
    "attribute_encoder": ATTRIBUTE_ENCODERS,
    "alignment": ALIGNMENTS,
    "harmonizer": HARMONIZERS,
    "id_mapping": ID_MAPPINGS,
    "guidance": GUIDANCES,
    "first_stage": FIRST_STAGES,
    "backbone": BACKBONES,
    "scheduler": SCHEDULERS,
    "sampler": SAMPLERS,
}


def check_components(cfg: Mapping[str, Any]) -> None:
    """Every component node of a resolved config (``model.<role>``, ``data.dataset``,
    ``eval.recognizers``) names a registered variant and only params its constructor takes: what a
    build refuses first, found without building anything (``id2face sweep`` checks each task so,
    before it waits in a queue)."""
    for role, registry in MODEL_ROLES.items():
        registry.check(cfg["model"][role])
    DATASETS.check(cfg["data"]["dataset"])
    for node in recognizer_nodes(cfg["eval"]):
        RECOGNIZERS.check(node)
