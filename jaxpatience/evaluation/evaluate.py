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

Answer extraction, maj@k and intervals are pure functions in answers.py, the summary in eval_summary.py; tables and
plots are in report.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np

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
from jaxpatience.data.problems import (
    PROMPT_STYLES,
    Problem,
    as_problem,
    build_prompt,
    cut_at_stop_strings,
    load_problems,
)
from jaxpatience.durability.store import JsonlStore
from jaxpatience.evaluation import report
from jaxpatience.evaluation.summary import EvalError, load_summary, summarize

METRICS = report.ANSWER_READINGS  # strict, flexible, math_verify
PromptStyle = str | Callable[[Problem], str]
GENERATION_KEYS = ("id", "sample")  # what makes a generations.jsonl line a whole record


# ---------------------------------------------------------------------------------------------------
# The generations file and the run's settings.


def _drop_incomplete(store: JsonlStore, samples: int) -> None:
    """Keep whole problems only. A batch is one write, but a crash in the middle of it can leave its first lines
    whole and cut the rest: a problem with missing samples is dropped (and the file rewritten without it), so
    that it is generated again with all its samples."""
    kept, dropped = complete_records(store.records, samples)
    if dropped:
        store.rewrite(kept)
        print(f"{store.path}: dropped {dropped} incomplete record(s) of an interrupted run.", file=sys.stderr)


def complete_records(records: list[dict], samples: int) -> tuple[list[dict], int]:
    """Records of problems that have all their samples (first copy of each), and how many records were dropped."""
    by_problem: dict[str, dict[int, dict]] = {}
    for record in records:
        by_problem.setdefault(record["id"], {}).setdefault(int(record["sample"]), record)  # first copy wins
    kept = [
        by_sample[s]
        for by_sample in by_problem.values()
        if set(by_sample) >= set(range(samples))
        for s in range(samples)
    ]
    return kept, len(records) - len(kept)


# run.json of earlier versions: settings then named otherwise, and the value a setting added since then had.
LEGACY_NAMES = {"samples": "num_samples", "batch_size": "generation_batch_size"}
LEGACY_VALUES = {"answer_prefix": "", "stop": None}


def _check_settings(run_path: Path, settings: dict, store: JsonlStore) -> None:
    """Record the run's settings, or refuse to resume a folder whose generations were made with other settings.
    Called with the generations store open (locked), so a second run cannot rewrite run.json under the first."""
    if run_path.exists() and store.records:
        try:
            previous = json.loads(run_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise EvalError(f"{run_path} is not valid JSON; delete it or use another output folder.") from None
        previous = {LEGACY_NAMES.get(key, key): value for key, value in previous.items()}
        from jaxpatience.durability import identity

        identity.check_same_inputs(previous.get("inputs"), settings.get("inputs", {}), run_path.parent,
                                   "use another output folder or delete it to start over")  # fmt: skip
        for key, value in settings.items():
            if key == "inputs":
                continue
            before = previous.get(key, LEGACY_VALUES.get(key, value))  # a key run.json never had: no check
            if before != value:
                raise EvalError(
                    f"{run_path.parent} holds generations made with {key}={before!r}, not {value!r}; "
                    f"use another output folder or delete it to start over."
                )
    run_path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


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
    settings = _settings(run_info, prompt_style, answer_prefix, sampling)
    job = _Job(model, tokenizer, problems, sampling, prompt_style, answer_prefix, generation_batch_size, metric,
               generate_fn, generate_kwargs or {})  # fmt: skip
    job.check_context()  # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    if _process_count() > 1:
        return _evaluate_multihost(job, out_dir, settings, progress, plots, start)
    with JsonlStore(out_dir / "generations.jsonl", required=GENERATION_KEYS) as store:  # locked against a 2nd run
        _check_settings(out_dir / "run.json", settings, store)
        _drop_incomplete(store, sampling.num_samples)
        new_problems = job.run(store, _done(store, job, out_dir, say=True), progress)
    return _write_summary(store.records, job, out_dir, settings, new_problems, plots, start)


def _done(store: JsonlStore, job: _Job, out_dir: Path, say: bool) -> set[str]:
    """The ids of the problems already in the store, checked to be the same problems (gold answer, question);
    says how many of this run's are done."""
    by_id = {problem.id: problem for problem in job.problems}
    for record in store.records:
        problem = by_id.get(record["id"])
        if problem is None:
            continue
        same_question = record.get("question_sha", question_sha(problem.question)) == question_sha(problem.question)
        if record.get("gold", problem.answer) != problem.answer or not same_question:
            what = "gold answer" if same_question else "question"
            raise EvalError(
                f"{out_dir} holds generations for another problem {problem.id} (its {what} differs); use another "
                "output folder or delete it to start over."
            )
    done = {record["id"] for record in store.records}
    already = len(done & by_id.keys())
    if say and already:
        print(f"{already} of {len(job.problems)} problems already done ({store.path}); generating the rest.")
    return done


def question_sha(question: str) -> str:
    """A short digest of a problem's question, stored with each generation (a rerun checks it is the same)."""
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:12]


def _write_summary(records: list[dict], job: _Job, out_dir: Path, settings: dict, new_problems: int, plots: bool,
                   start: float) -> dict:  # fmt: skip
    summary = summarize(records, job.problems, samples=job.sampling.num_samples, metric=job.metric)
    summary.update(settings=settings, out_dir=str(out_dir))
    summary["timing"].update(wall_s=time.perf_counter() - start, new_problems=new_problems)
    ours = {problem.id for problem in job.problems}
    others = len({record["id"] for record in records} - ours)
    if others:  # a smaller --limit on a folder that holds more: its summary.json (of them all) stays as it is
        print(f"{out_dir} holds {others} more problems than this run's {len(ours)}: this summary is printed, not "
              f"written; {out_dir / 'summary.json'} is left as it was.")  # fmt: skip
        return summary
    if plots:
        summary["plots"] = report.plot_eval(summary, out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _process_count() -> int:
    import jax

    return jax.process_count()


def _evaluate_multihost(job: _Job, out_dir: Path, settings: dict, progress: bool, plots: bool, start: float) -> dict:
    """Every process generates alike (the decoder splits the rows over the global mesh); process 0 alone owns the
    store, run.json and summary.json, and tells the others what is done and what the summary is."""
    from jaxpatience import sharding

    main = sharding.is_main_process()
    with JsonlStore(out_dir / "generations.jsonl", required=GENERATION_KEYS) if main else nullcontext() as store:
        state = {"error": None, "done": []}
        if main:
            try:
                _check_settings(out_dir / "run.json", settings, store)
                _drop_incomplete(store, job.sampling.num_samples)
                state["done"] = sorted(_done(store, job, out_dir, say=True))
            except EvalError as err:
                state["error"] = str(err)
        state = sharding.broadcast_json(state)
        if state["error"]:
            raise EvalError(state["error"])
        new_problems = job.run(store, set(state["done"]), progress and main)
    summary = _write_summary(store.records, job, out_dir, settings, new_problems, plots, start) if main else None
    return sharding.broadcast_json(summary)


def _settings(run_info: dict | None, prompt_style: PromptStyle, answer_prefix: str, sampling: SamplingConfig) -> dict:
    """What the generations depend on (run.json): a rerun into the same folder must have the same."""
    style = prompt_style if isinstance(prompt_style, str) else f"custom:{getattr(prompt_style, '__name__', '?')}"
    # Not generation_batch_size: each problem's samples draw from keys fixed by its index in the set, whatever the
    # batching, so a resume may use another batch size.
    settings = dict(run_info or {}, prompt_style=style, answer_prefix=answer_prefix, **dataclasses.asdict(sampling))
    return json.loads(json.dumps(settings))  # tuples -> lists, as run.json will hold them


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
        from jaxpatience.durability import progress as progress_bars
        from jaxpatience.generation.api import Request

        generate_fn = self.generate_fn
        if generate_fn is None:
            from jaxpatience.generation.api import generate as generate_fn
        todo = [problem for problem in self.problems if problem.id not in done]
        if not todo:
            return 0
        position = {problem.id: index for index, problem in enumerate(self.problems)}
        prompts = self.prompts
        # Running accuracy for the progress bar: every sample scored so far, resumed ones included.
        scored = [bool(r["correct"].get(self.metric)) for r in (store.records if store else []) if r["id"] in position]
        bar = progress_bars.bar(len(self.problems), initial=len(self.problems) - len(todo), unit="problem",
                                desc="eval", enabled=progress)  # fmt: skip
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
        timing = {"batch": f"{time.time_ns()}-{self.todo[self.ready[0]].id}", "batch_s": now - self.last_flush,
                  "warmup": self.flushes == 0}  # fmt: skip
        records = [
            _make_record(self.todo[index], s, self.samples[index][s], timing, self.job.prompt_style,
                         self.job.tokenizer, self.use_math_verify)
            for index in self.ready for s in range(self.job.sampling.num_samples)
        ]  # fmt: skip
        for index in self.ready:
            del self.samples[index]
        if self.store is not None:
            self.store.append(records)
        self.scored += [bool(record["correct"].get(self.job.metric)) for record in records]
        self.bar.update(len(self.ready))
        self.bar.set_postfix({"acc": f"{np.mean(self.scored):.3f}"})
        self.ready, self.last_flush, self.flushes = [], now, self.flushes + 1


def _validate(problems: list[Problem] | None, prompt_style: PromptStyle, sampling: SamplingConfig,
              batch_size: int, metric: str) -> None:  # fmt: skip
    """One sentence (EvalError) for settings no evaluation can run with; `problems` None checks the settings only
    (evaluate_checkpoint does, before it loads anything)."""
    samples = sampling.num_samples
    checks = [
        (callable(prompt_style) or prompt_style in PROMPT_STYLES,
         f"unknown prompt style {prompt_style!r}: use one of {', '.join(PROMPT_STYLES)}"),
        (isinstance(batch_size, int) and batch_size >= 1, f"generation_batch_size must be >= 1, not {batch_size}"),
        (samples == 1 or sampling.temperature > 0,
         f"num_samples={samples} at temperature 0 would be {samples} identical greedy answers; set a temperature"),
        (metric in (*METRICS, "auto"), f"unknown metric {metric!r}: use auto, {', '.join(METRICS)}"),
    ]  # fmt: skip
    if problems is not None:
        checks += [(len(problems) > 0, "there are no problems to evaluate"),
                   (len({p.id for p in problems}) == len(problems), "problem ids must be unique")]  # fmt: skip
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
                f"runs past the model's context of {context}; lower --max-new-tokens or use a shorter prompt style."
            )


def _make_record(problem: Problem, sample_index: int, generation, timing: dict, prompt_style: PromptStyle,
                 tokenizer, use_math_verify: bool) -> dict:  # fmt: skip
    """One JSONL line: the response, its length, and its scores (recomputed by `summarize`, stored to read)."""
    text, token_ids = generation.text, list(generation.token_ids)
    generated_tokens = len(token_ids)
    if prompt_style == "few_shot_plain":
        cut = cut_at_stop_strings(text)
        if cut != text and tokenizer is not None:  # the invented next question does not count as response length
            text, token_ids = cut, tokenizer(cut, add_special_tokens=False)["input_ids"]
    scores = answers.score_response(text, problem.answer, use_math_verify=use_math_verify)
    return {
        "id": problem.id,
        "sample": sample_index,
        "gold": problem.answer,
        "question_sha": question_sha(problem.question),
        "response": text,
        "response_tokens": len(token_ids),
        "generated_tokens": generated_tokens,  # before any stop-string cut: what the decoder produced
        "finish_reason": getattr(generation, "finish_reason", None),
        "strict": scores["strict"],
        "flexible": scores["flexible"],
        "correct": scores["correct"],
        **timing,
    }


# ---------------------------------------------------------------------------------------------------
# A checkpoint on a problem set: the one way eval, irpo and the demo evaluate a model.


def evaluate_checkpoint(config: EvalConfig, problems: Sequence[Problem] | None = None, *, answer_prefix: str = "",
                        reuse: bool = False, progress: bool = True, plots: bool = True) -> dict:  # fmt: skip
    """Load `config.model` (with `config.adapter`, on `config.mesh`) and evaluate it as configured.

    problems: the problems to use (the IRPO loop loads its sets once); None reads `config.dataset`.
    reuse: return the summary already in `config.out_dir` without loading anything, if there is one (the IRPO
        loop and the demo skip finished evaluations this way); otherwise a finished folder is re-summarized.
    """
    from jaxpatience import sharding
    from jaxpatience.durability import identity
    from jaxpatience.model import lora
    from jaxpatience.model.weights import load_pretrained

    out = Path(config.out_dir)
    _validate(None, config.prompt_style, config.sampling, config.generation_batch_size, config.metric)
    if problems is None:
        config.validate()
    # Several processes (JAX_COORDINATOR_ADDRESS ... as for train): start jax.distributed before any device work.
    multihost = sharding.initialize_distributed()
    if reuse:  # process 0 decides, so that every process takes the same branch
        finished = out / "summary.json"
        summary = sharding.broadcast_json(read_json(finished) if finished.is_file() and
                                          sharding.is_main_process() else None)  # fmt: skip
        if summary is not None:
            return summary
    if problems is None:
        problems = load_problems(config.dataset, split=config.split, limit=config.limit, seed=config.sampling.seed)
    mesh = None
    if config.mesh is not None or multihost:  # several processes: rows split over every device by default
        try:
            mesh = sharding.make_mesh(**dataclasses.asdict(config.mesh or MeshConfig(data=-1)))
        except ValueError as err:
            raise ConfigError(f"mesh: {err}") from None
    model, tokenizer = load_pretrained(config.model, config.param_dtype, compute_dtype=config.compute_dtype, mesh=mesh)
    if config.adapter:
        model = lora.load_adapter(model, config.adapter)
    run_info = {"model": str(Path(config.model).resolve()), "adapter": config.adapter, "dataset": config.dataset,
                "split": config.split,
                "dataset_seed": config.sampling.seed if config.dataset == "gsm_symbolic" else None,
                "inputs": identity.model_inputs(config.model, config.adapter)}  # fmt: skip
    return evaluate(model, tokenizer, problems, out_dir=out, sampling=config.sampling,
                    prompt_style=config.prompt_style, answer_prefix=answer_prefix,
                    generation_batch_size=config.generation_batch_size, metric=config.metric, progress=progress,
                    run_info=run_info, plots=plots, generate_kwargs={"mesh": mesh} if mesh else None)  # fmt: skip


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
        "jaxpatience eval", "Evaluate a Qwen2 checkpoint on GSM8K, MATH, gsm_symbolic or a local file of problems.",
        FLAGS,
    )  # fmt: skip
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
