"""The import contract of the layers: each package imports only from its own layer and the ones
below it, never upward, not even lazily inside a function.

    patchcore (0)  the algorithm: no prefect, mlflow, dvc or great_expectations
    pipeline  (1)  steps, store, registry, validation: no prefect (mlflow and great_expectations are fine)
    tasks     (2)  thin Prefect tasks
    flows     (3)  Prefect flows
    deploy, apps (4)  the applications (deployments; the `patchcore` CLI): neither imports the other

Every import statement counts: top level, inside functions, under `if TYPE_CHECKING:`, relative
ones (resolved against the file's package) and importlib.import_module("...") / __import__("...")
with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"patchcore": 0, "pipeline": 1, "tasks": 2, "flows": 3, "deploy": 4, "apps": 4}
FORBIDDEN = {"patchcore": {"prefect", "mlflow", "dvc", "great_expectations"}, "pipeline": {"prefect"}}


def module_parts(relative: Path) -> tuple[list[str], bool]:
    """`pipeline/steps/bank.py` -> (["pipeline", "steps", "bank"], False); an __init__.py names its package."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        return parts[:-1], True
    return parts, False


def imported_modules(tree: ast.AST, parts: list[str], is_package: bool):
    """(line, absolute module name, the statement as written) for every import anywhere in `tree`."""
    package = parts if is_package else parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ast.unparse(node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level - 1 <= len(package) else []
                name = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                name = node.module or ""
            yield node.lineno, name, ast.unparse(node)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
        ):
            yield node.lineno, node.args[0].value, ast.unparse(node)


def violations(source: str, relative: Path) -> list[str]:
    """The broken rules of one file (`relative` to the repository root), as `file:line: ...` lines."""
    parts, is_package = module_parts(relative)
    layer = parts[0]
    rank = LAYERS[layer]
    found = []
    for line, name, statement in imported_modules(ast.parse(source, str(relative)), parts, is_package):
        top = name.split(".")[0]
        where = f"{relative.as_posix()}:{line}: `{statement}`"
        if top in FORBIDDEN.get(layer, ()):
            found.append(f"{where}: {layer} must not import {top}")
        elif top in LAYERS and top != layer and LAYERS[top] >= rank:
            kind = "upward" if LAYERS[top] > rank else "sideways (the applications do not import each other)"
            found.append(f"{where}: imports {top} (layer {LAYERS[top]}) from {layer} (layer {rank}): {kind}")
    return found


def source_files() -> list[Path]:
    return sorted(
        p.relative_to(REPO) for layer in LAYERS for p in (REPO / layer).rglob("*.py") if "__pycache__" not in p.parts
    )


def test_no_layer_imports_upward_or_a_forbidden_tool():
    files = source_files()
    assert {f.parts[0] for f in files} == set(LAYERS), (
        "a layer has no Python files: is the test looking in the right place?"
    )
    found = [v for f in files for v in violations((REPO / f).read_text(), f)]
    assert not found, "import contract broken:\n  " + "\n  ".join(found)


def test_the_checker_catches_upward_sideways_and_forbidden_imports():
    lazy_upward = "import json\n\n\ndef run():\n    from flows.train import train\n    return train\n"
    assert violations(lazy_upward, Path("pipeline/steps/bank.py")) == [
        "pipeline/steps/bank.py:5: `from flows.train import train`: "
        "imports flows (layer 3) from pipeline (layer 1): upward"
    ]
    assert violations("import prefect.artifacts\n", Path("pipeline/x.py"))[0].endswith(
        "pipeline must not import prefect"
    )
    assert violations("import mlflow\n", Path("pipeline/x.py")) == []
    assert violations("from mlflow import MlflowClient\n", Path("patchcore/x.py"))
    assert violations("import importlib\nimportlib.import_module('tasks.training')\n", Path("pipeline/x.py"))
    assert violations("from apps import cli\n", Path("deploy/serve.py"))  # sideways between the applications
    assert violations("from deploy.serve import main\n", Path("apps/cli.py"))
    # relative imports resolve inside their own package; importing downward is fine
    assert (
        violations(
            "from . import io\nfrom .store import Store\nfrom patchcore import PatchCore\n",
            Path("pipeline/steps/__init__.py"),
        )
        == []
    )
    assert violations("from ..flows import train\n", Path("apps/sub/x.py")) == []  # apps.flows, not flows
