"""The package's import graph: no circle, no backend started by an import, and modules that never import JAX.

An import circle is a pair of modules that each need the other while they are half-initialised: it fails on some
import orders and not others, so it is checked here on the source, not by trying orders. The graph has an edge
M -> T for every module-level import of T in M (imports inside functions are the lazy ones, kept where laziness
buys something: cli.py's dispatch), and M -> P for each package P above T that is not above M too, since
importing a.b.c runs a/b/__init__.py first (and the subpackages' __init__ files re-export their modules).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxpatience"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    assert "jaxpatience.cli" in found, f"no package under {PACKAGE}"
    return found


def top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports at module level (`if TYPE_CHECKING:` blocks excluded)."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` imports the module; else the names are pkg's
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {t for t in targets if t in known and t != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    graph = {}
    for name, path in found.items():
        edges = set()
        for target in top_level_imports(name, path, set(found)):
            edges.add(target)
            parts = target.split(".")
            for cut in range(1, len(parts)):  # the packages importing `target` initialises first
                package = ".".join(parts[:cut])
                if not (name == package or name.startswith(package + ".")):
                    edges.add(package)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_finds_a_circle():
    """The checker itself: a circle through a package's __init__ is found, a chain is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    graph = import_graph()
    assert "jaxpatience.model" in graph["jaxpatience.training.step"]  # importing model.qwen2 runs model/__init__


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_importing_every_module_starts_no_backend():
    """Importing is free: no JAX backend (CPU, GPU, TPU) is started by any module of the package, so a process
    can still choose its platform, or start jax.distributed, after `import jaxpatience...`."""
    names = sorted(modules())
    probe = "\n".join(
        [
            "import importlib, sys",
            f"for name in {names!r}: importlib.import_module(name)",
            "from jax._src import xla_bridge",
            "print(xla_bridge.backends_are_initialized())",
        ]
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False", "an import started a JAX backend"


def test_data_and_teacher_never_import_jax():
    """The loader and the teacher run where JAX is not wanted (a data-prep box, `jaxpatience pairs`)."""
    probe = "import sys, jaxpatience.data, jaxpatience.teacher, jaxpatience.durability\nprint('jax' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"
