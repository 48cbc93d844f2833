"""A CPU run says nothing from libtpu: where libtpu is installed (the `[tpu]` extra) and the machine has no TPU,
jaxpatience.sharding tells JAX to start its CPU backend only, unless the user chose the platforms.

Each check runs a fresh process without JAX_PLATFORMS (conftest.py sets it for the test process itself).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpatience import sharding

ROOT = Path(__file__).resolve().parent.parent
LIBTPU_MARKS = ("libtpu", "TPU worker hostnames", "TPU accelerator type", "Source Location Trace", "InitGoogle")
CUDA_MARKS = ("cuda", "CUDA", "plugin", "Traceback")  # the CUDA plugin's failed start: a logged traceback

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the [tpu] extra) is not installed"),
    pytest.mark.skipif(
        sharding._tpu_may_be_present() or sharding._other_backend_possible(),
        reason="a TPU, a GPU or a PJRT plugin is here: JAX's own choice of platforms is kept",
    ),
]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")} | env
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=environment, cwd=ROOT, timeout=300
    )


def _libtpu_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(mark in line for mark in LIBTPU_MARKS)]


def test_a_cpu_command_and_a_library_call_print_nothing_from_libtpu(tmp_path):
    made = _run(["-m", "jaxpatience", "tiny", "--out", str(tmp_path / "tiny")])
    assert made.returncode == 0, made.stderr
    assert _libtpu_lines(made.stderr) == [], made.stderr
    probe = f"from jaxpatience import load_pretrained\nload_pretrained({str(tmp_path / 'tiny')!r})\n"
    probe += "import jax\nprint(jax.default_backend())"
    loaded = _run(["-c", probe])
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.splitlines()[-1] == "cpu"
    assert _libtpu_lines(loaded.stderr) == [], loaded.stderr


@pytest.mark.skipif(not sharding._cuda_plugin_installed(), reason="JAX's CUDA plugin (the [cuda] extra) is absent")
def test_a_cpu_run_prints_nothing_from_the_cuda_plugin(tmp_path):
    """The CUDA plugin the GPU-compile tests need, on a machine without a GPU: silent, unset or JAX_PLATFORMS=cpu."""
    for name, env in (("unset", {}), ("cpu", {"JAX_PLATFORMS": "cpu"})):
        made = _run(["-m", "jaxpatience", "tiny", "--out", str(tmp_path / name)], **env)
        assert made.returncode == 0, made.stderr
        assert [line for line in made.stderr.splitlines() if any(m in line for m in CUDA_MARKS)] == [], made.stderr


def test_a_platform_choice_of_the_user_is_kept():
    """JAX_PLATFORMS, even empty (JAX's own discovery), wins; nothing starts a backend here."""
    probe = "import jax, jaxpatience.sharding\nprint(repr(jax.config.jax_platforms))"
    assert _run(["-c", probe]).stdout.split() == ["'cpu'"]
    assert _run(["-c", probe], JAX_PLATFORMS="").stdout.split() == ["''"]
    assert _run(["-c", probe], JAX_PLATFORMS="cpu,tpu").stdout.split() == ["'cpu,tpu'"]
