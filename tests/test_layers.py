"""The layout keeps its shape: imports point down, no module imports itself back round, no file is huge.

Every import is read from the source (ast), wherever it is: at the top, under
`TYPE_CHECKING`, inside a function. Layers, top to bottom:

    router.cli -> router.http, router.oncall -> router.engine -> router.jetstream
      -> actors, contracts, snapshots, router.workload

A module may import its own layer and the ones below. `router` itself (the package),
`router.errors`, `router.health`, `router.logs`, `router.metrics`, `router.pidlock` and `router.secrets` may
be imported from anywhere in `router` and import nothing above the bottom layer; the
bottom layer imports nothing of `router` but `router.workload` (which may use those).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("router", "actors", "contracts", "snapshots")
MAX_LINES = 600

# Rank of each layer: a module may import modules of its own rank or a higher one.
_LAYERS: tuple[tuple[str, int], ...] = (
    ("router.cli", 0),
    ("router.http", 1),
    ("router.oncall", 1),
    ("router.engine", 2),
    ("router.jetstream", 3),
    ("router.workload", 4),
    ("actors", 4),
    ("contracts", 4),
    ("snapshots", 4),
)
# Usable from anywhere in router: the package itself, errors, logging, metrics, the health model,
# pid locks, secrets.
_SHARED = (
    "router", "router.errors", "router.health", "router.logs", "router.metrics", "router.pidlock", "router.secrets"
)
_SHARED_RANK = 5
# Same rank, but neither may import the other.
_SIBLINGS = {("router.http", "router.oncall"), ("router.oncall", "router.http")}


def _files() -> Iterator[tuple[str, Path]]:
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


MODULES: dict[str, Path] = dict(_files())


def _resolve(name: str) -> str | None:
    """The module of ours that importing `name` runs last: itself, or its nearest parent we have."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path) -> set[str]:
    """Our modules that `module` imports, anywhere in its source."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                if not is_pkg:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import name`: the submodule `pkg.name` when there is one, else `pkg`.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH: dict[str, set[str]] = {m: imports_of(m, p) for m, p in MODULES.items()}


def layer_of(module: str) -> tuple[str, int]:
    if module in _SHARED:
        return module, _SHARED_RANK
    for prefix, rank in _LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    raise AssertionError(f"{module} is in no layer: add it to tests/test_layers.py")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        layer, rank = layer_of(module)
        for target in sorted(targets):
            t_layer, t_rank = layer_of(target)
            if t_layer == layer:
                continue
            if t_rank == _SHARED_RANK:
                ok = module.startswith("router") or module == "router"
            elif rank == _SHARED_RANK or rank == 4:
                ok = t_rank == 4 and not t_layer.startswith("router.")
            else:
                ok = t_rank >= rank and (layer, t_layer) not in _SIBLINGS
            if not ok:
                bad.append(f"{module} imports {target} ({layer} may not use {t_layer})")
    return bad


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own() -> None:
    assert upward_imports(GRAPH) == []


def test_no_import_circle() -> None:
    assert circles(GRAPH) == []


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_file_over_the_line_limit(pkg: str) -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in (ROOT / pkg).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


# The checks themselves, on made-up graphs: each must be able to fail.


def test_the_checks_catch_a_circle_and_an_upward_import() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    graph = {
        "router.jetstream.streams": {"router.engine.partition"},  # up
        "router.engine.partition": {"router.jetstream.streams", "router.errors"},  # down, shared: fine
        "contracts.config": {"router.logs"},  # the bottom layer uses router
        "router.http.api": {"router.oncall.sink"},  # siblings
        "router.errors": {"router.engine.daemon"},  # shared reaching up
    }
    assert upward_imports(graph) == [
        "contracts.config imports router.logs (contracts may not use router.logs)",
        "router.errors imports router.engine.daemon (router.errors may not use router.engine)",
        "router.http.api imports router.oncall.sink (router.http may not use router.oncall)",
        "router.jetstream.streams imports router.engine.partition (router.jetstream may not use router.engine)",
    ]


def test_imports_are_found_wherever_they_are(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from router.engine.daemon import Runtime\n"
        "def f():\n    import router.cli.main\n    from router.jetstream import streams\n"
        "from . import keyfilter\n"
    )
    assert imports_of("router.engine.x", src) == {
        "router.engine.daemon",
        "router.cli.main",
        "router.jetstream.streams",
        "router.engine.keyfilter",
    }
