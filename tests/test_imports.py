"""The package's modules import each other in one direction: no import cycle.

Walks every module of the installed package with `ast`: imports at module level and inside
functions count (a function-level import still makes the two modules depend on each other), those
under ``if TYPE_CHECKING:`` do not (they never run), and the package ``__init__``'s re-exports are
left out (``from volumetric import X`` is resolved to the module that defines X).
"""

from __future__ import annotations

import ast
from pathlib import Path

import volumetric

PACKAGE = Path(volumetric.__file__).parent
TRANSFORMS = Path(volumetric.transforms.__path__[0]) if hasattr(volumetric, "transforms") else None


def module_files() -> dict[str, Path]:
    """Module name → file, for every module of the package (volumetric.transforms lives in the
    repository's top-level transforms/ folder)."""
    import volumetric.transforms as transforms

    roots = {"volumetric": PACKAGE, "volumetric.transforms": Path(transforms.__path__[0])}
    files = {}
    for prefix, root in roots.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((prefix, *parts))] = path
    return files


def _under_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules ``name`` imports (any depth, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if _under_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a.b import c`: the module a.b.c when it is one, else a.b
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != "volumetric" and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def test_the_walk_sees_function_level_imports_and_skips_type_checking(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from volumetric.config import Config\n"
        "if TYPE_CHECKING:\n    from volumetric.inference import LoadedModel\n"
        "def f():\n    from volumetric.engine import train\n    import volumetric.cli\n"
    )
    modules = set(module_files())
    assert imports_of("volumetric.m", source, modules) == {
        "volumetric.config",
        "volumetric.engine.train",
        "volumetric.cli",
    }


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "volumetric.cli" in graph and "volumetric.transforms.preprocess" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_command_line_and_the_benchmark_load_without_the_image_readers():
    """The parsers and the benchmark (`volumetric-bench --gpu` on a bare GPU machine, which has
    PyTorch but not TorchIO or SimpleITK: scripts/gpu_bench.sh carries only MONAI and NiBabel)
    import neither reader; they load where a scan is read."""
    import subprocess
    import sys

    code = (
        "import sys, volumetric.cli, volumetric.bench.gpu, volumetric.bench.worker;"
        "print(sorted({'torchio', 'SimpleITK'} & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
