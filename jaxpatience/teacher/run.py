"""Patience preference pairs from a teacher model behind any OpenAI-compatible chat-completions endpoint.

For each problem `{id, question, answer}` the teacher is asked twice (Patience, arXiv 2411.13082):
  1. for a concise, correct solution: the pair's `rejected` side;
  2. in a second request that quotes (1), to rewrite it patiently, every step explicit and checked: `chosen`.
Every pair passes one gate (`make_pair`, `_solution`): both replies must state a final answer after a marker
("The answer is N.", `####`, `\\boxed{}`) equal to the gold one, neither may copy the template's placeholder
answer line, and the rewrite must differ from what it rewrites (whitespace aside) and be more detailed: longer and
with more steps (lines or sentences), so that a weak teacher's "patient" one-liner never becomes `chosen` over a
longer derivation. Otherwise the problem is dropped and counted under its own reason, never kept.

Output (one JSON object per line, the layout `PairLoader` reads):
  {"id", "prompt" (the question), "chosen", "rejected", "answer", "teacher_model", "usage"}
Records are appended and fsynced one by one as problems finish (durability/store.py), so a crash or Ctrl-C loses
nothing; a rerun skips ids already written (the store cuts a torn last line first). Dropped problems go to
`OUT.rejected.jsonl` with their reason and a `transient` flag. A rerun asks again for the transient ones (replies
that were not chat completions, timeouts, 429/5xx after every retry), never for those dropped for their content
(a wrong answer, a refusal, an unchanged rewrite) unless `retry_dropped`; it first rewrites the rejected file
without the records of the problems it asks again, so the file holds at most one record per id, and none for a
problem that has its pair. Before anything is written, a rerun checks that every record already there was made
for the same problem (its question and gold answer, not only its id). The run's summary goes to
`OUT.summary.json`. No file or message holds the API key.

This module is the run and the command line; the rest lives beside it and is re-exported here:
  teacher_config   TeacherConfig (the settings of a run), TeacherError, public_url, redact
  teacher_prompts  load_prompts, build_messages, final_answer, reaches_gold
  teacher_client   chat (retries with backoff, fail-fast), backoff_delay, Drop, GaveUp
This module never imports JAX.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from jaxpatience.config import ConfigError, command_parser, config_from_args
from jaxpatience.data.answers import answers_equal
from jaxpatience.data.problems import Problem, load_file
from jaxpatience.durability import outputs
from jaxpatience.durability import progress as progress_bars
from jaxpatience.durability.store import JsonlStore, read_jsonl
from jaxpatience.teacher.client import Drop, GaveUp, Reply, RunState, backoff_delay, chat, open_client
from jaxpatience.teacher.config import OPENAI_URL, TeacherConfig, TeacherError, is_url, public_url, redact
from jaxpatience.teacher.prompts import (
    DEFAULT_PROMPTS,
    build_messages,
    copied_placeholder,
    detail,
    final_answer,
    load_prompts,
    reaches_gold,
)

__all__ = [
    "Drop",
    "GaveUp",
    "Plan",
    "TeacherConfig",
    "TeacherError",
    "backoff_delay",
    "build_messages",
    "build_pairs",
    "chat",
    "check_records",
    "dry_run",
    "estimate_cost",
    "final_answer",
    "format_summary",
    "is_transient",
    "load_prompts",
    "main",
    "make_pair",
    "parse_command",
    "plan_run",
    "reaches_gold",
    "resume_line",
    "side_paths",
]

# US dollars per 1M tokens (input, output), OpenAI list prices; the longest matching prefix of the model name wins,
# so "gpt-4o-mini-2024-07-18" is priced as gpt-4o-mini. Override with price_in / price_out.
PRICES_PER_MILLION = {"gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60)}
DRY_RUN_SHOWN = 3
REQUIRED = ("id",)  # what makes a line of the pairs or rejected file a whole record (see durability/store.py)


def estimate_cost(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    price_in: float | None = None,
    price_out: float | None = None,
) -> float | None:
    """Dollars for this many tokens, or None when the model's price is unknown and not given."""
    known = max((name for name in PRICES_PER_MILLION if model.startswith(name)), key=len, default=None)
    default_in, default_out = PRICES_PER_MILLION.get(known, (None, None))
    price_in = default_in if price_in is None else price_in
    price_out = default_out if price_out is None else price_out
    if price_in is None or price_out is None:
        return None
    return (prompt_tokens * price_in + completion_tokens * price_out) / 1e6


def side_paths(out: Path) -> tuple[Path, Path]:
    """`pairs.jsonl` -> (`pairs.rejected.jsonl`, `pairs.summary.json`)."""
    return out.with_name(out.stem + ".rejected.jsonl"), out.with_name(out.stem + ".summary.json")


def _out_path(config: TeacherConfig) -> Path:
    """`config.out`, checked before anything is written: it and the files beside it must be files to write."""
    if not config.out:
        raise ConfigError("pairs: out is not set (--out ... or out=...).")
    out = Path(config.out)
    for path in (out, *side_paths(out)):
        if path.is_dir():
            raise TeacherError(f"pairs: out {out}: {path} is a directory; out names the pairs .jsonl file to write.")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise TeacherError(f"pairs: out {out}: {blocking} is a file, not a directory.")
    # The pairs file and the rejected file are this command's when their records are (durability/outputs.py);
    # none of the three may be an input or other than a regular file.
    inputs = {"--problems": config.problems, "--prompts": config.prompts}
    rejected, summary = side_paths(out)
    for path, keys in ((out, ("id", "prompt", "chosen", "rejected")), (rejected, ("id", "reason")), (summary, None)):
        outputs.claim_file(path, "pairs", record_keys=keys, key="--out" if path == out else "--out's", inputs=inputs)
    return out


def _ids(records: Sequence[dict]) -> set[str]:
    return {str(record["id"]) for record in records}


def check_records(problems: Sequence[Problem], out: Path) -> None:
    """Refuse an output whose records (pairs or rejected) were made for other problems under the same ids: a record
    must hold the question and gold answer of the problem with its id. Reads only; records of ids not among
    `problems` are left alone (they may lie beyond --limit)."""
    by_id = {problem.id: problem for problem in problems}
    for path, question_key, needed in ((out, "prompt", True), (side_paths(out)[0], "question", False)):
        for line, record in enumerate(read_jsonl(path, REQUIRED), start=1):
            problem = by_id.get(str(record["id"]))
            if problem is None:
                continue
            if record.get(question_key, problem.question if not needed else None) != problem.question:
                what = "question"
            elif str(record.get("answer", problem.answer)) != problem.answer:
                what = "gold answer"
            else:
                continue
            raise TeacherError(
                f"pairs: {path}, record {line}, was made for another problem {problem.id!r} (its {what} differs "
                f"from the problems file's); use another --out, or the problems it was made from."
            )


def _same_text(first: str, second: str) -> bool:
    """Whether two solutions are the same text once whitespace (line breaks, indentation) is set aside."""
    return first.split() == second.split()


# ---------------------------------------------------------------------------------------------------
# One problem: two requests, both checked.


async def make_pair(state: RunState, prompts: dict, problem: Problem) -> dict:
    """The concise and the patient solution of one problem as a pair record; raises Drop when unusable."""
    concise = await _solution(state, prompts, build_messages(prompts, problem.question), problem, "concise")
    messages = build_messages(prompts, problem.question, concise.content)
    patient = await _solution(state, prompts, messages, problem, "patient", concise=concise.content)
    texts = {"concise": concise.content, "patient": patient.content}
    if _same_text(patient.content, concise.content):  # chosen == rejected: a pair that teaches nothing
        raise Drop("identical", "the patient rewrite is the concise solution unchanged.", **texts)
    (patient_chars, patient_steps), (concise_chars, concise_steps) = detail(patient.content), detail(concise.content)
    if patient_chars <= concise_chars or patient_steps <= concise_steps:  # an inverted pair would teach brevity
        raise Drop(
            "not_more_detailed",
            f"the patient rewrite ({patient_chars} characters, {patient_steps} steps) is not longer and with more "
            f"steps than the concise solution ({concise_chars} characters, {concise_steps} steps).",
            **texts,
        )
    return {
        "id": problem.id,
        "prompt": problem.question,
        "chosen": patient.content,
        "rejected": concise.content,
        "answer": problem.answer,
        "teacher_model": patient.model or state.config.model,
        "usage": {
            "prompt_tokens": concise.prompt_tokens + patient.prompt_tokens,
            "completion_tokens": concise.completion_tokens + patient.completion_tokens,
        },
    }


async def _solution(
    state: RunState, prompts: dict, messages: list[dict], problem: Problem, side: str, **context
) -> Reply:
    """One side of the pair, checked; a drop keeps the texts (`context`: the concise one) for inspection."""
    reply = await chat(state, messages)
    texts = {**context, side: reply.content}
    if reply.refusal:
        raise Drop(f"{side}_refused", f"the model declined: {reply.refusal[:200]!r}.", **texts)
    if reply.finish_reason == "length":
        raise Drop(f"{side}_truncated", "the reply hit the token limit.", **texts)
    copied = copied_placeholder(reply.content, prompts)
    if copied is not None:
        raise Drop(f"{side}_placeholder", f"the reply copies the template's answer line {copied!r}.", **texts)
    found = final_answer(reply.content, problem.answer)
    if found is None:
        raise Drop(f"{side}_no_answer", "no final answer: no 'The answer is', '####' or \\boxed{} with one.", **texts)
    if not answers_equal(found, problem.answer):
        raise Drop(f"{side}_wrong", f"final answer {found!r}, gold {problem.answer!r}.", **texts)
    return reply


# ---------------------------------------------------------------------------------------------------
# What a (re)run asks.


def is_transient(record: dict) -> bool:
    """Whether a rejected record was a transient failure, which a rerun asks again.

    Files of earlier versions lack the flag; "malformed" was the only transient reason they recorded.
    """
    flag = record.get("transient")
    return flag if isinstance(flag, bool) else record.get("reason") == "malformed"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run over `selected` problems does, given the records of earlier runs."""

    todo: list[Problem]  # to ask: those never asked, then those asked again, each in the problems' order
    done: int  # selected problems that have their pair already
    asked_again: int  # of `todo`: dropped before, asked again (transient drops; every drop with retry_dropped)
    skipped: int  # selected problems dropped before for their content, not asked
    rejects: list[dict]  # the rejected file as it should be now: the latest record per id, none for a done id
    # or one in `todo` (a problem asked again gets a new record if dropped again)


def plan_run(selected: Sequence[Problem], pairs: Sequence[dict], rejects: Sequence[dict], retry_dropped: bool) -> Plan:
    """The plan of a run: a pure function of the problems and the two files' records."""
    done = _ids(pairs)
    latest = {str(record["id"]): record for record in rejects}  # the last record of an id wins
    again = {key for key, record in latest.items() if retry_dropped or is_transient(record)}
    fresh = [p for p in selected if p.id not in done and p.id not in latest]
    retried = [p for p in selected if p.id not in done and p.id in again]
    asking = {p.id for p in fresh + retried}
    return Plan(
        todo=fresh + retried,  # problems never asked first: they show whether the endpoint works at all
        done=sum(p.id in done for p in selected),
        asked_again=len(retried),
        skipped=sum(p.id in latest and p.id not in done and p.id not in again for p in selected),
        rejects=[record for key, record in latest.items() if key not in done and key not in asking],
    )


def resume_line(plan: Plan, total: int, retry_dropped: bool) -> str:
    """What a rerun does, in one line ("" for a first run)."""
    if not (plan.done or plan.asked_again or plan.skipped):
        return ""
    which = "earlier drops" if retry_dropped else "transient drops"
    line = f"pairs: {plan.done} of {total} problems already done, {plan.asked_again} {which} asked again"
    if plan.skipped:
        line += f", {plan.skipped} dropped for their content skipped (--retry-dropped asks them too)"
    return line + "."


# ---------------------------------------------------------------------------------------------------
# The run.


def build_pairs(
    problems: Sequence[Problem], config: TeacherConfig, *, api_key: str = "EMPTY", progress: bool = True
) -> dict:
    """Write a pair to `config.out` for every problem not there yet (nor dropped for its content); returns the
    summary.

    `problems` come loaded (`config.problems` names their file for the command line only). The summary is also
    saved beside the output, even when the run stops on an error or Ctrl-C.
    """
    out = _out_path(config)
    prompts = load_prompts(config.prompts)
    check_records(problems, out)
    rejected_path, summary_path = side_paths(out)
    selected = list(problems[: config.limit] if config.limit else problems)
    # Opening a store locks it (a second run on the same output is refused) and cuts a torn last line.
    with JsonlStore(out, required=REQUIRED) as pairs, JsonlStore(rejected_path, required=REQUIRED) as rejects:
        plan = plan_run(selected, pairs.records, rejects.records, config.retry_dropped)
        if plan.rejects != rejects.records:  # atomic: a kill leaves the old file or the new one
            rejects.rewrite(plan.rejects)
        if line := resume_line(plan, len(selected), config.retry_dropped):
            print(line, flush=True)
        summary = _new_summary(config, plan, len(selected))
        state = open_client(config, api_key)
        start = time.perf_counter()
        try:
            asyncio.run(_run_all(plan.todo, state, prompts, (pairs, rejects), summary, progress))
        except TeacherError as err:
            summary["error"] = redact(str(err), state.secrets)
            raise
        except KeyboardInterrupt as interrupt:
            summary["interrupted"] = True
            interrupt.summary = summary  # finished below; main() prints it
            raise
        finally:
            _finish_summary(summary, state, time.perf_counter() - start)
            summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _new_summary(config: TeacherConfig, plan: Plan, total: int) -> dict:
    return {
        "out": config.out,
        "model": config.model,
        "base_url": public_url(config.base_url),
        "problems": total,
        "skipped_done": plan.done,
        "skipped_dropped": plan.skipped,
        "asked_again": plan.asked_again,
        "written": 0,
        "dropped": Counter(),  # reason -> count, for drops a rerun skips (the problem's content)
        "failed": Counter(),  # reason -> count, for transient drops a rerun asks again
        "interrupted": False,
    }


def _reject_record(problem: Problem, drop: Drop) -> dict:
    """A line of the rejected file: why, whether a rerun asks again, and the texts for inspection."""
    head = {"id": problem.id, "reason": drop.reason, "transient": drop.transient, "detail": drop.detail}
    return {**head, "answer": problem.answer, "question": problem.question, **drop.extra}


async def _run_all(
    todo: list[Problem],
    state: RunState,
    prompts: dict,
    stores: tuple[JsonlStore, JsonlStore],
    summary: dict,
    progress: bool,
) -> None:
    """`concurrency` workers take problems from one shared iterator and store each result as it completes.

    Everything runs on one event-loop thread, so each append (a plain blocking call) is whole: records never
    interleave, and each file has a single writer.
    """
    pairs, rejects = stores
    queue = iter(todo)
    bar = progress_bars.bar(len(todo), unit="problem", desc="pairs", enabled=progress)

    async def worker() -> None:
        for problem in queue:  # a shared iterator: each problem goes to exactly one worker
            try:
                pairs.append([await make_pair(state, prompts, problem)])
                summary["written"] += 1
            except Drop as drop:  # GaveUp included: recorded too, as transient
                rejects.append([_reject_record(problem, drop)])
                summary["failed" if drop.transient else "dropped"][drop.reason] += 1
            bar.update()
            dropped = sum(summary["dropped"].values()) + sum(summary["failed"].values())
            bar.set_postfix(written=summary["written"], dropped=dropped, refresh=False)

    workers = [asyncio.create_task(worker()) for _ in range(max(1, min(state.config.concurrency, len(todo))))]
    try:
        await asyncio.gather(*workers)  # the first TeacherError ends the run ...
    finally:
        for task in workers:  # ... and the other workers are cancelled mid-request (nothing is half-written)
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        bar.close()
        await state.client.close()


def _finish_summary(summary: dict, state: RunState, wall_s: float) -> None:
    config = state.config
    cost = estimate_cost(config.model, state.prompt_tokens, state.completion_tokens, config.price_in, config.price_out)
    summary.update(
        dropped=dict(summary["dropped"]),
        failed=dict(summary["failed"]),
        requests=state.requests,
        retries=dict(state.retries),
        usage={"prompt_tokens": state.prompt_tokens, "completion_tokens": state.completion_tokens},
        cost_usd=round(cost, 6) if cost is not None else "unknown",
        wall_s=round(wall_s, 3),
        pairs_per_s=round(summary["written"] / wall_s, 3) if wall_s > 0 else 0.0,
    )


def format_summary(summary: dict) -> str:
    """A few human-readable lines."""
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(summary["dropped"].items())) or "none"
    failed = ", ".join(f"{k} {v}" for k, v in sorted(summary["failed"].items())) or "none"
    cost = summary["cost_usd"]
    return "\n".join(
        [
            f"pairs: wrote {summary['written']} to {summary['out']} in {summary['wall_s']:.1f} s "
            f"({summary['pairs_per_s']:.2f} pairs/s); skipped {summary['skipped_done']} already done, "
            f"{summary['skipped_dropped']} dropped before for their content",
            f"dropped: {dropped}; failed after retries (a rerun asks again): {failed}",
            f"usage: {summary['requests']} requests, {summary['usage']['prompt_tokens']:,} prompt + "
            f"{summary['usage']['completion_tokens']:,} completion tokens; estimated cost: "
            + (f"${cost:.4f}" if isinstance(cost, float | int) else "unknown (pass --price-in/--price-out)"),
        ]
    )


def dry_run(problems: Sequence[Problem], config: TeacherConfig) -> str:
    """What a run would send, for the first few problems still to do; sends nothing and writes nothing."""
    out = _out_path(config)
    prompts = load_prompts(config.prompts)
    check_records(problems, out)
    selected = list(problems[: config.limit] if config.limit else problems)
    # read-only: no lock, no repair (a run may be writing these right now)
    plan = plan_run(selected, read_jsonl(out, REQUIRED), read_jsonl(side_paths(out)[0], REQUIRED), config.retry_dropped)
    lines = [
        f"dry run: {len(plan.todo)} of {len(selected)} problems to do, 2 requests each to "
        f"{public_url(config.base_url)} (model {config.model}); nothing is sent."
    ]
    for problem in plan.todo[:DRY_RUN_SHOWN]:
        lines.append(f"\n=== {problem.id} (gold answer {problem.answer}) ===")
        for title, concise in (("request 1 (concise)", None), ("request 2 (patient)", "<the concise solution>")):
            lines.append(f"--- {title} ---")
            lines += [f"[{m['role']}]\n{m['content']}" for m in build_messages(prompts, problem.question, concise)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Command line: `jaxpatience pairs [--config FILE.yaml] [--flag VALUE ...] [key=value ...]`.

# The flags of earlier versions, kept as aliases of config keys (`--model gpt-4o` is `model=gpt-4o`).
ALIASES = {
    "--problems": ("problems", "JSONL of {id, question, answer} (GSM8K layout works)"),
    "--out": ("out", "pairs JSONL, appended to and resumed"),
    "--base-url": (
        "base_url",
        "OpenAI-compatible endpoint (vLLM: http://localhost:8000/v1); default $OPENAI_BASE_URL, else OpenAI's",
    ),
    "--model": ("model", "teacher model name, e.g. gpt-4o"),
    "--concurrency": ("concurrency", "problems in flight at once (default 8)"),
    "--limit": ("limit", "only the first N problems"),
    "--max-retries": ("max_retries", "retries per request on 429/5xx/timeouts/malformed replies (default 5)"),
    "--timeout": ("timeout", "seconds per request, the whole of it (default 120)"),
    "--max-tokens": ("max_tokens", "cap on each reply's tokens, also a cost cap (default: the server's)"),
    "--prompts": ("prompts", f"prompt templates (YAML); default {DEFAULT_PROMPTS}"),
    "--temperature": ("temperature", "sampling temperature (default: the server's)"),
    "--price-in": ("price_in", "$ per 1M prompt tokens (for the cost estimate)"),
    "--price-out": ("price_out", "$ per 1M completion tokens"),
    "--backoff": ("backoff", "first retry delay in seconds, doubled per retry (default 1)"),
}


def parse_command(argv: list[str]) -> tuple[TeacherConfig, argparse.Namespace]:
    """The config of a command line (YAML < flags < key=value, strict) and its options (--dry-run, --no-progress)."""
    parser = command_parser("jaxpatience pairs", __doc__.split("\n")[0], ALIASES)
    parser.add_argument(
        "--retry-dropped",
        action="store_true",
        help="ask again for problems earlier runs dropped for their content (transient drops are asked again anyway)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the prompts for the first problems; send nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)
    if args.retry_dropped:  # a switch, not a flag with a value: the same as retry_dropped=true, before the
        args.overrides = ["retry_dropped=true", *args.overrides]  # key=value ones so that those still win
    return config_from_args(TeacherConfig, args).validate(), args


def _base_url(config: TeacherConfig) -> str:
    """The endpoint: the setting, else $OPENAI_BASE_URL (checked here, as the setting is by TeacherConfig), else
    OpenAI's."""
    url = config.base_url or os.environ.get("OPENAI_BASE_URL", "").strip() or OPENAI_URL
    if not config.base_url and not is_url(url):
        raise TeacherError(f"pairs: OPENAI_BASE_URL must be an http:// or https:// URL, not {public_url(url)!r}.")
    return url.rstrip("/")


def _api_key(base_url: str, dry_run: bool) -> str:
    """OPENAI_API_KEY, the only place a key comes from (never a config file or a flag, which end up in logs)."""
    api_key = os.environ.get("OPENAI_API_KEY")
    if api_key:
        return api_key
    if "api.openai.com" in base_url and not dry_run:
        raise TeacherError("set OPENAI_API_KEY to use the OpenAI API.")
    return "EMPTY"  # local servers (vLLM, Ollama) accept any key


def main(argv: list[str]) -> int:
    """`jaxpatience pairs ...`: user errors are ValueErrors (cli.py prints them as one line, exit 2)."""
    config, args = parse_command(argv)
    config = dataclasses.replace(config, base_url=_base_url(config))
    api_key = _api_key(config.base_url, args.dry_run)
    problems = load_file(config.problems)
    if not problems:  # a run over nothing would exit 0 having done nothing
        raise TeacherError(f"pairs: problems {config.problems} holds no problems.")
    if args.dry_run:
        print(dry_run(problems, config))
        return 0
    try:
        summary = build_pairs(problems, config, api_key=api_key, progress=not args.no_progress)
    except KeyboardInterrupt as interrupt:  # the records so far are on disk; say so, then cli.py reports it
        if hasattr(interrupt, "summary"):
            print(format_summary(interrupt.summary), file=sys.stderr)
        raise
    print(format_summary(summary))
    if summary["failed"]:
        print(
            f"jaxpatience pairs: {sum(summary['failed'].values())} problems failed after retries; "
            "run the same command again to retry them.",
            file=sys.stderr,
        )
        return 1
    return 0
