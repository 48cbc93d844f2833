"""The layout the style guide asks for: no file over 600 lines, no function over 60, and a CLI whose --help lists
every command (without importing JAX, so it answers at once).

Function length counts from the `def` line to the last line, docstring included (decorators excluded). Every
offender is listed in the failure message, so one run shows the whole list.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED_DIRS = ("jaxpatience", "scripts", "tests")
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 60
COMMANDS = ("demo", "train", "irpo", "eval", "pairs", "serve", "info", "tiny")


def python_files() -> list[Path]:
    files = sorted(path for folder in CHECKED_DIRS for path in (ROOT / folder).rglob("*.py"))
    assert files, f"no .py files under {CHECKED_DIRS} of {ROOT}"
    return files


def long_functions(path: Path) -> list[str]:
    """'file:line name (N lines)' for each function or method of `path` longer than MAX_FUNCTION_LINES."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_file_over_600_lines():
    offenders = []
    for path in python_files():
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            offenders.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not offenders, f"files over {MAX_FILE_LINES} lines: " + "; ".join(offenders)


def test_no_function_over_60_lines():
    offenders = [entry for path in python_files() for entry in long_functions(path)]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(offenders)


def test_python_m_jaxpatience_help_lists_every_command():
    env = dict(os.environ, COLUMNS="80")  # the width of a plain terminal: each command must still fit one line
    done = subprocess.run([sys.executable, "-m", "jaxpatience", "--help"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for command in COMMANDS:
        rows = [line.split() for line in lines if line.split()[:1] == [command]]
        assert len(rows) == 1 and len(rows[0]) > 1, f"`{command}` is not listed with a one-line help:\n{done.stdout}"


def test_help_does_not_import_jax():
    """--help must answer at once: the command modules (and JAX) are imported only when their command runs."""
    probe = "import sys; from jaxpatience.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
    probe += "print(sorted(m for m in ('jax', 'flax', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
