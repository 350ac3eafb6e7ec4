"""The layers read from the folder names (docs/architecture.md), and the imports keep to them:
no module imports one of a higher layer, no two modules import each other (directly or round a
longer circle), and nothing outside tests/ imports tests/. Read from the source with `ast`, so
an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "prompt_store", "trainer", "jobs", "server")
# lowest first; a module belongs to the first layer one of whose prefixes names it (or a parent of it)
LAYERS = [
    ("core",),
    ("prompt_store",),
    ("trainer",),
    ("jobs",),
    ("server.settings", "server.engine"),
    ("server.services",),
    ("server.http",),
    ("server",),  # the composition root: server.app, server.cli, server.__main__
]


def layer_of(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, module
    return best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module of ours `path` imports (for `from a import b`: a.b when that is a module, else a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    ROOT / candidate.replace(".", "/") / "__init__.py"
                ).exists()
                found.add(candidate if is_module else node.module)
    return {name for name in found if name.split(".")[0] in PACKAGES + ("tests",)}


def sources(*tops: str) -> list[Path]:
    return sorted(path for top in tops for path in (ROOT / top).rglob("*.py"))


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in sources(*PACKAGES)}


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph().items()
        for target in targets
        if target.split(".")[0] in PACKAGES and layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_the_import_graph_has_no_circle():
    edges = {module: {t for t in targets if t != module} for module, targets in graph().items()}
    # a package's __init__ re-exporting its modules is not a circle through them
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    state, circles = {}, []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                circles.append(trail[trail.index(target) :] + [target] if target in trail else [module, target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_nothing_outside_tests_imports_tests():
    offenders = [
        str(path.relative_to(ROOT))
        for path in sources(*PACKAGES, "bench", "examples", "devtools")
        if any(name.split(".")[0] == "tests" for name in imports_of(path))
    ]
    assert offenders == []
