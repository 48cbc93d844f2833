"""An evaluation's summary: accuracy per answer reading with 95% Wilson intervals, maj@k, response lengths,
behaviour markers and timing, from the records of generations.jsonl (evaluate.py writes them).

Pure functions of the records and the problems; answer reading itself is data/answers.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxpatience.data import answers
from jaxpatience.data.problems import Problem


class EvalError(ValueError):
    """Bad evaluation settings or output folder; the message is one sentence."""


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
    scores = {
        pid: [answers.score_response(r["response"], gold[pid], use_math_verify=use_math_verify) for r in rs]
        for pid, rs in by_problem.items()
    }
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
