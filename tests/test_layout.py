"""The module layout: flat top-level modules, one job each, no import cycles, the core kept apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
MODULES = {path.stem: path for path in ROOT.glob("*.py")}
LONG_MODULE = 500  # lines; a longer module says why in its docstring ("Longer ..." / "longer than")


def imports_of(path: Path) -> set[str]:
    """The project's own modules a module imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & MODULES.keys()


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def test_no_import_cycles() -> None:
    """The import graph of the top-level modules is acyclic."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, f"import cycle: {' -> '.join([*path, name])}"
        if name in done:
            return
        for imported in sorted(GRAPH[name]):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])


@pytest.mark.parametrize("core", ["cache", "upstream"])
def test_cache_and_upstream_stay_apart(core: str) -> None:
    """cache.py and upstream.py import neither each other nor the engine, the servers or the entry point."""
    forbidden = {"cache", "upstream", "resolver", "server", "proxy"} - {core}
    assert not GRAPH[core] & forbidden


def test_proxy_is_a_small_composition_root() -> None:
    """proxy.py, the composition root, stays under 400 lines."""
    assert len(MODULES["proxy"].read_text().splitlines()) < 400


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_has_one_job_said_in_its_docstring(name: str) -> None:
    """Every module opens with a docstring; one over 500 lines says why it is long."""
    text = MODULES[name].read_text()
    docstring = ast.get_docstring(ast.parse(text))
    assert docstring, f"{name}.py has no module docstring"
    if len(text.splitlines()) > LONG_MODULE:
        assert "longer" in docstring.lower(), f"{name}.py is over {LONG_MODULE} lines and does not say why"
