"""The pod launchers on one machine: scripts/slurm/jaxpatience.sbatch under a fake SLURM (fake_slurm.py; the
multi-process eval through it is in test_multihost.py), scripts/tpu/launch.py without gcloud, and training runs
stopped by SIGTERM (a preemption, a requeue) that save their step and resume."""

from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fake_slurm import CLI, ROOT, SBATCH, cpu_env, fake_slurm_env, finished, saved_steps, sbatch
from test_run import config_args, losses_of, write_pairs


@pytest.fixture
def fake_slurm(tmp_path):
    return fake_slurm_env(tmp_path)


def test_sbatch_template_is_valid_bash_and_checks_its_command(tmp_path):
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0
    outside = subprocess.run(["bash", str(SBATCH), "train"], capture_output=True, text=True, env=cpu_env(1))
    assert outside.returncode != 0 and "submit this script with sbatch" in outside.stderr
    wrong = subprocess.run(["bash", str(SBATCH), "serve"], capture_output=True, text=True,
                           env=dict(cpu_env(1), SLURM_JOB_ID="1"))  # fmt: skip
    assert wrong.returncode == 2 and "train|eval|irpo" in wrong.stderr


@pytest.fixture(scope="module")
def pairs_and_model(tmp_path_factory):
    from conftest import make_hf_checkpoint

    tmp = tmp_path_factory.mktemp("pods")
    return write_pairs(tmp / "pairs.jsonl"), make_hf_checkpoint(tmp / "ckpt")


def _train_args(pairs_and_model, out: Path, steps: int, devices: int = 4) -> list[str]:
    pairs, checkpoint = pairs_and_model
    return ["train", "--no-progress",
            *config_args(checkpoint, pairs, out, f"train.mesh.data={devices}", f"train.max_steps={steps}",
                         "log_every=1", "checkpoint_every=1000", "precompute_reference=true",
                         "data.buckets=[160]")]  # fmt: skip


def test_sbatch_gives_each_task_every_gpu_of_its_node(fake_slurm, tmp_path):
    """JAX's SLURM detection gives each process GPU number SLURM_LOCALID only; with one task per node the
    template lists all of the node's GPUs instead, and leaves JAX's default alone for one task per GPU."""
    dump = tmp_path / "dump_srun"
    dump.write_text('#!/bin/bash\necho "ids=${JAX_LOCAL_DEVICE_IDS:-unset} auto=$JAX_DISTRIBUTED_AUTO"\n')
    dump.chmod(0o755)
    (Path(fake_slurm["FAKE_SLURM_DIR"]) / "srun").unlink()
    (Path(fake_slurm["FAKE_SLURM_DIR"]) / "srun").symlink_to(dump)
    for per_node, expected in (("1", "ids=0,1,2,3,4,5,6,7 auto=1"), ("8", "ids=unset auto=1")):
        env = dict(fake_slurm, SLURM_GPUS_ON_NODE="8", SLURM_NTASKS_PER_NODE=per_node)
        output = finished(sbatch(env, "eval", "--help"), tmp_path / "logs")
        assert expected in output, output


def test_sbatch_trains_like_one_process_through_a_requeue(pairs_and_model, fake_slurm, tmp_path):
    """2 tasks x 2 devices under the template take the steps 1 process x 4 devices takes, through a requeue: told
    that its time limit is near (USR1), the job sends SIGTERM to its tasks, they save the step they reached (exit
    143), the job requeues itself, and the requeued job (the same script) resumes there. The reference log-probs
    are precomputed: each process computes its rows, the table needs them back in global order.

    The run is long (1000 steps) so that it cannot end before the signal lands (jax.distributed notices a
    SIGTERM within about a second); the requeued run and the reference stop with `--stop-after` a few steps
    past the interruption, with the same `max_steps` (the schedule depends on it)."""
    out, logs, steps = tmp_path / "two", Path(fake_slurm["JAXPATIENCE_LOGS"]), 1000
    job = sbatch(fake_slurm, *_train_args(pairs_and_model, out, steps))
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert job.poll() is None and time.time() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` sends near the time limit
    first = finished(job, logs, status=143)
    assert "restart 0" in first and "the time limit is near" in first
    slurm = Path(fake_slurm["FAKE_SLURM_DIR"])
    assert (slurm / "scancel.log").read_text().split() == ["--signal=TERM", fake_slurm["SLURM_JOB_ID"]]
    assert (slurm / "scontrol.log").read_text().split() == ["requeue", fake_slurm["SLURM_JOB_ID"]]
    saved, stopped = saved_steps(out), len(losses_of(out))
    assert saved == [stopped] and 2 <= stopped < steps, (saved, stopped)
    assert {p.name for p in logs.glob("rank-*.log")} == {"rank-0.log", "rank-1.log"}
    assert all(f"stopped by SIGTERM after step {stopped} of {steps}" in (logs / f"rank-{i}.log").read_text()
               for i in range(2))  # fmt: skip

    stop_after = ["--stop-after", str(stopped + 3)]
    again = finished(sbatch(dict(fake_slurm, SLURM_RESTART_COUNT="1"),
                            *_train_args(pairs_and_model, out, steps), *stop_after), logs)  # fmt: skip
    assert "restart 1" in again and "job step ended with status 0" in again
    assert f"resuming from step {stopped} of {steps}" in (logs / "rank-0.log").read_text()
    one = subprocess.run([*CLI, *_train_args(pairs_and_model, tmp_path / "one", steps), *stop_after], env=cpu_env(4),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert len(losses_of(out)) == stopped + 3
    np.testing.assert_allclose(losses_of(out), losses_of(tmp_path / "one"), rtol=1e-5)


def test_sbatch_requeues_what_ignores_sigterm_after_a_delay(fake_slurm, tmp_path):
    """A job step that does not end on SIGTERM (a multi-host eval: jax.distributed catches it) is requeued anyway,
    JAXPATIENCE_REQUEUE_AFTER seconds after the USR1; a step that ends by itself with 0 is not requeued again."""
    slurm = Path(fake_slurm["FAKE_SLURM_DIR"])
    stub = slurm / "srun"  # a job step that ignores SIGTERM and ends on its own
    stub.write_text(f'#!/bin/bash\ntrap "" TERM\necho $$ > {slurm}/tasks.pid\ntouch {slurm}/ready\nsleep 4\n')
    job = sbatch(dict(fake_slurm, JAXPATIENCE_REQUEUE_AFTER="1"), "eval", "--model", "m")
    deadline = time.time() + 30
    while not (slurm / "ready").is_file():
        assert job.poll() is None and time.time() < deadline, job.communicate()[0]
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    output = finished(job, tmp_path / "logs")
    assert (slurm / "scontrol.log").read_text().split() == ["requeue", fake_slurm["SLURM_JOB_ID"]], output
    assert "job step ended with status 0" in output


def test_a_sigterm_before_training_is_seen_by_the_next_loop(tmp_path):
    """Under jax.distributed (one process here), JAX catches SIGTERM; the coordination service's notice is what
    tells a loop that starts later (a resumed run still loading, irpo's next stage) to stop at once."""
    from fake_slurm import free_port

    code = """
import os, signal, time
from jaxpatience import sharding
from jaxpatience.training import preemption
assert not sharding.initialize_distributed()  # one process, but with jax.distributed running
assert not preemption._notice_received()
first = preemption.Watch(5)
assert not first.pending and not first.reached(6)
os.kill(os.getpid(), signal.SIGTERM)  # caught by JAX: the process lives on
deadline = time.time() + 30
while not preemption._notice_received():
    assert time.time() < deadline, "the notice never reached the coordination service"
    time.sleep(0.1)
assert preemption.Watch(9).pending
print("pending seen")
"""
    env = dict(cpu_env(1), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES="1",
               JAX_PROCESS_ID="0")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "pending seen" in done.stdout, done.stderr[-3000:]


def test_sigterm_ends_a_single_process_run_with_a_checkpoint(pairs_and_model, tmp_path, monkeypatch):
    """One process (its own SIGTERM handler, not jax.distributed's): SIGTERM during step 2 ends the run after
    that step with a checkpoint of it; after the loop SIGTERM is handled as before."""
    from jaxpatience.durability.metrics import MetricsWriter
    from jaxpatience.training.loop import load_run_config, train
    from jaxpatience.training.preemption import Preempted

    out, before, write = tmp_path / "run", signal.getsignal(signal.SIGTERM), MetricsWriter.write

    def write_then_terminate(self, step, metrics):
        write(self, step, metrics)
        if step == 2:
            assert signal.getsignal(signal.SIGTERM) is not before, "no handler: SIGTERM would end the test run"
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsWriter, "write", write_then_terminate)
    config = load_run_config(None, _train_args(pairs_and_model, out, 20, devices=1)[2:])
    with pytest.raises(Preempted) as stop:
        train(config, progress=False)
    assert stop.value.step == 2 and len(losses_of(out)) == 2 and saved_steps(out) == [2]
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------------
# scripts/tpu/launch.py: the gcloud command lines, and the scripts they send, run here by bash.


def _launcher():
    spec = importlib.util.spec_from_file_location("tpu_launch", ROOT / "scripts" / "tpu" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _remote(command: list[str]) -> str:
    (remote,) = [arg.removeprefix("--command=") for arg in command if arg.startswith("--command=")]
    return remote


def test_tpu_launcher_builds_gcloud_commands():
    launch = _launcher()
    base = ["--tpu", "v5p-64-a", "--zone", "us-east5-a", "--project", "proj"]
    for action in ("setup", "run", "logs", "stop"):
        tail = ["--", "train", "--config", "c.yaml"] if action == "run" else []
        commands = launch.build_commands(launch.parse_args([action, *base, *tail]))
        ssh = commands[-1]
        assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5p-64-a"]
        assert {"--zone=us-east5-a", "--project=proj"} <= set(ssh)
        assert ("--worker=0" if action == "logs" else "--worker=all") in ssh
    setup = launch.build_commands(launch.parse_args(["setup", *base]))
    assert setup[0][:3] == ["git", "-C", str(ROOT)] and "archive" in setup[0]
    assert setup[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in setup[1]
    with pytest.raises(SystemExit):
        launch.parse_args(["run", *base])  # no command
    with pytest.raises(SystemExit):
        launch.parse_args(["run", *base, "--", "tiny", "--out", "x"])  # not a multi-host command


def _fake_worker(tmp_path: Path) -> tuple[Path, dict]:
    """A home directory standing in for a TPU worker's, with a `python3` whose venv records what it runs."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    recorder = '#!/bin/bash\nprintf "%s\\n" "$(basename "$0")" "auto=$JAX_DISTRIBUTED_AUTO" "$@" -- >> ~/calls.txt\n'
    python3 = ("#!/bin/bash\n"
               'if [[ "$1 $2" == "-m venv" ]]; then mkdir -p "$3/bin"; for tool in pip python jaxpatience; do\n'
               f'printf %s {shlex.quote(recorder)} > "$3/bin/$tool"; chmod +x "$3/bin/$tool"; done; fi\n')  # fmt: skip
    (bin_dir / "python3").write_text(python3)
    (bin_dir / "python3").chmod(0o755)
    return home, dict(os.environ, HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _calls(home: Path) -> list[list[str]]:
    lines = (home / "calls.txt").read_text().split("\n")[:-1]
    calls, current = [], []
    for line in lines:
        if line == "--":
            calls.append(current)
            current = []
        else:
            current.append(line)
    return calls


def test_tpu_launcher_scripts_run_on_a_worker(tmp_path):
    """The setup and run scripts, executed by bash in a stand-in worker home: the checkout is unpacked and
    installed with the [tpu] extra, and the jaxpatience arguments arrive unchanged, spaces and quotes included."""
    launch = _launcher()
    home, env = _fake_worker(tmp_path)
    archive = subprocess.run(["tar", "-czf", str(home / launch.ARCHIVE), "-C", str(ROOT), "pyproject.toml"],
                             capture_output=True)  # fmt: skip
    assert archive.returncode == 0
    base = ["--tpu", "t", "--zone", "z"]
    setup = _remote(launch.build_commands(launch.parse_args(["setup", *base]))[-1])
    done = subprocess.run(["bash", "-c", setup], cwd=home, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (home / "jaxpatience" / "pyproject.toml").is_file()
    assert ["pip", "auto=", "install", "--quiet", "-e", ".[tpu]"] in _calls(home)

    command = ["train", "--config", "a b.yaml", "out_dir=/mnt/it's here", "train.mesh.fsdp=32"]
    for foreground in (True, False):
        (home / "calls.txt").unlink()
        flags = ["--foreground"] if foreground else []
        run = _remote(launch.build_commands(launch.parse_args(["run", *base, *flags, "--", *command]))[0])
        done = subprocess.run(["bash", "-c", run], cwd=home, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        deadline, calls = time.time() + 10, home / "calls.txt"  # detached: it runs after the ssh command returned
        while not (calls.is_file() and calls.read_text().endswith("--\n")) and time.time() < deadline:
            time.sleep(0.05)
        assert _calls(home) == [["jaxpatience", "auto=1", *command]]  # JAX_DISTRIBUTED_AUTO=1: find the peers
    assert len(list((home / "jaxpatience" / "logs").glob("*.log"))) == 1


def test_tpu_launcher_stop_terminates_then_kills(tmp_path):
    """`stop` sends SIGTERM to this checkout's jaxpatience only; what ignores it is killed after --grace."""
    launch = _launcher()
    home, env = _fake_worker(tmp_path)
    bin_dir = home / "jaxpatience" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    stubborn = bin_dir / "jaxpatience"  # ignores SIGTERM, as a multi-host eval does (jax.distributed catches it)
    stubborn.write_text("#!/bin/bash\ntrap '' TERM\ntouch ready\nwhile true; do sleep 0.1; done\n")
    stubborn.chmod(0o755)
    stop = _remote(launch.build_commands(launch.parse_args(["stop", "--tpu", "t", "--zone", "z", "--grace", "1"]))[0])
    done = subprocess.run(["bash", "-c", stop], cwd=home, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "nothing running" in done.stdout, done.stdout + done.stderr
    worker = subprocess.Popen([str(stubborn)], cwd=home / "jaxpatience")
    deadline = time.time() + 10
    while not (home / "jaxpatience" / "ready").is_file() and time.time() < deadline:  # SIGTERM is ignored from now
        time.sleep(0.05)
    done = subprocess.run(["bash", "-c", stop], cwd=home, env=env, capture_output=True, text=True, timeout=30)
    assert "killed on" in done.stdout, done.stdout + done.stderr
    assert worker.wait(timeout=10) == -signal.SIGKILL
