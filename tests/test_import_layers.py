"""The three packages form layers, bagel_kernels < bagel_model < parallel, and ``bagel_model`` is itself a stack of
rooms, runtime < core < engine < serving < {pipeline, oracle} < cli: no module imports from a higher layer or room,
the import graph among their modules has no circle, and no production module imports the per-branch oracle. Read
from the source with ``ast`` (every import, including those inside functions), so nothing is imported or run."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("bagel_kernels", "bagel_model", "parallel")
# Upward imports another change is still to remove: (importing module, imported module). None are left.
PENDING: set[tuple[str, str]] = set()


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Modules of the three packages that ``name`` imports (``from .x import y`` resolved; a package import counts as
    its ``__init__``; ``from pkg import mod`` as ``pkg.mod`` when that is a module)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]  # relative imports resolve from here
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_the_module_list_is_read():
    g = _graph()
    assert "bagel_kernels.attention" in g and "bagel_model.core.model" in g and "parallel.sweep" in g
    assert "bagel_model.core.model" in g["bagel_model.engine.step"]  # ... and imports across rooms
    assert "bagel_kernels.attention_triton" in g["bagel_kernels.attention"]  # the reader sees relative imports


def test_no_module_imports_from_a_higher_layer():
    rank = {pkg: i for i, pkg in enumerate(LAYERS)}
    upward = sorted((a, b) for a, deps in _graph().items() for b in deps
                    if rank[b.split(".")[0]] > rank[a.split(".")[0]] and (a, b) not in PENDING)
    assert not upward, f"lower layer imports a higher one: {upward}"


# bagel_model's rooms, lowest first: a module may import its own room and the rooms below it only.
ROOMS = ("runtime", "core", "engine", "serving", "pipeline|oracle", "cli")
# Production modules: everything but the oracle itself and the sweep (whose single-per-branch row runs it).
ORACLE_USERS = {"bagel_model.oracle", "parallel.sweep"}


def _room(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "bagel_model" or len(parts) < 2:
        return None
    return next(i for i, names in enumerate(ROOMS) if parts[1] in names.split("|"))


def test_every_bagel_model_module_is_in_a_room():
    loose = [m for m in _graph() if m.startswith("bagel_model.") and _room(m) is None]
    assert not loose


def test_no_room_imports_a_higher_room():
    upward = sorted((a, b) for a, deps in _graph().items() for b in deps
                    if _room(a) is not None and _room(b) is not None and _room(b) > _room(a))
    assert not upward, f"a room imports a higher one: {upward}"


def test_no_production_module_imports_the_oracle():
    users = sorted(a for a, deps in _graph().items() if "bagel_model.oracle" in deps and a not in ORACLE_USERS)
    assert not users, f"production modules import the per-branch oracle: {users}"


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_circle():
    assert _cycle(_graph()) is None, f"import circle: {' -> '.join(_cycle(_graph()))}"


@pytest.mark.parametrize("graph,circle", [({"a": {"b"}, "b": {"a"}}, True), ({"a": {"b"}, "b": set()}, False)])
def test_the_circle_finder_finds_circles(graph, circle):
    assert (_cycle(graph) is not None) == circle
