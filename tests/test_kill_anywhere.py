"""kill -9 anywhere: every long-running command, SIGKILLed again and again, ends as if it had never been stopped.

Each test runs a command once uninterrupted (the reference), then in a fresh folder as a *chain*: the command is
killed with SIGKILL, rerun, killed at the next point, ..., and the last rerun completes. The kill points are
seeded: a mix of kills after a random delay (a fraction of the reference's wall time) and fault-hook kills at
named points of the durable writes (jaxpatience/durability/faults.py: `jsonl.append` leaves a torn line, `jsonl.rewrite`
a .tmp sibling, `checkpoint.finalize` an orbax tmp directory). The chain's files must then equal the
reference's: every JSONL record once (nothing lost, nothing duplicated), training losses bitwise equal, the
same adapter and weight bytes, the same summaries minus timing fields.

Cost (the CI budget): a command is run by a fork server (`Launcher`), a process that has imported JAX,
transformers and jaxpatience once and forks a child per run; the child calls `jaxpatience.cli.main(argv)`, as
the `jaxpatience` script does, and is what gets killed. A persistent compilation cache shared by the runs keeps
a rerun from recompiling. Every chain lands at least 5 kills.
The irpo chain plans 5 kills but requires 3 to land: a random base finds no pairs, so the loop stops after its
sampling, and the later kills may find it finished (the IRPO training stage is run.train, the train chain's code).
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEED = 18
KILLED = -signal.SIGKILL

# The fork server: imports once, then per request forks a child that runs one command and reports its status.
ZYGOTE = r"""
import json, os, sys
import jax, jax.numpy, orbax.checkpoint, flax.nnx, optax, transformers, tokenizers, matplotlib
import jaxpatience.cli, jaxpatience.training, jaxpatience.evaluation, jaxpatience.recipes, jaxpatience.teacher
import jaxpatience.generation, jaxpatience.model, jaxpatience.data
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child: one command, as the `jaxpatience` script runs it
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1), os.dup2(log, 2)
        for key, value in request["jax"].items():
            jax.config.update(key, value)
        try:
            status = jaxpatience.cli.main(request["argv"])
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            status = 99
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(status)
    print(json.dumps({"pid": pid}), flush=True)
    print(json.dumps({"status": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), flush=True)
"""


class Launcher:
    """Runs `jaxpatience ARGV` in a child of the fork server; kills it on a fault point or after a delay."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {
            "PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(root)), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "TOKENIZERS_PARALLELISM": "false",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONPATH": str(REPO),
        }  # fmt: skip
        self.jax = {"jax_compilation_cache_dir": str(root / "jax_cache"),  # shared: a rerun does not recompile
                    "jax_persistent_cache_min_compile_time_secs": 0,
                    "jax_persistent_cache_min_entry_size_bytes": 0}  # fmt: skip
        self.process = subprocess.Popen([sys.executable, "-u", "-c", ZYGOTE], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=self.env, cwd=REPO)  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.lines.get(timeout=120) == "ready"

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def run(self, argv: list[str], log: Path, *, fault: str | None = None, kill_after: float | None = None,
            env: dict | None = None, timeout: float = 300) -> int:  # fmt: skip
        """The exit status of one run (KILLED if it was killed); its output is appended to `log`."""
        child_env = self.env | (env or {}) | ({"JAXPATIENCE_FAULT": fault} if fault else {})
        with open(log, "a") as out:
            out.write(f"\n=== jaxpatience {' '.join(argv)}  (fault={fault}, kill_after={kill_after})\n")
        request = {"argv": argv, "env": child_env, "cwd": str(self.root), "log": str(log), "jax": self.jax}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = json.loads(self.lines.get(timeout=30))["pid"]
        try:
            line = self.lines.get(timeout=timeout if kill_after is None else kill_after)
        except queue.Empty:
            os.kill(pid, signal.SIGKILL)  # our own child, by its id
            line = self.lines.get(timeout=30)
        return json.loads(line)["status"]

    def timed(self, argv: list[str], log: Path) -> float:
        """Wall seconds of one uninterrupted run (which must succeed)."""
        start = time.perf_counter()
        assert self.run(argv, log) == 0, log.read_text()[-3000:]
        return time.perf_counter() - start

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    launcher = Launcher(tmp_path_factory.mktemp("kill"))
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def tiny(launcher) -> Path:
    """A tiny random Qwen2 checkpoint (`jaxpatience tiny`), shared by the module."""
    out = launcher.root / "tiny"
    assert launcher.run(["tiny", "--out", str(out)], launcher.root / "tiny.log") == 0
    return out


def kill_plan(rng: random.Random, faults: list[str], delays: int, shuffle: bool = True,
              delays_first: bool = True) -> list[tuple[str, object]]:  # fmt: skip
    """`delays` kills after a seeded fraction of the reference's time and the fault-hook kills (small counts: each
    lands while work remains), in seeded order or in the order given (`shuffle=False`: a pipeline's faults in the
    order of its stages). The delay kills come first, while most of the work is left, so that they land however
    loaded the machine is; `delays_first=False` puts them last, for a command whose cached rerun is so much faster
    than its reference (which compiles) that even an early fraction of the reference's time comes too late."""
    timed = [("delay", rng.uniform(0.05, 0.2)) for _ in range(delays)]
    named = [("fault", fault) for fault in (rng.sample(faults, len(faults)) if shuffle else faults)]
    return timed + named if delays_first else named + timed


def kill_chain(launcher: Launcher, argv: list[str], log: Path, plan: list, reference_s: float,
               env: dict | None = None) -> list[int]:  # fmt: skip
    """Run `argv` killed at each point of `plan` in turn, then to completion; the statuses of the killed runs."""
    statuses = []
    for kind, value in plan:
        if kind == "delay":
            statuses.append(launcher.run(argv, log, kill_after=value * reference_s, env=env))
        else:
            statuses.append(launcher.run(argv, log, fault=f"{value}:kill", env=env))
        assert statuses[-1] in (0, KILLED), log.read_text()[-3000:]  # a rerun that fails is a finding
    assert launcher.run(argv, log, env=env) == 0, log.read_text()[-3000:]
    return statuses


# ---------------------------------------------------------------------------------------------------
# Comparing a chain's folder with the reference's.

VOLATILE = re.compile(r"(^|_)(s|ms|seconds|time|timing|wall|elapsed|latency|timestamp|created|per_s|tok_s)$")
# What a resumed run legitimately reports differently: where it resumed, what it compiled, an evaluation batch's
# id and warm-up flag. (padding_share counts from step 0 across resumes, and a run killed after its last step
# reads its final metrics back: both are compared.)
IGNORED = {"resumed_from", "compilations", "batch_shapes", "plots", "plot", "stage_s", "batch", "warmup"}


def _stable(value, roots: tuple[str, str]):
    """`value` without timing fields, with the run's own folder written as <OUT>."""
    if isinstance(value, dict):
        return {k: _stable(v, roots) for k, v in value.items() if not VOLATILE.search(k) and k not in IGNORED}
    if isinstance(value, list):
        return [_stable(v, roots) for v in value]
    if isinstance(value, str):
        return value.replace(roots[0], "<OUT>").replace(roots[1], "<OUT>")
    return value


def _records(path: Path, roots) -> list[str]:
    lines = path.read_text().splitlines()
    return [json.dumps(_stable(json.loads(line), roots), sort_keys=True) for line in lines]


def assert_same_outputs(reference: Path, chain: Path, skip: tuple[str, ...] = ()) -> None:
    """Every JSONL record once, the same weights to the byte, the same JSON files minus timing fields."""
    roots = (str(reference), str(chain))
    files = [p for p in sorted(reference.rglob("*")) if p.is_file() and "checkpoints" not in p.parts]
    checked = 0
    for ref in files:
        rel = ref.relative_to(reference)
        if any(part in str(rel) for part in skip) or ref.suffix not in (".jsonl", ".json", ".safetensors"):
            continue
        got = chain / rel
        assert got.is_file(), f"{rel} is missing after the kills"
        if ref.suffix == ".jsonl":  # as multisets: a lost or a repeated record fails; so does a torn line
            assert sorted(_records(got, roots)) == sorted(_records(ref, roots)), rel
            ids = [(r.get("id"), r.get("sample"), r.get("step")) for r in map(json.loads, got.read_text().splitlines())]
            assert len(ids) == len(set(ids)) or all(i == (None, None, None) for i in ids), f"duplicates in {rel}"
        elif ref.suffix == ".json":
            assert _stable(json.loads(got.read_text()), roots) == _stable(json.loads(ref.read_text()), roots), rel
        else:
            assert got.read_bytes() == ref.read_bytes(), f"{rel} differs"
        checked += 1
    assert checked, "nothing compared"
    leftovers = [p for p in chain.rglob("*") if p.name.endswith(".tmp") or "orbax-checkpoint-tmp" in p.name]
    assert not leftovers, f"left behind: {leftovers}"


def landed(statuses: list[int], at_least: int) -> None:
    assert sum(s == KILLED for s in statuses) >= at_least, f"too few kills landed: {statuses}"


# ---------------------------------------------------------------------------------------------------
# The commands.


def _pairs_file(path: Path, count: int) -> Path:
    rows = [{"prompt": f"What is {i} + {i + 1}?", "chosen": f"{i} + {i + 1} = {2 * i + 1}. The answer is {2 * i + 1}.",
             "rejected": f"The answer is {i}."} for i in range(count)]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _problems_file(path: Path, count: int, offset: int = 0) -> Path:
    rng = random.Random(offset)
    rows = []
    for i in range(count):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        gold = f"So it is {a + b}.\n#### {a + b}"
        rows.append({"id": f"p{offset + i}", "question": f"What is {a} + {b}?", "answer": gold})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_train_killed_anywhere_ends_bitwise_equal(launcher, tiny):
    root = launcher.root / "train"
    root.mkdir()
    pairs = _pairs_file(root / "pairs.jsonl", 16)
    args = ["train", "--no-progress", f"model={tiny}", f"data.path={pairs}", "data.max_length=64", "data.buckets=[64]",
            "train.batch_size=4", "train.max_steps=6", "train.lora.rank=4", "checkpoint_every=1", "log_every=1",
            "keep_checkpoints=2"]  # fmt: skip
    reference_s = launcher.timed([*args, f"out_dir={root / 'ref'}"], root / "ref.log")
    # orbax commits each save three times (the state item, the meta item, the step): finalize:3 is the step's
    faults = ["checkpoint.finalize:1", "checkpoint.finalize:3", "jsonl.append:2", "jsonl.rewrite:1"]
    plan = kill_plan(random.Random(SEED), faults, delays=2)
    statuses = kill_chain(launcher, [*args, f"out_dir={root / 'chain'}"], root / "chain.log", plan, reference_s)
    landed(statuses, 5)
    assert_same_outputs(root / "ref", root / "chain")
    steps = [json.loads(line)["step"] for line in (root / "chain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # each step once, in order, losses compared bitwise above


def test_eval_killed_anywhere_answers_every_problem_once(launcher, tiny):
    root = launcher.root / "eval"
    root.mkdir()
    problems = _problems_file(root / "problems.jsonl", 12)
    args = ["eval", "--no-progress", "--model", str(tiny), "--dataset", str(problems), "--batch-size", "2",
            "--max-new-tokens", "12", "--samples", "2", "--temperature", "1.0",
            "--prompt-style", "question"]  # fmt: skip
    reference_s = launcher.timed([*args, "--out", str(root / "ref")], root / "ref.log")
    faults = ["jsonl.append:1", "jsonl.append:2", "jsonl.append:3", "jsonl.rewrite:1"]
    plan = kill_plan(random.Random(SEED + 1), faults, delays=2)
    statuses = kill_chain(launcher, [*args, "--out", str(root / "chain")], root / "chain.log", plan, reference_s)
    landed(statuses, 5)
    assert_same_outputs(root / "ref", root / "chain")


def test_pairs_killed_anywhere_keeps_one_record_per_problem(launcher):
    from test_teacher import KEY, MODEL, FakeTeacher, make_problems, write_problems

    root = launcher.root / "pairs"
    root.mkdir()
    problems = make_problems(12)
    server = FakeTeacher(problems, delay=0.05, deadline=240)
    try:
        args = ["pairs", "--no-progress", "--problems", str(write_problems(root / "p.jsonl", problems)),
                "--base-url", server.url, "--model", MODEL, "--concurrency", "2", "--backoff", "0.01"]  # fmt: skip
        env = {"OPENAI_API_KEY": KEY}
        start = time.perf_counter()
        assert launcher.run([*args, "--out", str(root / "ref.jsonl")], root / "ref.log", env=env) == 0
        reference_s = time.perf_counter() - start
        faults = ["jsonl.append:1", "jsonl.append:3", "jsonl.append:5", "jsonl.append:2"]
        plan = kill_plan(random.Random(SEED + 2), faults, delays=2)
        out = root / "chain.jsonl"
        statuses = kill_chain(launcher, [*args, "--out", str(out)], root / "chain.log", plan, reference_s, env)
    finally:
        server.stop()
    landed(statuses, 5)
    roots = (str(root), str(root))
    key = re.compile(r"usage|cost|tokens")  # what the server counts per request differs when a request is redone
    strip = [json.dumps({k: v for k, v in json.loads(r).items() if not key.search(k)}, sort_keys=True)
             for r in _records(out, roots)]  # fmt: skip
    expected = [json.dumps({k: v for k, v in json.loads(r).items() if not key.search(k)}, sort_keys=True)
                for r in _records(root / "ref.jsonl", roots)]  # fmt: skip
    assert sorted(strip) == sorted(expected)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(p.id for p in problems)


@pytest.fixture(scope="module")
def formatted(launcher, tiny) -> Path:
    """The tiny model after a short full-parameter SFT on 'What is a + b?' -> 'a + b = c. The answer is c.': its
    sampled answers are sometimes right and sometimes wrong, the mix IRPO pairs on (a random model finds none)."""
    root = launcher.root / "formatted"
    root.mkdir()
    rng = random.Random(SEED)
    rows = []
    for _ in range(64):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        answer = f"{a} + {b} = {a + b}. The answer is {a + b}."
        rows.append({"prompt": f"What is {a} + {b}?", "chosen": answer, "rejected": answer})
    (root / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["train", "--no-progress", f"model={tiny}", f"data.path={root / 'sft.jsonl'}", f"out_dir={root / 'sft'}",
            "data.max_length=128", "data.buckets=[128]", "train.lora=null", "train.loss.dpo_weight=0",
            "train.loss.nll_weight=1", "train.batch_size=16", "train.max_steps=100", "checkpoint_every=1000",
            "train.optimizer.learning_rate=3e-3", "train.optimizer.warmup_steps=5"]  # fmt: skip
    assert launcher.run(args, root / "sft.log") == 0, (root / "sft.log").read_text()[-3000:]
    return root / "sft" / "merged"


def test_irpo_killed_anywhere_ends_as_the_uninterrupted_loop(launcher, formatted):
    root = launcher.root / "irpo"
    root.mkdir()
    args = ["irpo", "--no-progress", f"model={formatted}", f"train_problems={_problems_file(root / 'train.jsonl', 16)}",
            f"eval_problems={_problems_file(root / 'eval.jsonl', 4, 100)}", "prompt_style=question", "iterations=1",
            "sampling.num_samples=6", "sampling.temperature=1.0", "sampling.max_new_tokens=16",
            "generation_batch_size=2", "max_pairs_per_problem=2", "training.data.max_length=128",
            "training.data.buckets=[128]", "training.train.batch_size=2", "training.train.lora.rank=4",
            "training.epochs=1", "training.checkpoint_every=1"]  # fmt: skip
    reference_s = launcher.timed([*args, f"out_dir={root / 'ref'}"], root / "ref.log")
    pairs = (root / "ref" / "iter_1" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) >= 4, "the formatted base found too few pairs for IRPO to train on"
    # In the order of the stages: the evaluations' and sampling's appends, the pairs file's atomic write or the
    # metrics file's rewrite, a training checkpoint, then the training's metrics or the last evaluation.
    faults = ["jsonl.append:2", "jsonl.append:3", "jsonl.rewrite:1", "checkpoint.finalize:1", "jsonl.append:1"]
    plan = kill_plan(random.Random(SEED + 3), faults, delays=1, shuffle=False)
    statuses = kill_chain(launcher, [*args, f"out_dir={root / 'chain'}"], root / "chain.log", plan, reference_s)
    landed(statuses, 5)
    assert_same_outputs(root / "ref", root / "chain")


def test_small_demo_killed_anywhere_ends_as_the_uninterrupted_demo(launcher):
    root = launcher.root / "demo"
    root.mkdir()
    args = ["demo", "--small", "--no-progress", "eval_problems=8", "sft_patient_steps=6", "sft_mixed_steps=6",
            "patience_pairs=16", "irpo_problems=8", "irpo.iterations=1", "irpo.sampling.max_new_tokens=24",
            "sft.checkpoint_every=4"]  # fmt: skip
    reference_s = launcher.timed([*args, "--out", str(root / "ref")], root / "ref.log")
    # The small demo is mostly compilation: from the cache a rerun takes ~10 s against the reference's ~60 s, so
    # its named kills come first, in the order of its stages, each at its next occurrence: the base SFT's checkpoint,
    # the base evaluations' appends, the Patience run's metrics rewrite and appends. The two delay kills follow and
    # may find the demo finished: seven planned, five must land.
    faults = ["checkpoint.finalize:3", "jsonl.append:2", "jsonl.rewrite:1", "jsonl.append:1", "jsonl.append:1"]
    plan = kill_plan(random.Random(SEED + 4), faults, delays=2, shuffle=False, delays_first=False)
    statuses = kill_chain(launcher, [*args, "--out", str(root / "chain")], root / "chain.log", plan, reference_s)
    landed(statuses, 5)
    # the reference log-probs' cache is named by a hash that includes the model's path: compare the arrays
    assert_same_outputs(root / "ref", root / "chain", skip=(".reference_cache", "timings.json"))
    cached = [next((root / run / "data" / ".reference_cache").glob("*.npy")).read_bytes() for run in ("ref", "chain")]
    assert cached[0] == cached[1]
