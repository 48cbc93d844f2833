"""The evaluator: generate solutions, read off final answers, report accuracy, maj@k and "patience" measures.

    summary = evaluate(model, tokenizer, problems, out_dir="runs/eval", sampling=SamplingConfig(max_new_tokens=512))
    summary = evaluate_checkpoint(EvalConfig(model="ckpt", dataset="gsm8k", out_dir="runs/gsm8k"))
    jaxpatience eval --model Qwen2-7B-Instruct --dataset gsm8k --limit 200 --out runs/gsm8k

`evaluate_checkpoint` is the one way a checkpoint (and an adapter) is loaded and evaluated: `jaxpatience eval`,
the IRPO loop (its samples and its held-out evaluations) and the demo all call it.

Output folder:
  generations.jsonl  one line per (problem, sample), appended and fsynced as problems finish (store.JsonlStore;
                     every generation_batch_size problems or 10 s): a crash loses at most those in flight, and a
                     rerun into the same folder skips the problems already done
  run.json           the settings the generations were made with (a rerun with other settings is refused)
  summary.json       accuracy per answer reading with a 95% Wilson interval, maj@k, response lengths,
                     behaviour markers, timing; `jaxpatience eval --compare A B` prints two side by side
  response_length.png, maj_at_k.png (when num_samples > 1)

Answer extraction, maj@k and intervals are pure functions in data/answers.py; the generations file and run.json in
evaluation/records.py, the summary in evaluation/summary.py; tables and plots are in evaluation/report.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import jax
import numpy as np

from jaxpatience import sharding
from jaxpatience.config import (
    ConfigError,
    EvalConfig,
    MeshConfig,
    SamplingConfig,
    command_parser,
    config_from_args,
    read_json,
)
from jaxpatience.data import answers
from jaxpatience.data.problems import PROMPT_STYLES, Problem, as_problem, build_prompt, load_problems
from jaxpatience.durability import identity
from jaxpatience.durability import progress as progress_bars
from jaxpatience.durability.store import JsonlStore
from jaxpatience.evaluation import report
from jaxpatience.evaluation.records import GENERATION_KEYS as GENERATION_KEYS
from jaxpatience.evaluation.records import LEGACY_NAMES as LEGACY_NAMES
from jaxpatience.evaluation.records import LEGACY_VALUES as LEGACY_VALUES
from jaxpatience.evaluation.records import PromptStyle as PromptStyle
from jaxpatience.evaluation.records import (
    check_settings,
    claim_out_dir,
    done_ids,
    drop_incomplete,
    make_record,
    run_settings,
)
from jaxpatience.evaluation.records import complete_records as complete_records
from jaxpatience.evaluation.records import question_sha as question_sha
from jaxpatience.evaluation.summary import EvalError, load_summary, summarize
from jaxpatience.generation.api import Request, generate
from jaxpatience.model import lora
from jaxpatience.model.weights import load_pretrained

METRICS = report.ANSWER_READINGS  # strict, flexible, math_verify


# ---------------------------------------------------------------------------------------------------
# The evaluation loop.


def evaluate(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    out_dir: str | Path,
    sampling: SamplingConfig | None = None,
    prompt_style: PromptStyle = "zero_shot",
    answer_prefix: str = "",
    generation_batch_size: int = 16,
    metric: str = "auto",
    generate_fn: Callable | None = None,
    progress: bool = True,
    run_info: dict | None = None,
    plots: bool = True,
    generate_kwargs: dict | None = None,
) -> dict:
    """Generate `sampling.num_samples` solutions per problem (resuming from `out_dir`), score them, write and
    return the summary (see `summarize` for its keys; also out_dir/summary.json).

    sampling: how solutions are drawn (default: greedy, 512 new tokens, one sample).
    answer_prefix: text that starts every answer for the model (appended to the prompt, not part of the response).
    generation_batch_size: problems decoded at once (the decoder's slots: `generation_batch_size * num_samples`
        rows; a finished row's slot takes the next problem) and per JSONL flush.
    metric: the answer reading behind `accuracy` and maj@k: strict, flexible, math_verify, or auto (math_verify
        when some gold answer is LaTeX and math-verify is installed, else strict).
    generate_fn: `jaxpatience.generate` by default; any function with its signature (tests pass a fake).
    run_info: facts about the run (model path, dataset name) stored in run.json and the summary; a rerun into
        the same folder must match them, as it must match the generation settings.
    generate_kwargs: passed on to generate_fn as they are, e.g. {"mesh": mesh}.
    """
    start = time.perf_counter()
    sampling = sampling or SamplingConfig()
    problems = [as_problem(problem) for problem in problems]
    _validate(problems, prompt_style, sampling, generation_batch_size, metric)
    metric = resolve_metric(metric, problems)
    out_dir = Path(out_dir)
    settings = run_settings(run_info, prompt_style, answer_prefix, sampling)
    job = _Job(
        model,
        tokenizer,
        problems,
        sampling,
        prompt_style,
        answer_prefix,
        generation_batch_size,
        metric,
        generate_fn,
        generate_kwargs or {},
    )
    job.check_context()  # before anything is written
    claim_out_dir(out_dir, run_info).mark(marker=sharding.is_main_process())  # an eval folder (records.py)
    if _process_count() > 1:
        return _evaluate_multihost(job, out_dir, settings, progress, plots, start)
    with JsonlStore(out_dir / "generations.jsonl", required=GENERATION_KEYS) as store:  # locked against a 2nd run
        check_settings(out_dir / "run.json", settings, store)
        drop_incomplete(store, sampling.num_samples)
        new_problems = job.run(store, done_ids(store, job.problems, out_dir, say=True), progress)
    return _write_summary(store.records, job, out_dir, settings, new_problems, plots, start)


def _write_summary(
    records: list[dict], job: _Job, out_dir: Path, settings: dict, new_problems: int, plots: bool, start: float
) -> dict:
    summary = summarize(records, job.problems, samples=job.sampling.num_samples, metric=job.metric)
    summary.update(settings=settings, out_dir=str(out_dir))
    summary["timing"].update(wall_s=time.perf_counter() - start, new_problems=new_problems)
    ours = {problem.id for problem in job.problems}
    others = len({record["id"] for record in records} - ours)
    if others:  # a smaller --limit on a folder that holds more: its summary.json (of them all) stays as it is
        print(
            f"{out_dir} holds {others} more problems than this run's {len(ours)}: this summary is printed, not "
            f"written; {out_dir / 'summary.json'} is left as it was."
        )
        return summary
    if plots:
        summary["plots"] = report.plot_eval(summary, out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _process_count() -> int:
    return jax.process_count()


def _evaluate_multihost(job: _Job, out_dir: Path, settings: dict, progress: bool, plots: bool, start: float) -> dict:
    """Every process generates alike (the decoder splits the rows over the global mesh); process 0 alone owns the
    store, run.json and summary.json, and tells the others what is done and what the summary is."""
    main = sharding.is_main_process()
    with JsonlStore(out_dir / "generations.jsonl", required=GENERATION_KEYS) if main else nullcontext() as store:
        state = {"error": None, "done": []}
        if main:
            try:
                check_settings(out_dir / "run.json", settings, store)
                drop_incomplete(store, job.sampling.num_samples)
                state["done"] = sorted(done_ids(store, job.problems, out_dir, say=True))
            except EvalError as err:
                state["error"] = str(err)
        state = sharding.broadcast_json(state)
        if state["error"]:
            raise EvalError(state["error"])
        new_problems = job.run(store, set(state["done"]), progress and main)
    summary = _write_summary(store.records, job, out_dir, settings, new_problems, plots, start) if main else None
    return sharding.broadcast_json(summary)


@dataclasses.dataclass
class _Job:
    """One evaluation's generation work: the problems not yet in the store, batched by prompt length."""

    model: object
    tokenizer: object
    problems: list[Problem]
    sampling: SamplingConfig
    prompt_style: PromptStyle
    answer_prefix: str
    batch_size: int
    metric: str
    generate_fn: Callable | None
    generate_kwargs: dict

    def run(self, store: JsonlStore | None, done: set[str], progress: bool) -> int:
        """Generate every problem not in `done`, appending finished problems to `store` (process 0's; None on
        the others) as the decoder streams them; returns the number generated."""
        generate_fn = generate if self.generate_fn is None else self.generate_fn
        todo = [problem for problem in self.problems if problem.id not in done]
        if not todo:
            return 0
        position = {problem.id: index for index, problem in enumerate(self.problems)}
        prompts = self.prompts
        # Running accuracy for the progress bar: every sample scored so far, resumed ones included.
        scored = [bool(r["correct"].get(self.metric)) for r in (store.records if store else []) if r["id"] in position]
        bar = progress_bars.bar(
            len(self.problems), initial=len(self.problems) - len(todo), unit="problem", desc="eval", enabled=progress
        )
        writer = _Writer(self, todo, store, bar, scored)
        # Each problem's samples draw from keys fixed by its index in the whole set (Request.seed_index): a
        # resumed run draws what an uninterrupted one would, however the decoder batches them.
        requests = [Request(prompts[p.id], seed_index=position[p.id]) for p in todo]
        try:
            results = generate_fn(self.model, self.tokenizer, requests, on_result=writer.add, **self._generate_kwargs())
            for index, per_problem in enumerate(results):  # a generator that does not stream hands over here
                for sample, generation in enumerate(per_problem):
                    writer.add(index, sample, generation)
            writer.flush()
        except BaseException:
            with contextlib.suppress(Exception):  # keep the problems already handed over; the first error wins
                writer.flush()
            raise
        finally:
            bar.close()
        return len(todo)

    @functools.cached_property
    def prompts(self) -> dict[str, str | list[int]]:
        """Every problem's prompt, built once (the context check and the generation both read them)."""
        latex = any(not answers.is_numeric(p.answer) for p in self.problems)  # MATH: ask for \boxed{} answers
        return {p.id: self._prompt(p, latex) for p in self.problems}

    def check_context(self) -> None:
        """Every prompt + max_new_tokens fits the model's context (EvalError naming the first that does not)."""
        _check_context(self.model, self.tokenizer, self.prompts, self.sampling.max_new_tokens)

    def _prompt(self, problem: Problem, latex: bool) -> str | list[int]:
        prompt = build_prompt(problem, self.tokenizer, self.prompt_style, latex)
        return prompt + self.answer_prefix if self.answer_prefix else prompt

    def _generate_kwargs(self) -> dict:
        """generate()'s settings: the sampling, and as many slots as `batch_size` problems' samples."""
        kwargs = self.sampling.generate_kwargs()
        kwargs.update(batch_size=self.batch_size * self.sampling.num_samples, progress=False)
        return kwargs | self.generate_kwargs


class _Writer:
    """Collects streamed samples; a problem's records are made once all its samples are in, and appended to the
    store (fsynced) every `batch_size` problems or FLUSH_S seconds, so a crash loses little. Each write is one
    timing unit ("batch"): the generation time since the previous write, the first including compilation."""

    FLUSH_S = 10.0

    def __init__(self, job: _Job, todo: list[Problem], store: JsonlStore | None, bar, scored: list[bool]):
        self.job, self.todo, self.store, self.bar, self.scored = job, todo, store, bar, scored
        self.samples: dict[int, dict[int, object]] = {}  # problem index in todo -> sample -> Generation
        self.written: set[int] = set()
        self.ready: list[int] = []  # whole problems not yet written
        self.use_math_verify = answers.math_verify_available() is None
        self.last_flush, self.flushes = time.perf_counter(), 0

    def add(self, index: int, sample: int, generation) -> None:
        if index in self.written:
            return  # already handed over (a streaming generator also returns its results at the end)
        per_problem = self.samples.setdefault(index, {})
        per_problem[sample] = generation
        if len(per_problem) == self.job.sampling.num_samples:
            self.written.add(index)
            self.ready.append(index)
            if len(self.ready) >= self.job.batch_size or time.perf_counter() - self.last_flush > self.FLUSH_S:
                self.flush()

    def flush(self) -> None:
        if not self.ready:
            return
        now = time.perf_counter()
        timing = {
            "batch": f"{time.time_ns()}-{self.todo[self.ready[0]].id}",
            "batch_s": now - self.last_flush,
            "warmup": self.flushes == 0,
        }
        records = [
            make_record(
                self.todo[index],
                s,
                self.samples[index][s],
                timing,
                self.job.prompt_style,
                self.job.tokenizer,
                self.use_math_verify,
            )
            for index in self.ready
            for s in range(self.job.sampling.num_samples)
        ]
        for index in self.ready:
            del self.samples[index]
        if self.store is not None:
            self.store.append(records)
        self.scored += [bool(record["correct"].get(self.job.metric)) for record in records]
        self.bar.update(len(self.ready))
        self.bar.set_postfix({"acc": f"{np.mean(self.scored):.3f}"})
        self.ready, self.last_flush, self.flushes = [], now, self.flushes + 1


def _validate(
    problems: list[Problem] | None, prompt_style: PromptStyle, sampling: SamplingConfig, batch_size: int, metric: str
) -> None:
    """One sentence (EvalError) for settings no evaluation can run with; `problems` None checks the settings only
    (evaluate_checkpoint does, before it loads anything)."""
    samples = sampling.num_samples
    checks = [
        (
            callable(prompt_style) or prompt_style in PROMPT_STYLES,
            f"unknown prompt style {prompt_style!r}: use one of {', '.join(PROMPT_STYLES)}",
        ),
        (isinstance(batch_size, int) and batch_size >= 1, f"generation_batch_size must be >= 1, not {batch_size}"),
        (
            samples == 1 or sampling.temperature > 0,
            f"num_samples={samples} at temperature 0 would be {samples} identical greedy answers; set a temperature",
        ),
        (metric in (*METRICS, "auto"), f"unknown metric {metric!r}: use auto, {', '.join(METRICS)}"),
    ]
    if problems is not None:
        checks += [
            (len(problems) > 0, "there are no problems to evaluate"),
            (len({p.id for p in problems}) == len(problems), "problem ids must be unique"),
        ]
    for ok, message in checks:
        if not ok:
            raise EvalError(message + ".")


def resolve_metric(metric: str, problems: Sequence[Problem]) -> str:
    """`auto` -> math_verify when some gold answer is LaTeX (MATH) and math-verify is installed, else strict."""
    unavailable = answers.math_verify_available()
    if metric == "math_verify" and unavailable:
        raise EvalError(f"metric math_verify is unavailable: {unavailable}.")
    if metric != "auto":
        return metric
    latex = next((problem for problem in problems if not answers.is_numeric(problem.answer)), None)
    if latex is None:
        return "strict"
    chosen = "strict" if unavailable else "math_verify"
    why = f"; {unavailable}, so they are compared as normalised text" if unavailable else ""
    print(f"metric: {chosen} (some gold answers are not numbers, e.g. {latex.id}: {latex.answer[:40]!r}{why})")
    return chosen


def _check_context(model, tokenizer, prompts: dict[str, str | list[int]], max_new_tokens: int) -> None:
    """Name the first problem whose prompt + max_new_tokens does not fit the model's context, before anything is
    generated (the decoder's own error could only give the prompt's position)."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is None or tokenizer is None:  # a fake generator: nothing to check
        return
    for problem_id, prompt in prompts.items():
        # a callable prompt style may return token ids
        length = (
            len(prompt)
            if not isinstance(prompt, str)
            else len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        )
        if length + max_new_tokens > context:
            raise EvalError(
                f"problem {problem_id}: its prompt has {length} tokens, and with max_new_tokens={max_new_tokens} it "
                f"runs past the model's context of {context}; lower sampling.max_new_tokens (eval: --max-new-tokens) "
                "or use a shorter prompt style."
            )


# ---------------------------------------------------------------------------------------------------
# A checkpoint on a problem set: the one way eval, irpo and the demo evaluate a model.


def evaluate_checkpoint(
    config: EvalConfig,
    problems: Sequence[Problem] | None = None,
    *,
    answer_prefix: str = "",
    reuse: bool = False,
    progress: bool = True,
    plots: bool = True,
) -> dict:
    """Load `config.model` (with `config.adapter`, on `config.mesh`) and evaluate it as configured.

    problems: the problems to use (the IRPO loop loads its sets once); None reads `config.dataset`.
    reuse: return the summary already in `config.out_dir` without loading anything, if there is one (the IRPO
        loop and the demo skip finished evaluations this way); otherwise a finished folder is re-summarized.
    """
    out = Path(config.out_dir)
    _validate(None, config.prompt_style, config.sampling, config.generation_batch_size, config.metric)
    if problems is None:
        config.validate()
    # Several processes (JAX_COORDINATOR_ADDRESS ... as for train): start jax.distributed before any device work.
    multihost = sharding.initialize_distributed()
    # Before the model loads (evaluate() claims it again where it writes): not another's folder, nor an input.
    claim_out_dir(out, {"model": config.model, "adapter": config.adapter, "dataset": config.dataset})
    if reuse and (summary := _finished_summary(out)) is not None:
        return summary
    if problems is None:
        problems = load_problems(config.dataset, split=config.split, limit=config.limit, seed=config.sampling.seed)
    mesh = _checkpoint_mesh(config, multihost)
    model, tokenizer = load_pretrained(config.model, config.param_dtype, compute_dtype=config.compute_dtype, mesh=mesh)
    if config.adapter:
        model = lora.load_adapter(model, config.adapter)
    run_info = _checkpoint_run_info(config)
    return evaluate(
        model,
        tokenizer,
        problems,
        out_dir=out,
        sampling=config.sampling,
        prompt_style=config.prompt_style,
        answer_prefix=answer_prefix,
        generation_batch_size=config.generation_batch_size,
        metric=config.metric,
        progress=progress,
        run_info=run_info,
        plots=plots,
        generate_kwargs={"mesh": mesh} if mesh else None,
    )


def _finished_summary(out: Path) -> dict | None:
    """The summary.json already in `out`, or None. Process 0 reads it and every process gets its answer, so that
    all of them take the same branch."""
    finished = out / "summary.json"
    return sharding.broadcast_json(read_json(finished) if finished.is_file() and sharding.is_main_process() else None)


def _checkpoint_mesh(config: EvalConfig, multihost: bool):
    """The mesh the checkpoint is loaded on and its rows split over: `config.mesh`; with several processes and no
    mesh named, every device on the data axis; else None (one device)."""
    if config.mesh is None and not multihost:
        return None
    try:
        return sharding.make_mesh(**dataclasses.asdict(config.mesh or MeshConfig(data=-1)))
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None


def _checkpoint_run_info(config: EvalConfig) -> dict:
    """The facts about the run that run.json keeps (a rerun into the folder must match): what model, adapter and
    problems were evaluated, and the fingerprint of the model's files."""
    return {
        "model": str(Path(config.model).resolve()),
        "adapter": config.adapter,
        "dataset": config.dataset,
        "split": config.split,
        "dataset_seed": config.sampling.seed if config.dataset == "gsm_symbolic" else None,
        "inputs": identity.model_inputs(config.model, config.adapter),
    }


# ---------------------------------------------------------------------------------------------------
# Command line: `jaxpatience eval ...` (cli.py dispatches here). The flags are aliases of EvalConfig keys.

FLAGS = {
    "--model": ("model", "HF checkpoint directory or .gguf file"),
    "--adapter": ("adapter", "a PEFT LoRA adapter directory to apply on top of --model"),
    "--dataset": ("dataset", "gsm8k, math (MATH-500), gsm_symbolic, or a .jsonl/.json/.parquet file"),
    "--split": ("split", "hub dataset split (default: test)"),
    "--limit": ("limit", "evaluate the first N problems"),
    "--batch-size": ("generation_batch_size", "problems decoded at once (default: 16)"),
    "--max-new-tokens": ("sampling.max_new_tokens", "default: 512"),
    "--samples": ("sampling.num_samples", "solutions per problem, for maj@k (default: 1)"),
    "--temperature": ("sampling.temperature", "0 = greedy (default)"),
    "--top-p": ("sampling.top_p", "nucleus sampling (default: 1.0)"),
    "--top-k": ("sampling.top_k", "0 = off (default)"),
    "--seed": ("sampling.seed", "sampling seed, and gsm_symbolic's generator seed"),
    "--prompt-style": ("prompt_style", f"{', '.join(PROMPT_STYLES)} (default: zero_shot)"),
    "--metric": ("metric", f"the reading behind accuracy: auto, {', '.join(METRICS)}"),
    "--dtype": ("param_dtype", "weight dtype: float32 or bfloat16 (default: float32)"),
    "--mesh": ("mesh", "e.g. data=8 or fsdp=4,tensor=2: weights and batches sharded over devices"),
    "--out": ("out_dir", "output folder (rerunning into it resumes)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        "jaxpatience eval",
        "Evaluate a Qwen2 checkpoint on GSM8K, MATH, gsm_symbolic or a local file of problems.",
        FLAGS,
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print a before/after table of two summaries")
    args = parser.parse_intermixed_args(argv)
    if args.compare:
        before, after = (load_summary(p) for p in args.compare)
        print(report.compare_table(before, after, names=tuple(Path(p).name or str(p) for p in args.compare)))
        return 0
    config = config_from_args(EvalConfig, args).validate()
    summary = evaluate_checkpoint(config, progress=not args.no_progress)
    print(report.format_eval_summary(summary))
    print(f"wrote {Path(config.out_dir) / 'summary.json'}")
    return 0
