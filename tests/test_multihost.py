"""Several processes: `jaxpatience eval` and `jaxpatience irpo` under jax.distributed on loopback (gloo).

Two processes with two CPU devices each form one 4-device mesh; the slot engine splits its rows over it. They must
give what one process with four devices gives, and process 0 alone writes the output files. Each test starts
real subprocesses (the same command line a pod runs on every host), so each takes a few tens of seconds.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import make_hf_checkpoint
from fake_slurm import CLI, cpu_env, fake_slurm_env, finished, free_port, sbatch


def _env(devices: int, process: int | None = None, port: int | None = None, processes: int = 2) -> dict:
    env = cpu_env(devices)
    if process is not None:
        env |= dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                    JAX_PROCESS_ID=str(process))  # fmt: skip
    return env


def _start_two(args: list[str]) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen([*CLI, *args], env=_env(2, i, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(2)]  # fmt: skip


def _finish(procs: list[subprocess.Popen], timeout: int = 300) -> None:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + "\n----\n" + outputs[1][-3000:]


def _records(folder: Path) -> dict[tuple[str, int], str]:
    lines = (folder / "generations.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    keys = [(r["id"], r["sample"]) for r in records]
    assert len(keys) == len(set(keys)), "a problem was written twice"
    return {(r["id"], r["sample"]): r["response"] for r in records}


@pytest.fixture(scope="module")
def problems_and_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    rows = [{"id": f"q{i}", "question": f"Tom has {i} apples and buys {i % 7 + 3} more{' today' * (i % 5)}. How many?",
             "answer": f"#### {i + i % 7 + 3}"} for i in range(40)]  # fmt: skip
    data = tmp / "problems.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data, make_hf_checkpoint(tmp / "ckpt", max_position_embeddings=512, initializer_range=0.1)


def test_two_processes_evaluate_like_one(problems_and_model, tmp_path):
    data, checkpoint = problems_and_model
    args = ["eval", "--model", str(checkpoint), "--dataset", str(data), "--limit", "12", "--max-new-tokens", "24",
            "--batch-size", "4", "--no-progress"]  # fmt: skip
    one = subprocess.run([*CLI, *args, "--out", str(tmp_path / "one"), "--mesh", "data=4"], env=_env(4),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    # The two processes start as a SLURM job step would start them (fake_slurm.py): jax.distributed finds its
    # peers from SLURM's variables. No --mesh: every device of both processes.
    finished(sbatch(fake_slurm_env(tmp_path), *args, "--out", str(tmp_path / "two")), tmp_path / "logs")
    assert _records(tmp_path / "two") == _records(tmp_path / "one")
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    same = ("accuracy", "accuracy_ci95", "mean_response_tokens", "problems", "samples")
    assert [{k: s.get(k) for k in same} for s in summaries][0] == [{k: s.get(k) for k in same} for s in summaries][1]


def test_two_process_eval_killed_midway_resumes_every_problem_once(problems_and_model, tmp_path):
    data, checkpoint = problems_and_model
    out = tmp_path / "killed"
    args = ["eval", "--model", str(checkpoint), "--dataset", str(data), "--max-new-tokens", "64", "--batch-size", "2",
            "--no-progress", "--out", str(out)]  # fmt: skip
    procs = _start_two(args)
    generations, deadline = out / "generations.jsonl", time.time() + 240
    while time.time() < deadline and not (generations.is_file() and generations.read_text().count("\n") >= 2):
        assert all(p.poll() is None for p in procs), "a process ended before the kill"
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    written = generations.read_text().count("\n")
    assert 2 <= written < 40, f"{written} problems were written before the kill: the test needs a longer run"
    _finish(_start_two(args))
    assert sorted(_records(out)) == sorted((f"q{i}", 0) for i in range(40))


def test_irpo_runs_an_iteration_on_two_processes(tmp_path):
    from test_irpo import _problems, _sft_pairs

    from jaxpatience.training.loop import load_run_config, train

    rng = random.Random(0)
    _sft_pairs(tmp_path / "sft.jsonl", rng, 64)  # teach the answer format first (as test_irpo does)
    sft = load_run_config(None, [
        f"model={make_hf_checkpoint(tmp_path / 'base', tied=True)}", f"data.path={tmp_path / 'sft.jsonl'}",
        f"out_dir={tmp_path / 'sft'}", "data.max_length=128", "data.buckets=[128]", "data.chat_template=true",
        "train.lora=null", "train.loss.dpo_weight=0", "train.loss.nll_weight=1", "train.batch_size=16",
        "train.max_steps=100", "train.optimizer.learning_rate=3e-3", "train.optimizer.warmup_steps=5",
        "checkpoint_every=1000",
    ])  # fmt: skip
    base = train(sft, progress=False)["exports"]["merged"]
    _problems(tmp_path / "train.jsonl", rng, 12, 0)
    _problems(tmp_path / "eval.jsonl", rng, 8, 100)
    out = tmp_path / "irpo"
    args = [
        "irpo", "--no-progress", f"model={base}", f"out_dir={out}", f"train_problems={tmp_path / 'train.jsonl'}",
        f"eval_problems={tmp_path / 'eval.jsonl'}", "prompt_style=question", "sampling.num_samples=8",
        "sampling.temperature=0.7", "max_pairs_per_problem=3", "sampling.max_new_tokens=24", "iterations=1",
        "generation_batch_size=12", "training.data.max_length=128", "training.data.buckets=[128]",
        "training.train.batch_size=4", "training.train.lora.rank=4", "training.train.mesh.data=4",
        "training.epochs=1",
    ]  # fmt: skip
    _finish(_start_two(args))
    rows = json.loads((out / "summary.json").read_text())["iterations"]
    assert [row["iteration"] for row in rows] == [0, 1] and rows[1]["pairs"] > 0
    assert (out / "iter_1" / "train" / "merged" / "model.safetensors").is_file()
    assert len(_records(out / "iter_1" / "samples")) == 12 * 8
    assert len(_records(out / "iter_1" / "eval")) == 8
