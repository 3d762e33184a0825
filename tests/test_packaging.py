"""What the package imports, its setup.cfg installs: a clean `pip install id2face` runs every command.

CI installs the `dev` extra, whose scikit-image brought scipy along; `anonymize` imported scipy
without declaring it, so a plain install failed at its first face."""
import ast
import configparser
import importlib.metadata
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Modules whose distribution importlib.metadata cannot name (a wheel that installs a bare .so).
DISTRIBUTION_OF = {"dlib": "dlib-bin"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += [line for _, value in cfg["options.extras_require"].items() for line in value.splitlines()]
    names = (re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0] for line in lines)
    return {_normalise(name) for name in names if name and not name.startswith("%")}


def _imported_modules() -> dict[str, str]:
    """Top-level third-party module -> the first file that imports it."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "id2face").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "id2face":
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_is_a_declared_requirement():
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    imported = _imported_modules()
    assert {"torch", "diffusers", "lightning", "PIL"} <= set(imported)  # the scan sees the package
    undeclared = {}
    for module, where in imported.items():
        names = [DISTRIBUTION_OF[module]] if module in DISTRIBUTION_OF else distributions.get(module, [module])
        if not any(_normalise(name) in declared for name in names):
            undeclared[module] = f"{'/'.join(names)} (imported in {where})"
    assert not undeclared, f"declare in setup.cfg: {undeclared}"
