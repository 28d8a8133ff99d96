"""The layout's promises, read from the source: each layer imports only the layers below it,
no module but the command line imports the loop, no import cycle, the loop module stays
under 500 lines, and the fast test tier does not import torch."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from helpers import ROOT, run_cli

PACKAGE = ROOT / "cast_mlx"
# what each layer may import (besides itself); `base` is cast_mlx/{__init__,config,errors}.py
ALLOWED = {
    "base": {"base", "engine"},  # __init__ loads the fast BLAS (engine.blas) before mlx
    "engine": {"base"},
    "algorithm": {"base", "engine"},
    "tasks": {"base", "engine"},
    "training": {"base", "engine", "algorithm", "tasks"},
    "cli": {"base", "engine", "algorithm", "tasks", "training", "cli"},
}
# the one import across the layers' order: recipes take each algorithm's defaults from its
# declared facts, a pure-Python table (no MLX), so that a recipe validates before MLX loads
DECLARATIONS = {"cast_mlx.algorithm", "cast_mlx.algorithm.facts"}
LOOP = "cast_mlx.training.trainer"
COMMANDS = {"train", "eval", "diagnose", "report", "plot", "models", "publish"}  # cast_mlx/X.py: `python -m cast_mlx.X`


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    if parts[1] in ALLOWED:
        return parts[1]
    return "cli" if parts[1] in COMMANDS else "base"


def is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def imports_of(path: Path) -> set[str]:
    """Every cast_mlx module `path` imports, at module level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cast_mlx")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cast_mlx"):
            found.add(node.module)  # and `from package import module`:
            found |= {f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}")}
    return found


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_the_layers(module):
    mine = layer(module)
    wrong = sorted(m for m in GRAPH[module] - DECLARATIONS if layer(m) not in ALLOWED[mine] | {mine})
    assert wrong == [], f"{module} ({mine}) imports {wrong}"
    if mine in ("algorithm", "tasks"):  # side by side: neither imports the other
        other = {"algorithm": "tasks", "tasks": "algorithm"}[mine]
        assert not [m for m in GRAPH[module] if layer(m) == other]


def test_the_declarations_import_nothing_of_the_package():
    assert GRAPH["cast_mlx.algorithm.facts"] == set()


def test_only_the_command_line_imports_the_loop():
    importers = sorted(m for m, deps in GRAPH.items() if LOOP in deps)
    assert importers and all(layer(m) == "cli" for m in importers), importers


def test_no_import_cycle():
    def package_closure(module: str) -> set[str]:  # importing a.b.c runs a/__init__ and a/b/__init__
        parts = module.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    graph = {m: {d for d in deps if d in GRAPH and d != m} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1 and d not in package_closure(m):
                raise AssertionError(" -> ".join(path + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_the_cycle_check_can_fail(monkeypatch):
    monkeypatch.setitem(GRAPH, "cast_mlx.training.summary", GRAPH["cast_mlx.training.summary"] | {LOOP})
    with pytest.raises(AssertionError, match="trainer"):
        test_no_import_cycle()


def test_the_loop_module_stays_short():
    lines = (PACKAGE / "training" / "trainer.py").read_text().count("\n")
    assert lines <= 500, f"cast_mlx/training/trainer.py has {lines} lines; move a concern to its stage's module"


def test_no_module_outside_the_layers():
    base = {"__init__.py", "config.py", "config_reference.py", "errors.py", "schema.py"}
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top - base - {f"{c}.py" for c in COMMANDS} == set()


IMPORTS = """
import json, sys
sys.path.insert(0, "tests")
import {module}
print(json.dumps(sorted(m for m in sys.modules if m in {watch})))
"""


def imported_after(module: str, watch: set[str]) -> list[str]:
    proc = run_cli("-c", IMPORTS.format(module=module, watch=sorted(watch)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_recipes_validate_before_anything_heavy_loads():
    assert imported_after("cast_mlx.config", {"mlx.core"}) == []


def test_fast_tier_modules_import_no_torch():
    fast = "conftest, test_advantages, test_loss, test_config, test_verify, test_dashboard"
    assert imported_after(fast, {"torch", "transformers"}) == []
