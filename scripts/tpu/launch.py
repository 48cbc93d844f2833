"""Run a jaxpatience command on every worker of a Cloud TPU VM slice (v5p-64: 8 workers x 4 chips), through gcloud.

    python scripts/tpu/launch.py setup --tpu my-v5p --zone us-east5-a
    python scripts/tpu/launch.py run --tpu my-v5p --zone us-east5-a -- \
        train --config configs/qwen2_7b_irpo_tpu_pod.yaml model=/mnt/shared/Qwen2-7B-Instruct \
        data.path=/mnt/shared/pairs.jsonl out_dir=/mnt/shared/runs/irpo7b
    python scripts/tpu/launch.py logs --tpu my-v5p --zone us-east5-a      # follow worker 0's log
    python scripts/tpu/launch.py stop --tpu my-v5p --zone us-east5-a      # SIGTERM (train saves its step), then KILL

* `setup` copies this checkout's HEAD (`git archive`: commit what you want to run) to every worker and installs it
  with the `[tpu]` extra (jax[tpu], which brings libtpu) into a virtual environment there.
* `run` starts the same command on every worker at once, detached (it survives the ssh session), with
  JAX_DISTRIBUTED_AUTO=1: jax.distributed finds the slice's workers itself. Each worker logs to
  LOG_DIR/<its hostname>.log. Running the same `run` again after a preemption resumes the job.
* `stop` sends SIGTERM: `train` finishes its step, every worker saves it, and the same `run` resumes from there.
  What has not ended after `--grace` seconds is killed (a multi-host eval, or irpo's sampling, ignore SIGTERM:
  jax.distributed catches it; they resume exactly anyway).

Only the command lines are built here (`build_commands`, tested without gcloud); `--dry-run` prints them.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout `setup` copies
COMMANDS = ("train", "eval", "irpo")  # what `run` starts: every one of them runs on many hosts
ACTIONS = ("setup", "run", "logs", "stop")
ARCHIVE = "jaxpatience.tar.gz"  # in the home directory, locally (a temporary copy) and on every worker


def gcloud(verb: str, args: argparse.Namespace, *rest: str, worker: str = "all") -> list[str]:
    """`gcloud compute tpus tpu-vm VERB ... --worker=W --zone=Z [--project=P]` with `rest` before the flags."""
    command = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--worker={worker}", f"--zone={args.zone}"]
    return command + ([f"--project={args.project}"] if args.project else [])


def setup_script(args: argparse.Namespace) -> str:
    """What every worker runs to unpack the checkout (replacing an older one; its venv and logs stay) and install
    it with the [tpu] extra."""
    folder, logs = shlex.quote(args.remote_dir), shlex.quote(args.log_dir)
    return " && ".join([
        f"mkdir -p {folder}",
        f"find {folder} -mindepth 1 -maxdepth 1 ! -name .venv ! -name {logs} -exec rm -rf {{}} +",
        f"tar -xzf ~/{ARCHIVE} -C {folder}",
        f"cd {folder}",
        f"{shlex.quote(args.python)} -m venv .venv",
        ".venv/bin/pip install --quiet --upgrade pip",
        ".venv/bin/pip install --quiet -e '.[tpu]'",
        ".venv/bin/python -c 'import jax; print(jax.devices())'",  # checks libtpu sees this worker's chips
    ])  # fmt: skip


def run_script(args: argparse.Namespace) -> str:
    """What every worker runs: the jaxpatience command, detached, logging to LOG_DIR/<hostname>.log. The command
    is started by its absolute path, which is what `stop` looks for."""
    command = 'env JAX_DISTRIBUTED_AUTO=1 "$PWD"/.venv/bin/jaxpatience ' + shlex.join(args.command)
    folder, logs = shlex.quote(args.remote_dir), shlex.quote(args.log_dir)
    log = f'{logs}/"$(hostname)".log'
    prepare = f"cd {folder} && mkdir -p {logs}"
    if args.foreground:  # every worker's output on this terminal (gcloud prefixes each line with its worker)
        return f"set -o pipefail && {prepare} && {command} 2>&1 | tee -a {log}"
    return f'{prepare} && (setsid nohup {command} >> {log} 2>&1 < /dev/null &) && echo started on "$(hostname)"'


def build_commands(args: argparse.Namespace) -> list[list[str]]:
    """The command lines of one action, in order (the first of `setup` runs here: it packs the checkout)."""
    if args.action == "setup":
        return [
            ["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={args.archive}", "HEAD"],
            gcloud("scp", args, args.archive, f"{args.tpu}:~/{ARCHIVE}"),
            gcloud("ssh", args, args.tpu, f"--command={setup_script(args)}"),
        ]
    if args.action == "run":
        return [gcloud("ssh", args, args.tpu, f"--command={run_script(args)}")]
    if args.action == "logs":
        follow = f'cd {shlex.quote(args.remote_dir)} && tail -n 100 -F {shlex.quote(args.log_dir)}/"$(hostname)".log'
        return [gcloud("ssh", args, args.tpu, f"--command={follow}", worker=args.worker)]
    return [gcloud("ssh", args, args.tpu, f"--command={stop_script(args)}")]


def stop_script(args: argparse.Namespace) -> str:
    """What every worker runs to stop: SIGTERM to this checkout's jaxpatience, SIGKILL after `--grace` seconds."""
    pattern = '"$PWD"/[.]venv/bin/jaxpatience'  # a regex: [.] keeps it from matching this script's own command line
    return (f"cd {shlex.quote(args.remote_dir)} && host=$(hostname) && "
            f'if ! pkill -TERM -f {pattern}; then echo "nothing running on $host"; exit 0; fi; '
            f"for second in $(seq {args.grace}); do "
            f'pgrep -f {pattern} > /dev/null || {{ echo "stopped on $host"; exit 0; }}; sleep 1; done; '
            f'pkill -KILL -f {pattern}; echo "killed on $host after {args.grace} s"')  # fmt: skip


def _non_negative_int(text: str) -> int:
    """--grace's type: seconds, 0 or more (this script runs where jaxpatience may not be installed, so it keeps
    its own copy of config_io.non_negative_int)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("--tpu", required=True, help="the TPU VM (slice) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", help="default: gcloud's configured project")
    parser.add_argument("--remote-dir", default="jaxpatience", help="the checkout on every worker (relative to ~)")
    parser.add_argument("--log-dir", default="logs", help="per-worker logs, relative to --remote-dir")
    parser.add_argument("--python", default="python3", help="the workers' Python (3.11 or newer) for the venv")
    parser.add_argument("--archive", default=f"/tmp/{ARCHIVE}", help="where setup packs the checkout locally")
    parser.add_argument("--worker", default="0", help="the worker whose log `logs` follows")
    parser.add_argument("--foreground", action="store_true", help="run: stay attached, all workers' output here")
    parser.add_argument("--grace", type=_non_negative_int, default=120, help="stop: seconds from SIGTERM to SIGKILL")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)  # after `--`: the jaxpatience command line, verbatim
    args = parser.parse_args(argv[:split])
    args.command = argv[split + 1 :]
    if args.action == "run" and (not args.command or args.command[0] not in COMMANDS):
        parser.error(f"run needs a jaxpatience command after --: {', '.join(COMMANDS)}, with its arguments")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for command in build_commands(args):
        print("+", shlex.join(command), flush=True)
        if not args.dry_run:
            status = subprocess.call(command)
            if status != 0:
                return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
