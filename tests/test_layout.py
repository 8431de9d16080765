"""The package's layout: no module imports one that imports it back, and each module says what it holds."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featx"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The featx modules ``path`` imports, at its top or inside functions (a late import is still an import)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "featx":
            for alias in node.names:  # `from featx import store` imports featx.store; `from featx import x` featx
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(files)) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the path from a module back to itself (depth-first search)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert {"featx.extract", "featx.engines", "featx.store", "featx.shards"} <= set(graph)
    assert cycles(graph) == []


def test_pipeline_roles_depend_only_downward():
    """storage -> sources -> decode -> embed -> store/shards -> engines -> runner: no role imports one above it."""
    order = ["featx.storage", "featx.devices", "featx.mirror", "featx.sources", "featx.decode", "featx.backbones",
             "featx.runtimes", "featx.embed", "featx.store", "featx.options", "featx.shards", "featx.engines",
             "featx.extract"]
    graph = import_graph()

    def role(module: str) -> int | None:  # a role's package holds its submodules (featx.backbones.timm_models)
        return next((rank for rank, name in enumerate(order) if module == name or module.startswith(name + ".")), None)

    assert "featx.backbones.hf_models" in graph and role("featx.backbones.hf_models") == 5
    for module, targets in graph.items():
        if role(module) is not None:
            above = {t for t in targets if role(t) is not None and role(t) > role(module)}
            assert not above, (module, above)


def test_only_storage_knows_object_storage():
    """fsspec and its filesystems (s3fs, aiohttp) are imported by ``featx.storage`` alone: every other module asks it,
    so a new scheme (gcs, azure) needs no change elsewhere."""
    clients = {"fsspec", "s3fs", "aiohttp", "botocore", "boto3", "gcsfs", "adlfs"}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            used = {name.split(".")[0] for name in names} & clients
            assert not used or module_name(path) == "featx.storage", (module_name(path), used)


def test_every_module_says_what_it_holds():
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__main__.py":
            assert ast.get_docstring(ast.parse(path.read_text())), f"{path} has no docstring"


def test_devices_are_the_ground_floor_and_no_head_imports_the_mapper():
    """Device and precision rules sit below everything (torch only); the heads use them, never the mapper
    (``featx.embed``) or its runtimes, which would lift every head above them (the zeroshot head reads CLIP's text
    tower from the registry, as a head must)."""
    graph = import_graph()
    assert graph["featx.devices"] == set()
    heads = {module: targets for module, targets in graph.items() if module.startswith("featx.heads")}
    assert "featx.heads.linear" in heads and "featx.devices" in heads["featx.heads.linear"]
    for module, targets in heads.items():
        assert not targets & {"featx.embed", "featx.runtimes"}, (module, targets)
