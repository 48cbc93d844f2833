"""lm-evaluation-harness speed: `jaxpatience lm-eval`'s model (HarnessLM) against the harness's own `hf` backend.

    python scripts/bench_lm_eval.py --out /tmp/bench_lm_eval                       # the table in docs/EVALUATION.md
    python scripts/bench_lm_eval.py --out /tmp/bench_lm_eval --questions 50 --generations 16   # a quick look

Everything is made here, from --seed, in --out (nothing is downloaded):

* a random checkpoint saved with transformers: Qwen2, 4 layers, 256 wide (8 heads, 4 kv heads, MLP 768), a
  1024-token context, weights drawn with initializer_range 0.1 (wide, so that greedy decoding meets no
  near-ties and both backends write the same text), and a byte-level BPE tokenizer (ChatML) of up to 1024 tokens
  learnt from the word list (604 of them);
* two local tasks (`dataset_path: json`): `bench_mc`, --questions multiple-choice questions of 4 choices (1 to 6
  words each) after 20 to 120 words of context, so 4 x --questions loglikelihood requests; `bench_gen`,
  --generations greedy generate_until requests of up to --max-gen-toks tokens after 20 to 60 words, stopping
  at "\\n\\n" (which the random model rarely writes: most rows run to their budget).

Each backend runs each task in this one process, back to back, timed around `lm_eval.simple_evaluate` with the
model's loading and (for jaxpatience) compilation included; beforehand, untimed, the task's dataset is built and
`hf` runs it on 2 documents, so that lm-eval's, torch's and transformers' first-use work is paid by neither side
(JAX starts cold: its compilations are part of the figure). `hf` runs at --hf-batch-size on the CPU in float32,
twice: at torch's default thread count and at torch.set_num_threads(1) (on a small shared CPU the threads mostly
wait on each other; both are fair, and the table says which is which). jaxpatience runs at its defaults (32
slots, 8192 cache slots per scoring call).

Printed: one row per task with each backend's wall seconds (and the process's CPU seconds over that time, all
threads: on a loaded machine the steadier figure) and metric, our ratio to each `hf` run (its wall time over
ours: higher is faster), and our compiled programs and compile seconds (XLA's backend compile events); the last
line is one JSON object with every figure. On a shared machine compare ratios from one run, not absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

WORDS = (
    "apple bag coin pen cat dog tree river stone house book lamp chair table window door road city field farm "
    "boat train cloud rain sun moon star hill lake bird fish horse cow sheep goat wheat bread milk cheese salt "
    "red blue green small large old new quick slow warm cold bright dark happy quiet loud soft hard long short "
    "runs walks sees finds takes gives buys sells makes keeps holds opens reads writes counts builds carries "
    "the a one two three four five six seven eight nine ten and or but then so because while after before"
).split()
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
MC_YAML = """output_type: multiple_choice
doc_to_text: "{{context}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_YAML = """output_type: generate_until
doc_to_text: "{{context}}\\nA:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: MAX_GEN_TOKS
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
METRICS = {"bench_mc": "acc,none", "bench_gen": "exact_match,none"}


def words(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(low, high + 1))))


def make_checkpoint(directory: Path, seed: int) -> Path:
    """The random 4-layer, 256-wide Qwen2 (transformers) and its BPE tokenizer, saved as an HF checkpoint."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from jaxpatience.model.tokenizer import train_bpe_tokenizer

    rng = np.random.default_rng(seed)
    tokenizer = train_bpe_tokenizer([words(rng, 20, 120) for _ in range(400)], vocab_size=1024)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, initializer_range=0.1,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tasks(directory: Path, questions: int, generations: int, max_gen_toks: int, seed: int) -> Path:
    """bench_mc and bench_gen: YAML files over local JSONL files (absolute paths: any working directory)."""
    rng = np.random.default_rng(seed + 1)
    directory.mkdir(parents=True, exist_ok=True)
    mc = [
        {
            "context": words(rng, 20, 120),
            "choices": [words(rng, 1, 6) for _ in range(4)],
            "answer": int(rng.integers(4)),
        }
        for _ in range(questions)
    ]
    gen = [{"context": words(rng, 20, 60), "answer": words(rng, 1, 3)} for _ in range(generations)]
    for name, records, body in (
        ("bench_mc", mc, MC_YAML),
        ("bench_gen", gen, GEN_YAML.replace("MAX_GEN_TOKS", str(max_gen_toks))),
    ):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        (directory / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data) + body, encoding="utf-8")
    return directory


class CompileCounter:
    """XLA backend compilations (programs and seconds) while it is attached: jax's monitoring events."""

    def __init__(self):
        import jax

        self.programs, self.seconds, self.active = 0, 0.0, False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_) -> None:
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.programs += 1
            self.seconds += duration

    def __enter__(self):
        self.programs, self.seconds, self.active = 0, 0.0, True
        return self

    def __exit__(self, *exc):
        self.active = False


def run_ours(checkpoint: Path, task: str, task_manager, counter: CompileCounter) -> dict:
    import lm_eval

    from jaxpatience.evaluation.harness import HarnessLM

    with counter:
        start, cpu = time.perf_counter(), time.process_time()
        lm = HarnessLM.from_checkpoint(str(checkpoint), progress=False)
        results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, random_seed=0)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    metric = results["results"][task][METRICS[task]]
    return {"seconds": seconds, "cpu_s": cpu, "metric": metric, "programs": counter.programs,
            "compile_s": counter.seconds}  # fmt: skip


def run_hf(checkpoint: Path, task: str, task_manager, threads: int | None, batch_size: int, limit=None) -> dict:
    import lm_eval
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={checkpoint},dtype=float32", device="cpu", batch_size=batch_size,
            tasks=[task], task_manager=task_manager, random_seed=0, limit=limit,
        )  # fmt: skip
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        torch.set_num_threads(default)
    metric = results["results"][task][METRICS[task]]
    return {"seconds": seconds, "cpu_s": cpu, "metric": metric, "threads": threads or default}


def _cells(run: dict | None, ours: dict | None) -> list[str]:
    """A run's seconds (wall and CPU) and, for an `hf` run, our speed-up over it (its wall time over ours)."""
    if run is None:
        return ["-", "-"] if ours is not None else ["-"]
    cells = [f"{run['seconds']:.1f} s ({run['cpu_s']:.1f} s CPU)"]
    if ours is not None and run is not ours:
        cells.append(f"{run['seconds'] / ours['seconds']:.2f}x")
    return cells


def print_table(rows: dict[str, dict]) -> None:
    hf_threads = next((row["hf"]["threads"] for row in rows.values() if row.get("hf")), "default")
    print(f"| task (requests) | jaxpatience | hf, {hf_threads} threads (torch's default) | ratio | hf, 1 thread "
          "| ratio | metric (ours / hf / hf 1 thread) | our programs (compile s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for task, row in rows.items():
        ours, hf, hf1 = row.get("ours"), row.get("hf"), row.get("hf_1_thread")
        cells = [f"{task} ({row['requests']})", *_cells(ours, None), *_cells(hf, ours), *_cells(hf1, ours)]
        cells.append(" / ".join(f"{r['metric']:.3f}" for r in (ours, hf, hf1) if r))
        cells.append(f"{ours['programs']} ({ours['compile_s']:.1f} s)" if ours else "-")
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="a folder for the checkpoint and the task files")
    parser.add_argument("--questions", type=int, default=200, help="multiple-choice questions (4 requests each)")
    parser.add_argument("--generations", type=int, default=64, help="generate_until requests")
    parser.add_argument("--max-gen-toks", type=int, default=64)
    parser.add_argument("--tasks", default="bench_mc,bench_gen")
    parser.add_argument("--backends", default="ours,hf,hf_1_thread", help="any of ours, hf, hf_1_thread")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.questions, args.generations, args.max_gen_toks, args.hf_batch_size) < 1:
        parser.error("--questions, --generations, --max-gen-toks and --hf-batch-size must be >= 1.")
    from lm_eval.tasks import TaskManager, get_task_dict

    out = Path(args.out)
    checkpoint = out / "checkpoint"
    if not (checkpoint / "config.json").exists():
        make_checkpoint(checkpoint, args.seed)
    tasks_dir = make_tasks(out / "tasks", args.questions, args.generations, args.max_gen_toks, args.seed)
    task_manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    counter, rows = CompileCounter(), {}
    for task in args.tasks.split(","):
        get_task_dict([task], task_manager)  # build the dataset once, outside every timing
        # Untimed: lm-eval's, torch's and transformers' first-use work on 2 documents (not ours: its compiles count)
        run_hf(checkpoint, task, task_manager, None, args.hf_batch_size, limit=2)
        requests = 4 * args.questions if task == "bench_mc" else args.generations
        rows[task] = {"requests": requests}
        for backend in args.backends.split(","):
            if backend == "ours":
                rows[task][backend] = run_ours(checkpoint, task, task_manager, counter)
            else:
                threads = 1 if backend == "hf_1_thread" else None
                rows[task][backend] = run_hf(checkpoint, task, task_manager, threads, args.hf_batch_size)
            print(f"{task} {backend}: {rows[task][backend]}", flush=True)
    print_table(rows)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
