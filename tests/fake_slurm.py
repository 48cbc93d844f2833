"""A fake SLURM on one machine, for running scripts/slurm/jaxpatience.sbatch unchanged under bash.

Three small stand-ins go first on PATH. `srun` starts SLURM_NTASKS copies of the command with the variables a
real job step has (SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NODELIST=localhost, ...) and one log per task from
`--output`; like the real one, it answers a SIGTERM of its own with a SIGKILL of the tasks. `scancel
--signal=SIG` sends SIG to the tasks only, as SLURM does without `--batch`/`--full`; `scontrol` records its
calls. Each task has 2 CPU devices, so two tasks form one 4-device program
(jax.distributed started from SLURM's variables, as on a cluster).
"""

from __future__ import annotations

import os
import random
import shlex
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "jaxpatience.sbatch"
CLI = [sys.executable, "-m", "jaxpatience.cli"]

FAKE_SRUN = """#!{python}
import os, signal, subprocess, sys, time
from pathlib import Path

argv, output = sys.argv[1:], None
while argv and argv[0].startswith("--"):  # the template passes its options as --name=value
    option = argv.pop(0)
    if option.startswith("--output="):
        output = option.split("=", 1)[1]
tasks, procs = int(os.environ["SLURM_NTASKS"]), []
for task in range(tasks):  # one task per node: SLURM_LOCALID is 0 on every node
    env = dict(os.environ, SLURM_PROCID=str(task), SLURM_LOCALID="0", SLURM_STEP_NODELIST="localhost",
               SLURM_STEP_NUM_NODES=str(tasks), SLURM_STEP_NUM_TASKS=str(tasks), SLURM_STEP_ID="0")
    name = output.replace("%t", str(task)).replace("%j", os.environ["SLURM_JOB_ID"])
    log = open(name.replace("%x", os.environ["SLURM_JOB_NAME"]), "a")
    procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
Path(os.environ["FAKE_SLURM_DIR"], "tasks.pid").write_text(" ".join(str(p.pid) for p in procs))
# srun's own SIGTERM (a plain scancel, a preemption) becomes a SIGKILL of the tasks: "forcing job termination".
signal.signal(signal.SIGTERM, lambda signum, frame: [p.kill() for p in procs if p.poll() is None])
while any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs):  # --kill-on-bad-exit
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.1)
sys.exit(max((p.returncode for p in procs), key=abs))
"""

# `scancel --signal=SIG JOB` signals the tasks of the job's steps, not the batch step (so not srun).
FAKE_SCANCEL = """#!/bin/bash
echo "$*" >> "$FAKE_SLURM_DIR/scancel.log"
if [[ "$1" == --signal=* ]]; then kill -s "${1#--signal=}" $(cat "$FAKE_SLURM_DIR/tasks.pid"); fi
"""

FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_SLURM_DIR/scontrol.log"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int) -> dict:
    """This environment on `devices` CPU devices, without the SLURM variables of a job the tests might run in."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    return dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


def fake_slurm_env(tmp_path: Path) -> dict:
    """Environment for running the template as the batch script of a 2-node job (one task per node); the
    stand-ins go to tmp_path/fake_slurm, the per-task logs to tmp_path/logs."""
    bin_dir = tmp_path / "fake_slurm"
    bin_dir.mkdir()
    fakes = {"srun": FAKE_SRUN.format(python=sys.executable), "scancel": FAKE_SCANCEL, "scontrol": FAKE_SCONTROL}
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(
        cpu_env(2), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_DIR=str(bin_dir),
        SLURM_JOB_ID=str(random.randrange(10_000, 99_999)), SLURM_JOB_NAME="jaxpatience", SLURM_NTASKS="2",
        SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NODELIST="localhost",
        JAX_COORDINATOR_PORT=str(free_port()), JAXPATIENCE=shlex.join(CLI), JAXPATIENCE_LOGS=str(tmp_path / "logs"),
    )  # fmt: skip


def sbatch(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SBATCH), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def saved_steps(out: Path) -> list[int]:
    from jaxpatience.training.checkpoint import Checkpointer

    checkpoints = Checkpointer(out / "checkpoints")
    try:
        return sorted(checkpoints.all_steps())
    finally:
        checkpoints.close()


def finished(job: subprocess.Popen, logs: Path, status: int = 0) -> str:
    output = job.communicate(timeout=300)[0]
    ranks = "".join(f"\n---- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(logs.glob("rank-*.log")))
    assert job.returncode == status, output[-2000:] + ranks
    return output
