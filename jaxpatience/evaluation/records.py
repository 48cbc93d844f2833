"""The evaluator's files: one record per (problem, sample) in generations.jsonl, and the run's settings in run.json.

A rerun into the same folder resumes it: the records of whole problems are kept (`complete_records`), checked to
belong to the same problems (`done_ids`) and to have been made with the same settings (`check_settings`); the
evaluation loop (evaluate.py) generates the rest and appends their records (`make_record`). The folder is an eval
output (durability/outputs.py): `claim_out_dir` refuses another command's folder, someone's files, or an input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxpatience.config import SamplingConfig
from jaxpatience.data import answers
from jaxpatience.data.problems import Problem, cut_at_stop_strings
from jaxpatience.durability import identity, outputs
from jaxpatience.durability.store import JsonlStore
from jaxpatience.evaluation.summary import EvalError

PromptStyle = str | Callable[[Problem], str]
GENERATION_KEYS = ("id", "sample")  # what makes a generations.jsonl line a whole record

# run.json of earlier versions: settings then named otherwise, and the value a setting added since then had.
LEGACY_NAMES = {"samples": "num_samples", "batch_size": "generation_batch_size"}
LEGACY_VALUES = {"answer_prefix": "", "stop": None}


def claim_out_dir(out_dir: str | Path, run_info: dict | None) -> outputs.Output:
    """Check that `out_dir` may hold this evaluation (writes nothing): not another command's folder, not a
    non-empty folder of someone else's, not the model, adapter or problems file it reads (`run_info`)."""
    info = run_info or {}
    inputs = {key: info.get(key) for key in ("model", "adapter", "dataset")}
    return outputs.claim_folder(out_dir, "eval", "eval", key="out_dir", inputs=inputs)


# ---------------------------------------------------------------------------------------------------
# The generations file: whole problems, the same problems.


def drop_incomplete(store: JsonlStore, samples: int) -> None:
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


def done_ids(store: JsonlStore, problems: Sequence[Problem], out_dir: Path, say: bool) -> set[str]:
    """The ids of the problems already in the store, checked to be the same problems (gold answer, question);
    says how many of this run's are done."""
    by_id = {problem.id: problem for problem in problems}
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
        print(f"{already} of {len(problems)} problems already done ({store.path}); generating the rest.")
    return done


def question_sha(question: str) -> str:
    """A short digest of a problem's question, stored with each generation (a rerun checks it is the same)."""
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:12]


def make_record(
    problem: Problem,
    sample_index: int,
    generation,
    timing: dict,
    prompt_style: PromptStyle,
    tokenizer,
    use_math_verify: bool,
) -> dict:
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
# The run's settings (run.json).


def run_settings(
    run_info: dict | None, prompt_style: PromptStyle, answer_prefix: str, sampling: SamplingConfig
) -> dict:
    """What the generations depend on (run.json): a rerun into the same folder must have the same."""
    style = prompt_style if isinstance(prompt_style, str) else f"custom:{getattr(prompt_style, '__name__', '?')}"
    # Not generation_batch_size: each problem's samples draw from keys fixed by its index in the set, whatever the
    # batching, so a resume may use another batch size.
    settings = dict(run_info or {}, prompt_style=style, answer_prefix=answer_prefix, **dataclasses.asdict(sampling))
    return json.loads(json.dumps(settings))  # tuples -> lists, as run.json will hold them


def check_settings(run_path: Path, settings: dict, store: JsonlStore) -> None:
    """Record the run's settings, or refuse to resume a folder whose generations were made with other settings.
    Called with the generations store open (locked), so a second run cannot rewrite run.json under the first."""
    if run_path.exists() and store.records:
        try:
            previous = json.loads(run_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise EvalError(f"{run_path} is not valid JSON; delete it or use another output folder.") from None
        previous = {LEGACY_NAMES.get(key, key): value for key, value in previous.items()}
        identity.check_same_inputs(
            previous.get("inputs"),
            settings.get("inputs", {}),
            run_path.parent,
            "use another output folder or delete it to start over",
        )
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
