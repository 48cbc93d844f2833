"""The evaluator: generate solutions, read off final answers, report accuracy, maj@k and "patience" measures.

    summary = evaluate(model, tokenizer, problems, out_dir="runs/eval", max_new_tokens=512, samples=1)
    jaxpatience eval --model Qwen2-7B-Instruct --dataset gsm8k --limit 200 --out runs/gsm8k

Output folder:
  generations.jsonl  one line per (problem, sample), appended and flushed after every batch: a crash loses at
                     most the batch in flight, and a rerun with the same folder skips the problems already done
  run.json           the settings the generations were made with (a rerun with other settings is refused)
  summary.json       accuracy per answer reading with a 95% Wilson interval, maj@k, response lengths,
                     behaviour markers, timing; `jaxpatience eval --compare A B` prints two side by side
  response_length.png, maj_at_k.png (when samples > 1)

Answer extraction, maj@k and intervals are pure functions in answers.py; this file runs and reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxpatience import answers
from jaxpatience.data.problems import (
    PROMPT_STYLES,
    Problem,
    as_problem,
    build_prompt,
    cut_at_stop_strings,
    load_problems,
)

METRICS = ("strict", "flexible", "math_verify")
PromptStyle = str | Callable[[Problem], str]


class EvalError(ValueError):
    """Bad evaluation settings or output folder; the message is one sentence."""


# ---------------------------------------------------------------------------------------------------
# The generations file.


def read_generations(path: Path) -> tuple[list[dict], bool]:
    """The records of a generations.jsonl and whether its last line was cut short (a crash during the write).

    Only the last line may be malformed: anything earlier is an error naming the line.
    """
    if not path.exists():
        return [], False
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, torn = [], False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "id" not in record or "sample" not in record:
                raise ValueError("not a generation record")
        except ValueError as err:
            if number - 1 == last and not text.endswith("\n"):
                torn = True  # an unfinished final write: drop it, the problem is generated again
                continue
            raise EvalError(f"{path}, line {number}: not a generation record ({err}).") from None
        records.append(record)
    return records, torn


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


def _append(path: Path, records: list[dict]) -> None:
    """Append one batch of records as one write, then flush to disk, so a crash leaves whole lines behind."""
    with open(path, "a", encoding="utf-8") as out:
        out.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        out.flush()
        os.fsync(out.fileno())


def _rewrite(path: Path, records: list[dict]) -> None:
    """Replace the file atomically (write a sibling, then rename): a crash here leaves the old or the new file."""
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    os.replace(tmp, path)


def _check_settings(run_path: Path, settings: dict, generations: Path) -> None:
    """Record the run's settings, or refuse to resume a folder whose generations were made with other settings."""
    if run_path.exists() and generations.exists() and generations.stat().st_size > 0:
        try:
            previous = json.loads(run_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise EvalError(f"{run_path} is not valid JSON; delete it or use another output folder.") from None
        for key, value in settings.items():
            if key in previous and previous[key] != value:
                raise EvalError(
                    f"{run_path.parent} holds generations made with {key}={previous[key]!r}, not {value!r}; "
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
    prompt_style: PromptStyle = "zero_shot",
    max_new_tokens: int = 512,
    batch_size: int = 16,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    metric: str = "auto",
    generate_fn: Callable | None = None,
    progress: bool = True,
    run_info: dict | None = None,
    plots: bool = True,
    generate_kwargs: dict | None = None,
) -> dict:
    """Generate `samples` solutions per problem (resuming from `out_dir`), score them, write and return the summary.

    batch_size: problems per generation batch (each batch is `batch_size * samples` rows) and per JSONL flush;
        problems are batched in order of prompt length, so a batch holds similar lengths.
    metric: the answer reading behind `accuracy` and maj@k: strict, flexible, math_verify, or auto (math_verify
        when some gold answer is LaTeX and math-verify is installed, else strict).
    generate_fn: `jaxpatience.generate` by default; any function with its signature (tests pass a fake).
    run_info: facts about the run (model path, dataset name) stored in run.json and the summary; a rerun into
        the same folder must match them, as it must match the generation settings.
    generate_kwargs: passed on to generate_fn as they are, e.g. {"mesh": mesh} or {"stop_tokens": [...]}.
    Returns the summary dict (also written to out_dir/summary.json); see `summarize` for its keys.
    """
    start = time.perf_counter()
    problems = [as_problem(problem) for problem in problems]
    _validate(problems, prompt_style, max_new_tokens, batch_size, samples, temperature, metric)
    metric = resolve_metric(metric, problems)
    if generate_fn is None:
        from jaxpatience.decode import generate as generate_fn
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    style_name = prompt_style if isinstance(prompt_style, str) else f"custom:{getattr(prompt_style, '__name__', '?')}"
    settings = dict(run_info or {}, prompt_style=style_name, max_new_tokens=max_new_tokens, samples=samples,
                    temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)  # fmt: skip
    if temperature > 0:  # sampled streams depend on how problems are batched: a resume must batch alike
        settings["batch_size"] = batch_size
    path = out_dir / "generations.jsonl"
    _check_settings(out_dir / "run.json", settings, path)
    records = _resume(path, samples)
    done = {record["id"] for record in records}
    todo = [problem for problem in problems if problem.id not in done]
    position = {problem.id: index for index, problem in enumerate(problems)}
    latex = any(not answers.is_numeric(problem.answer) for problem in problems)  # MATH: ask for \boxed{} answers
    prompts = {problem.id: build_prompt(problem, tokenizer, prompt_style, latex) for problem in todo}
    lengths = _prompt_lengths(model, tokenizer, prompts, max_new_tokens)
    # Similar lengths share a batch: less padding, and one compiled shape per length bucket. The sort is stable
    # and the done problems are a prefix of it, so a resumed run forms the same batches as an uninterrupted one.
    todo.sort(key=lambda problem: lengths[problem.id])
    # Running accuracy for the progress bar: every sample scored so far, resumed ones included.
    scored = [bool(record["correct"].get(metric)) for record in records if record["id"] in position]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), unit="problem", desc="eval",
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    use_math_verify = answers.math_verify_available() is None
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    num_samples=samples, batch_size=batch_size * samples, progress=False)  # fmt: skip
    sampling.update(generate_kwargs or {})
    shapes_seen: set[tuple[int, int]] = set()
    for first in range(0, len(todo), batch_size):
        batch = todo[first : first + batch_size]
        # The decoder pads prompts to a power of two (>= 16): a batch of a shape new to this run compiles first.
        shape = (max(16, 1 << (max(lengths[problem.id] for problem in batch) - 1).bit_length()), len(batch))
        new = _generate_batch(
            generate_fn, model, tokenizer, batch, [prompts[problem.id] for problem in batch],
            seed=_batch_seed(seed, position[batch[0].id]), warmup=shape not in shapes_seen, sampling=sampling,
            prompt_style=prompt_style, use_math_verify=use_math_verify,
        )  # fmt: skip
        shapes_seen.add(shape)
        _append(path, new)
        records += new
        scored += [bool(record["correct"].get(metric)) for record in new]
        bar.update(len(batch))
        bar.set_postfix({"acc": f"{np.mean(scored):.3f}"})
    bar.close()

    summary = summarize(records, problems, samples=samples, metric=metric)
    summary.update(settings=settings, out_dir=str(out_dir))
    summary["timing"].update(wall_s=time.perf_counter() - start, new_problems=len(todo))
    if plots:
        summary["plots"] = write_plots(summary, out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _generate_batch(generate_fn: Callable, model, tokenizer, batch: list[Problem], prompts: list, *, seed: int,
                    warmup: bool, sampling: dict, prompt_style: PromptStyle,
                    use_math_verify: bool) -> list[dict]:  # fmt: skip
    """Generate one batch and return its records (all samples of every problem in it)."""
    batch_start = time.perf_counter()
    results = generate_fn(model, tokenizer, prompts, seed=seed, **sampling)  # [problems][samples] Generation
    timing = {
        "batch": f"{time.time_ns()}-{batch[0].id}",  # identifies the batch, so its time is counted once
        "batch_s": time.perf_counter() - batch_start,
        "warmup": warmup,  # its time includes jit compilation
    }
    return [
        _make_record(problem, s, sample, timing, prompt_style, tokenizer, use_math_verify)
        for problem, per_problem in zip(batch, results, strict=True)
        for s, sample in enumerate(per_problem)
    ]


def _resume(path: Path, samples: int) -> list[dict]:
    """The records already in generations.jsonl, whole problems only: a torn last line (a crash during a write)
    or a problem with missing samples is dropped, and the file is rewritten without them."""
    records, torn = read_generations(path)
    records, dropped = complete_records(records, samples)
    if torn or dropped:
        _rewrite(path, records)
        print(f"{path}: dropped {dropped + torn} incomplete record(s) of an interrupted run.", file=sys.stderr)
    return records


def _batch_seed(seed: int, first_index: int) -> int:
    """The decoder's seed for a batch: fixed by the run's seed and the batch's first problem, so a resumed run
    draws the same samples as an uninterrupted one (with the same batch size)."""
    return (seed * 1_000_003 + first_index) % 2**32


def _validate(problems, prompt_style, max_new_tokens, batch_size, samples, temperature, metric) -> None:
    checks = [
        (len(problems) > 0, "there are no problems to evaluate"),
        (len({p.id for p in problems}) == len(problems), "problem ids must be unique"),
        (callable(prompt_style) or prompt_style in PROMPT_STYLES,
         f"unknown prompt style {prompt_style!r}: use one of {', '.join(PROMPT_STYLES)}"),
        (isinstance(max_new_tokens, int) and max_new_tokens >= 1, f"max_new_tokens must be >= 1, not {max_new_tokens}"),
        (isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be >= 1, not {batch_size}"),
        (isinstance(samples, int) and samples >= 1, f"samples must be >= 1, not {samples}"),
        (samples == 1 or temperature > 0,
         f"samples={samples} at temperature 0 would be {samples} identical greedy answers; set a temperature"),
        (metric in (*METRICS, "auto"), f"unknown metric {metric!r}: use auto, {', '.join(METRICS)}"),
    ]  # fmt: skip
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
    latex = any(not answers.is_numeric(problem.answer) for problem in problems)
    return "math_verify" if latex and not unavailable else "strict"


def _prompt_lengths(model, tokenizer, prompts: dict[str, str | list[int]], max_new_tokens: int) -> dict[str, int]:
    """Prompt lengths in tokens by problem id; names the first problem whose prompt + max_new_tokens does not fit
    the model's context (before anything is generated)."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    lengths = {}
    for problem_id, prompt in prompts.items():
        if not isinstance(prompt, str):
            lengths[problem_id] = len(prompt)  # a callable prompt style may return token ids
        elif tokenizer is not None:
            lengths[problem_id] = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        else:
            lengths[problem_id] = len(prompt)  # no tokenizer (a fake generator): characters, for sorting only
        if context is not None and lengths[problem_id] + max_new_tokens > context:
            raise EvalError(
                f"problem {problem_id}: its prompt has {lengths[problem_id]} tokens, and with max_new_tokens="
                f"{max_new_tokens} it runs past the model's context of {context}; lower --max-new-tokens or use a "
                f"shorter prompt style."
            )
    return lengths


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
# The summary.


def summarize(records: Sequence[dict], problems: Sequence[Problem], *, samples: int, metric: str) -> dict:
    """Scores, maj@k, lengths, behaviours and timing of the records of `problems` (a pure function of both).

    Scores are recomputed from each response and the problem's gold answer, so a summary never depends on how
    the records were produced (in one run or several). Intervals are Wilson score intervals over problems.
    """
    gold = {problem.id: problem.answer for problem in problems}
    by_problem: dict[str, list[dict]] = {problem.id: [] for problem in problems}
    for record in records:
        if record["id"] in by_problem:
            by_problem[record["id"]].append(record)
    by_problem = {pid: sorted(rs, key=lambda r: r["sample"]) for pid, rs in by_problem.items() if rs}
    missing = len(problems) - len(by_problem)
    if not by_problem:
        raise EvalError("no generations to summarize.")
    unavailable = answers.math_verify_available()
    use_math_verify = unavailable is None or metric == "math_verify"
    scores = {pid: [answers.score_response(r["response"], gold[pid], use_math_verify=use_math_verify) for r in rs]
              for pid, rs in by_problem.items()}  # fmt: skip
    n = len(by_problem)

    def accuracy_of(name: str) -> dict:
        # Mean over samples within a problem, then over problems: with samples=1 the plain accuracy.
        per_problem = [np.mean([bool(s["correct"][name]) for s in ss]) for ss in scores.values()]
        correct = float(np.sum(per_problem))
        low, high = answers.wilson_interval(correct, n)
        return {"accuracy": correct / n, "ci95": [low, high], "correct": correct, "n": n}

    metrics = {name: accuracy_of(name) for name in ("strict", "flexible")}
    metrics["math_verify"] = accuracy_of("math_verify") if use_math_verify else {"unavailable": unavailable}
    # maj@k votes on extracted answers; math-verify has no canonical form to vote with, so it uses the strict one.
    vote_on = "flexible" if metric == "flexible" else "strict"
    voters = [[s[vote_on] for s in ss] for ss in scores.values()]
    golds = [gold[pid] for pid in scores]
    equal = _math_verify_answers_equal if metric == "math_verify" else answers.answers_equal
    maj = {str(k): answers.maj_at_k(voters, golds, k, equal=equal) for k in answers.powers_of_two_up_to(samples)}
    pass_at_k = float(np.mean([any(s["correct"][metric] for s in ss) for ss in scores.values()]))

    flat = [(r, s) for pid in by_problem for r, s in zip(by_problem[pid], scores[pid], strict=True)]
    lengths = _length_stats(flat, metric)
    return {
        "metric": metric,
        "accuracy": metrics[metric]["accuracy"],
        "accuracy_ci95": metrics[metric]["ci95"],
        "ci_method": "wilson score interval, 95%, over problems",
        "n_problems": n,
        "missing_problems": missing,
        "samples": samples,
        "metrics": metrics,
        "maj_at_k": maj,
        "maj_at_k_votes_on": vote_on,
        "pass_at_k": pass_at_k,
        "mean_response_tokens": lengths["mean"],
        "median_response_tokens": lengths["median"],
        "response_tokens": lengths,
        "behaviour": _behaviour_stats([record["response"] for record, _ in flat]),
        "timing": _timing_stats([record for record, _ in flat], n),
    }


def _length_stats(flat: list[tuple[dict, dict]], metric: str) -> dict:
    """Response lengths in tokens (the "patience" measure): mean, median, tail, by correctness, histogram."""
    lengths = np.array([record["response_tokens"] for record, _ in flat])
    correct = np.array([bool(score["correct"][metric]) for _, score in flat])
    counts, edges = np.histogram(lengths, bins=min(30, max(1, len(set(lengths.tolist())))))
    return {
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "p90": float(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
        "mean_correct": float(lengths[correct].mean()) if correct.any() else None,
        "mean_incorrect": float(lengths[~correct].mean()) if (~correct).any() else None,
        "truncated_share": float(np.mean([record.get("finish_reason") == "length" for record, _ in flat])),
        "histogram": {"counts": counts.tolist(), "bin_edges": edges.tolist()},
    }


def _behaviour_stats(responses: list[str]) -> dict:
    """Shares of responses that verify their work or backtrack, overall and per marker phrase."""
    markers = [set(answers.behaviour_markers(response)) for response in responses]
    names = (*answers.VERIFY_MARKERS, *answers.BACKTRACK_MARKERS)
    return {
        "verify_share": float(np.mean([bool(found & set(answers.VERIFY_MARKERS)) for found in markers])),
        "backtrack_share": float(np.mean([bool(found & set(answers.BACKTRACK_MARKERS)) for found in markers])),
        "markers": {name: float(np.mean([name in found for found in markers])) for name in names},
    }


def _timing_stats(records: list[dict], n_problems: int) -> dict:
    """Generation time and throughput, each batch's time counted once (records of a batch share its time)."""
    batches: dict[str, dict] = {}  # batch key -> {"s": seconds, "warmup": compiled first?, "tokens": generated}
    for record in records:
        batch = batches.setdefault(
            record["batch"], {"s": record["batch_s"], "warmup": record.get("warmup"), "tokens": 0}
        )
        batch["tokens"] += record.get("generated_tokens", record["response_tokens"])
    seconds = float(sum(b["s"] for b in batches.values()))
    tokens = int(sum(b["tokens"] for b in batches.values()))
    warm = [b for b in batches.values() if not b["warmup"]]
    warm_s = sum(b["s"] for b in warm)
    return {
        "generation_s": seconds,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        # Without the batches whose shape was new to their run: their time includes jit compilation.
        "tokens_per_s_warm": sum(b["tokens"] for b in warm) / warm_s if warm_s > 0 else None,
        "problems_per_s": n_problems / seconds if seconds > 0 else None,
    }


def _math_verify_answers_equal(predicted: str | None, gold: str) -> bool:
    """Equality of a voted (extracted) answer with the gold: canonical strings, else math-verify on the pair."""
    if predicted is None:
        return False
    return answers.answers_equal(predicted, gold) or bool(answers.math_verify_equal(f"${predicted}$", gold))


def write_plots(summary: dict, out_dir: Path) -> dict:
    """response_length.png (histogram) and, with several samples, maj_at_k.png (the test-time-compute curve)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    paths = {}
    hist = summary["response_tokens"]["histogram"]
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.stairs(hist["counts"], hist["bin_edges"], fill=True)
    ax.axvline(summary["mean_response_tokens"], color="k", linestyle="--", label="mean")
    ax.set(xlabel="response length (tokens)", ylabel="responses", title="Response length")
    ax.legend()
    paths["response_length"] = str(out_dir / "response_length.png")
    fig.savefig(paths["response_length"], dpi=100, bbox_inches="tight")
    if summary["samples"] > 1:
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ks = [int(k) for k in summary["maj_at_k"]]
        ax.plot(ks, [summary["maj_at_k"][str(k)] for k in ks], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])  # 1, 2, 4 rather than 2^0, 2^1, 2^2
        ax.set_ylim(0, 1)
        ax.set(xlabel="samples k", ylabel="maj@k accuracy", title="Test-time compute: majority vote")
        paths["maj_at_k"] = str(out_dir / "maj_at_k.png")
        fig.savefig(paths["maj_at_k"], dpi=100, bbox_inches="tight")
    return paths


# ---------------------------------------------------------------------------------------------------
# Reports.


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    low, high = summary["accuracy_ci95"]
    lines = [f"accuracy ({summary['metric']}): {summary['accuracy']:.3f}  [95% CI {low:.3f}-{high:.3f}]  "
             f"n={summary['n_problems']}"]  # fmt: skip
    for name, m in summary["metrics"].items():
        lines.append(f"  {name:<12} {m['accuracy']:.3f}" if "accuracy" in m else f"  {name:<12} ({m['unavailable']})")
    if summary["samples"] > 1:
        lines.append("  maj@k " + "  ".join(f"@{k}={v:.3f}" for k, v in summary["maj_at_k"].items()))
    t = summary["response_tokens"]
    lines.append(
        f"response tokens: mean {t['mean']:.1f}, median {t['median']:.1f}, truncated {t['truncated_share']:.1%}"
    )
    b = summary["behaviour"]
    lines.append(f"verify {b['verify_share']:.1%}, backtrack {b['backtrack_share']:.1%}")
    timing = summary["timing"]
    if timing.get("tokens_per_s"):
        warm = f" ({timing['tokens_per_s_warm']:.1f} warm)" if timing.get("tokens_per_s_warm") else ""
        lines.append(f"generation {timing['generation_s']:.1f}s, {timing['tokens_per_s']:.1f} tokens/s{warm}"
                     + (f", wall {timing['wall_s']:.1f}s" if "wall_s" in timing else ""))  # fmt: skip
    return "\n".join(lines)


def compare_table(before: dict, after: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """A before/after table of two summaries: the headline numbers and their change (shares in points)."""

    def get(summary: dict, *keys):
        for key in keys:
            summary = summary.get(key) if isinstance(summary, dict) else None
        return summary

    def show(value, is_share: bool) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f}%" if is_share else (f"{value:.1f}" if isinstance(value, float) else str(value))

    def change(a, b, is_share: bool) -> str:
        if a is None or b is None:
            return ""
        return (
            f"{100 * (b - a):+.1f} pts"
            if is_share
            else (f"{b - a:+.1f}" if isinstance(b - a, float) else f"{b - a:+d}")
        )

    several = max(before.get("samples", 1), after.get("samples", 1)) > 1
    ks = sorted({*before.get("maj_at_k", {}), *after.get("maj_at_k", {})}, key=int) if several else []
    rows = [  # (label, keys into the summary, is a share)
        (f"accuracy ({before.get('metric')} / {after.get('metric')})", ("accuracy",), True),
        *[(f"  {name}", ("metrics", name, "accuracy"), True) for name in METRICS],
        *[(f"maj@{k}", ("maj_at_k", k), True) for k in ks],
        ("mean response tokens", ("mean_response_tokens",), False),
        ("median response tokens", ("median_response_tokens",), False),
        ("truncated share", ("response_tokens", "truncated_share"), True),
        ("verify share", ("behaviour", "verify_share"), True),
        ("backtrack share", ("behaviour", "backtrack_share"), True),
        ("tokens/s (warm)", ("timing", "tokens_per_s_warm"), False),
        ("problems", ("n_problems",), False),
    ]
    table = [("", *names, "change")]
    for label, keys, is_share in rows:
        a, b = get(before, *keys), get(after, *keys)
        table.append((label, show(a, is_share), show(b, is_share), change(a, b, is_share)))
    # The 95% interval under the accuracy, so a reader sees at once whether the change is more than noise.
    ci = [get(s, "accuracy_ci95") for s in (before, after)]
    table.insert(2, ("  95% CI", *("-" if c is None else f"{100 * c[0]:.1f}-{100 * c[1]:.1f}" for c in ci), ""))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)])
             for row in table]  # fmt: skip
    return "\n".join(lines)


def load_summary(path: str | Path) -> dict:
    """A summary.json, given the file or the output folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise EvalError(f"summary file {path} does not exist.")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}).") from None
    if not isinstance(summary, dict) or "accuracy" not in summary:
        raise EvalError(f"{path} is not an evaluation summary (it has no 'accuracy').")
    return summary


# ---------------------------------------------------------------------------------------------------
# Command line: `jaxpatience eval ...` (cli.py dispatches here).


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxpatience eval",
        description="Evaluate a Qwen2 checkpoint on GSM8K, MATH, gsm_symbolic or a local file of problems.",
    )
    parser.add_argument("--model", help="HF checkpoint directory or .gguf file")
    parser.add_argument("--adapter", help="LoRA adapter checkpoint to apply on top of --model")
    parser.add_argument("--dataset", help="gsm8k, math (MATH-500), gsm_symbolic, or a .jsonl/.json/.parquet file")
    parser.add_argument("--split", default="test", help="hub dataset split (default: test)")
    parser.add_argument("--limit", type=int, help="evaluate the first N problems")
    parser.add_argument("--batch-size", type=int, default=16, help="problems per generation batch (default: 16)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="default: 512")
    parser.add_argument("--samples", type=int, default=1, help="solutions per problem, for maj@k (default: 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, and gsm_symbolic's generator seed")
    parser.add_argument("--prompt-style", default="zero_shot", choices=PROMPT_STYLES)
    parser.add_argument("--metric", default="auto", choices=("auto", *METRICS), help="the reading behind accuracy")
    parser.add_argument("--dtype", default="float32", help="weight dtype: float32 or bfloat16 (default: float32)")
    parser.add_argument("--mesh", help="e.g. data=8 or fsdp=4,tensor=2: weights and batches sharded over devices")
    parser.add_argument("--out", help="output folder (rerunning into it resumes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print a before/after table of two summaries")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (load_summary(p) for p in args.compare)
        print(compare_table(before, after, names=tuple(Path(p).name or str(p) for p in args.compare)))
        return 0
    for flag in ("model", "dataset", "out"):
        if getattr(args, flag) is None:
            parser.error(f"--{flag} is required (or use --compare A B)")
    problems = load_problems(args.dataset, split=args.split, limit=args.limit, seed=args.seed)
    load_adapter = _adapter_loader() if args.adapter else None

    from jaxpatience import sharding
    from jaxpatience.weights import load_pretrained

    mesh = sharding.make_mesh(**sharding.parse_mesh(args.mesh)) if args.mesh else None
    model, tokenizer = load_pretrained(args.model, dtype=args.dtype, mesh=mesh)
    if load_adapter is not None:
        model = load_adapter(model, args.adapter) or model
    run_info = {"model": str(Path(args.model).resolve()), "adapter": args.adapter, "dataset": args.dataset,
                "split": args.split, "dataset_seed": args.seed if args.dataset == "gsm_symbolic" else None}  # fmt: skip
    summary = evaluate(
        model, tokenizer, problems, out_dir=args.out, prompt_style=args.prompt_style,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, samples=args.samples,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, metric=args.metric,
        progress=not args.no_progress, run_info=run_info, generate_kwargs={"mesh": mesh} if mesh else None,
    )  # fmt: skip
    print(format_summary(summary))
    print(f"wrote {Path(args.out) / 'summary.json'}")
    return 0


def _adapter_loader() -> Callable:
    """The LoRA checkpoint loader, once lora.py has one; until then a clear refusal."""
    from jaxpatience import lora

    loader = getattr(lora, "load_adapter", None)
    if loader is None:
        raise EvalError(
            "--adapter is not supported yet (jaxpatience.lora has no adapter loader); merge the adapter into "
            "the base checkpoint and pass that as --model."
        )
    return loader
