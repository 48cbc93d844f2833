"""Patience preference pairs from a teacher model behind any OpenAI-compatible chat-completions endpoint.

For each problem `{id, question, answer}` the teacher is asked twice (Patience, arXiv 2411.13082):
  1. for a concise, correct solution: the pair's `rejected` side;
  2. in a second request that quotes (1), to rewrite it patiently, every step explicit and checked: `chosen`.
Both must reach the gold answer; otherwise the problem is dropped and counted by reason, never kept.

Output (one JSON object per line, the layout `PairLoader` reads):
  {"id", "prompt" (the question), "chosen", "rejected", "answer", "teacher_model", "usage"}
Records are appended and fsynced one by one as problems finish, so a crash or Ctrl-C loses nothing; a rerun skips
ids already written (a torn last line from a crash is cut off first). Dropped problems go to `OUT.rejected.jsonl`
with their reason and are not retried unless `--retry-dropped`. The run's summary goes to `OUT.summary.json`.

Failures: 429, 5xx, timeouts and connection resets are retried with exponential backoff and jitter (honouring
Retry-After); a bad key, an unknown model, a refused first connection or another 4xx stops the run at once with one
sentence. This module never imports JAX.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import email.utils
import json
import os
import random
import string
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import openai
import yaml
from tqdm import tqdm

from jaxpatience.answers import answers_equal, extract_flexible, extract_strict, is_numeric
from jaxpatience.data.problems import Problem, load_file

# US dollars per 1M tokens (input, output), OpenAI list prices; the longest matching prefix of the model name wins,
# so "gpt-4o-mini-2024-07-18" is priced as gpt-4o-mini. Override with --price-in/--price-out.
PRICES_PER_MILLION = {"gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60)}
PROMPT_FIELDS = {"concise": ("question",), "patient": ("question", "concise")}  # allowed placeholders
REQUIRED_FIELDS = {"concise": "question", "patient": "concise"}
DEFAULT_PROMPTS = "configs/teacher_prompts.yaml"
CONNECT_ATTEMPTS = 2  # a refused connection before any reply: the endpoint is wrong, fail after this many tries
MALFORMED_ATTEMPTS = 3  # a reply that is not a chat completion: retried this often, then the problem is dropped
MAX_DELAY_S = 60.0  # cap on one backoff sleep and on an honoured Retry-After
DRY_RUN_SHOWN = 3


class TeacherError(ValueError):
    """A user-facing error (bad key, model, endpoint, prompts or output file) in one sentence."""


class _Drop(Exception):
    """This problem cannot yield a pair; `reason` is counted in the summary and written to the side file."""

    def __init__(self, reason: str, detail: str = "", **extra):
        super().__init__(reason)
        self.reason, self.detail, self.extra = reason, detail, extra


class _GaveUp(Exception):
    """Retries ran out on a transient failure (429, 5xx, timeout): not recorded, so a rerun tries again."""


class _Malformed(Exception):
    """A 200 reply whose body is not a chat completion."""


@dataclass(frozen=True)
class TeacherConfig:
    base_url: str
    model: str
    api_key: str = "EMPTY"
    concurrency: int = 8
    limit: int | None = None
    max_retries: int = 5  # retries after the first attempt, per request
    timeout: float = 120.0  # seconds per request
    temperature: float | None = None  # None: the server's default
    backoff: float = 1.0  # first backoff sleep in seconds; doubles per retry, jittered
    prompts: dict = field(default_factory=dict)  # {"system", "concise", "patient"}; see load_prompts
    retry_dropped: bool = False
    price_in: float | None = None  # $ per 1M prompt tokens; None: from PRICES_PER_MILLION
    price_out: float | None = None
    progress: bool = True


# ---------------------------------------------------------------------------------------------------
# Prompts and answers.


def load_prompts(path: str | Path | None = None) -> dict:
    """The prompt templates from a YAML file, with their placeholders checked; default configs/teacher_prompts.yaml."""
    if path is None:
        # The repository's copy: next to the working directory, or next to this package (editable installs).
        candidates = [Path(DEFAULT_PROMPTS), Path(__file__).resolve().parents[2] / DEFAULT_PROMPTS]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise TeacherError(f"no prompts file found at {DEFAULT_PROMPTS}: pass --prompts FILE.")
    path = Path(path)
    try:
        prompts = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TeacherError(f"prompts file {path} does not exist.") from None
    except yaml.YAMLError as err:
        raise TeacherError(f"prompts file {path} is not valid YAML ({str(err).splitlines()[0]}).") from None
    if not isinstance(prompts, dict):
        raise TeacherError(f"prompts file {path} must be a mapping with keys 'concise' and 'patient'.")
    unknown = set(prompts) - {"system", *PROMPT_FIELDS}
    if unknown:
        raise TeacherError(f"prompts file {path} has unknown key(s) {sorted(unknown)}: use system, concise, patient.")
    for name, allowed in PROMPT_FIELDS.items():
        template = prompts.get(name)
        if not isinstance(template, str) or not template.strip():
            raise TeacherError(f"prompts file {path} needs a non-empty text under {name!r}.")
        _check_placeholders(template, name, allowed, REQUIRED_FIELDS[name], path)
    system = prompts.get("system") or ""
    if not isinstance(system, str):
        raise TeacherError(f"prompts file {path}: 'system' must be text.")
    return {"system": system.strip(), "concise": prompts["concise"], "patient": prompts["patient"]}


def _check_placeholders(template: str, name: str, allowed: Sequence[str], required: str, path: Path) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:  # a lone "{" or "}"
        raise TeacherError(f"prompts file {path}, {name!r}: {err} (write literal braces as {{{{ and }}}}).") from None
    for placeholder in fields:
        if placeholder not in allowed:
            shown = ", ".join("{" + a + "}" for a in allowed)
            raise TeacherError(
                f"prompts file {path}, {name!r}: unknown placeholder {{{placeholder}}}; allowed: {shown} "
                f"(write literal braces as {{{{ and }}}})."
            )
    if required not in fields:
        raise TeacherError(f"prompts file {path}, {name!r} must contain the placeholder {{{required}}}.")


def build_messages(prompts: dict, question: str, concise: str | None = None) -> list[dict]:
    """The chat messages of the concise request (`concise` None) or of the patient rewrite of `concise`."""
    if concise is None:
        content = prompts["concise"].format(question=question)
    else:
        content = prompts["patient"].format(question=question, concise=concise)
    system = [{"role": "system", "content": prompts["system"]}] if prompts["system"] else []
    return [*system, {"role": "user", "content": content}]


def final_answer(text: str, gold: str) -> str | None:
    """The final answer of a solution: after "The answer is" / "####" / `\\boxed{}`, else its last number.

    Commas, `$` and a trailing dot are normalised away (answers.py), so "The answer is $1,234." reads 1234.
    """
    numeric = is_numeric(gold)
    strict = extract_strict(text, numeric=numeric)
    return strict if strict is not None else extract_flexible(text, numeric=numeric)


def reaches_gold(text: str, gold: str) -> bool:
    """Whether the solution's final answer equals the gold one (numerically when both are numbers)."""
    return answers_equal(final_answer(text, gold), gold)


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


# ---------------------------------------------------------------------------------------------------
# Output files: append-only JSONL, fsynced per record, with a torn last line repaired on resume.


def read_jsonl_ids(path: Path, repair: bool = True) -> set[str]:
    """The ids already in a JSONL output. With `repair`, the remains of a crash mid-write are cut off the end.

    Each record is written with one `write` call, so a crash can only leave an incomplete *last* line; a garbled
    line anywhere else was not written by us, and is an error naming the line.
    """
    if not path.exists():
        return set()
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")  # `tail`: what follows the last newline, b"" unless a write was torn
    ids: set[str] = set()
    keep = 0  # the length of the prefix of `data` that holds only whole, valid records
    for number, line in enumerate(lines, start=1):
        record_id = _record_id(line)
        if record_id is None and line.strip():
            if number < len(lines) or tail.strip():
                raise TeacherError(f"{path}, line {number}: not a JSON record with an 'id'; fix or remove it.")
            tail = b""  # a garbled last line: cut it like a torn one
            break
        if record_id is not None:
            ids.add(record_id)
        keep += len(line) + 1
    tail_id = _record_id(tail)  # a whole record that only lacks its newline is kept
    if tail_id is not None:
        ids.add(tail_id)
    if repair and (keep < len(data)):
        print(f"jaxpatience pairs: repaired the end of {path} (left by an interrupted run).", file=sys.stderr)
        with open(path, "r+b") as handle:
            handle.truncate(keep)
            if tail_id is not None:
                handle.seek(keep)
                handle.write(tail + b"\n")
    return ids


def _record_id(line: bytes) -> str | None:
    try:
        record = json.loads(line)
        return str(record["id"]) if isinstance(record, dict) and "id" in record else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


class JsonlAppender:
    """Appends one record per line and makes it durable before returning (flush + fsync)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()


def side_paths(out: Path) -> tuple[Path, Path]:
    """`pairs.jsonl` -> (`pairs.rejected.jsonl`, `pairs.summary.json`)."""
    return out.with_name(out.stem + ".rejected.jsonl"), out.with_name(out.stem + ".summary.json")


def _lock(appender: JsonlAppender) -> None:
    """An advisory lock on the output, so that two runs never append to the same file at once (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return
    try:
        fcntl.flock(appender.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise TeacherError(f"{appender.path} is being written by another run; wait or use another --out.") from None


# ---------------------------------------------------------------------------------------------------
# One request with retries, one problem with two requests.


@dataclass
class _RunState:
    """What the workers share (one event loop, so no locks): counters and whether the endpoint ever answered."""

    config: TeacherConfig
    client: openai.AsyncOpenAI
    answered: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    retries: Counter = field(default_factory=Counter)


@dataclass
class _Reply:
    content: str
    finish_reason: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int


def _parse_reply(response) -> _Reply:
    """The assistant text and usage of a chat completion; raises _Malformed on anything else."""
    try:
        choice = response.choices[0]
        content = choice.message.content
        usage = response.usage
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    except (AttributeError, IndexError, TypeError, ValueError, KeyError) as err:
        raise _Malformed(f"{type(err).__name__}: {err}") from None
    if content is not None and not isinstance(content, str):
        raise _Malformed(f"message content is {type(content).__name__}")
    model = response.model if isinstance(getattr(response, "model", None), str) else ""
    return _Reply(content or "", getattr(choice, "finish_reason", None), model, prompt_tokens, completion_tokens)


def _retry_after(err: openai.APIStatusError) -> float | None:
    """Seconds from a Retry-After (or retry-after-ms) header: a number or an HTTP date; None when absent."""
    headers = err.response.headers
    if "retry-after-ms" in headers:
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if email.utils.parsedate_tz(value) else None
        return max(0.0, when.timestamp() - time.time()) if when else None


def _server_message(err: openai.APIStatusError) -> str:
    """The server's own error message (OpenAI puts it in `error.message`), first line only."""
    message = err.body.get("message") if isinstance(err.body, dict) else None
    text = str(message or err.message or "").strip()
    return text.splitlines()[0][:200] if text else "no message"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _unreachable(state: _RunState, attempts: int, err: Exception | None) -> TeacherError:
    """The endpoint cannot be reached: never answered (wrong URL, server down) or went away mid-run."""
    cause = f" ({_first_line(err.__cause__ or err)})" if err is not None else ""
    if not state.answered:
        return TeacherError(f"cannot reach {state.config.base_url}{cause}; is the server running at that URL?")
    return TeacherError(
        f"lost the connection to {state.config.base_url} after {attempts} attempts{cause}; rerun to resume."
    )


async def chat(state: _RunState, messages: list[dict]) -> _Reply:
    """One chat completion, retried on transient failures; raises TeacherError, _Drop or _GaveUp."""
    config = state.config
    extra = {} if config.temperature is None else {"temperature": config.temperature}
    malformed = 0
    for attempt in range(config.max_retries + 1):
        try:
            state.requests += 1
            reply = _parse_reply(
                await state.client.chat.completions.create(model=config.model, messages=messages, **extra)
            )
        except (openai.APIError, _Malformed, json.JSONDecodeError, UnicodeDecodeError) as err:
            last_error = err
            kind, wait = _classify(err, state, attempt)  # raises on what retrying cannot fix
            malformed += kind == "malformed"
            if malformed >= MALFORMED_ATTEMPTS:
                raise _Drop(
                    "malformed", f"{malformed} replies were not chat completions ({_first_line(err)})."
                ) from None
        else:
            state.answered = True
            state.prompt_tokens += reply.prompt_tokens
            state.completion_tokens += reply.completion_tokens
            return reply
        state.retries[kind] += 1
        if attempt < config.max_retries:
            await asyncio.sleep(backoff_delay(attempt, config.backoff, wait))
    # Out of retries.
    if kind == "malformed":
        raise _Drop("malformed", f"the replies were not chat completions ({_first_line(last_error)}).")
    if kind == "connection":  # the endpoint is gone: stop the run
        raise _unreachable(state, config.max_retries + 1, last_error)
    if not state.answered:  # it never worked: do not go on through every problem
        raise TeacherError(
            f"{config.base_url} answered no request ({kind} {config.max_retries + 1} times in a row: "
            f"{_first_line(last_error)}); "
            f"is the server overloaded or still starting?"
        )
    raise _GaveUp(kind)


def _classify(err: Exception, state: _RunState, attempt: int) -> tuple[str, float | None]:
    """(kind, server-requested delay) of a retryable failure; raises TeacherError or _Drop for the others."""
    url = state.config.base_url
    if isinstance(err, openai.AuthenticationError | openai.PermissionDeniedError):
        raise TeacherError(
            f"{url} refused the API key (HTTP {err.status_code}: {_server_message(err)}); set OPENAI_API_KEY to a "
            f"valid key."
        ) from None
    if isinstance(err, openai.NotFoundError):
        raise TeacherError(
            f"{url} has no model {state.config.model!r} or no /chat/completions route (HTTP 404: "
            f"{_server_message(err)}); check --model and --base-url (it usually ends in /v1)."
        ) from None
    if isinstance(err, openai.APITimeoutError):  # (a subclass of APIConnectionError)
        return "timeout", None
    if isinstance(err, openai.APIConnectionError):
        if not state.answered and attempt + 1 >= CONNECT_ATTEMPTS:  # refused from the start: a wrong URL
            raise _unreachable(state, attempt + 1, err) from None
        return "connection", None
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        if status in (408, 409, 429) or status >= 500:
            return f"http_{status}", _retry_after(err)
        if status in (400, 413, 422) and state.answered:
            # The endpoint works for other problems: this one is too long or otherwise unacceptable.
            raise _Drop("bad_request", f"HTTP {status}: {_server_message(err)}") from None
        raise TeacherError(f"{url} rejected the request (HTTP {status}: {_server_message(err)}).") from None
    return "malformed", None  # a 200 whose body is not a chat completion


def backoff_delay(attempt: int, base: float, retry_after: float | None = None) -> float:
    """Seconds to sleep before retry `attempt + 1`: Retry-After when given, else base·2^attempt, jittered ±50%."""
    if retry_after is not None:
        return min(retry_after, MAX_DELAY_S) * random.uniform(1.0, 1.1)  # never earlier than asked
    return min(base * 2**attempt, MAX_DELAY_S) * random.uniform(0.5, 1.5)


async def make_pair(state: _RunState, problem: Problem) -> dict:
    """The concise and the patient solution of one problem as a pair record; raises _Drop when unusable."""
    prompts = state.config.prompts
    concise = await _solution(state, build_messages(prompts, problem.question), problem, "concise")
    messages = build_messages(prompts, problem.question, concise.content)
    patient = await _solution(state, messages, problem, "patient", concise=concise.content)
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


async def _solution(state: _RunState, messages: list[dict], problem: Problem, side: str, **context) -> _Reply:
    """One side of the pair, checked; a drop keeps the texts (`context`: the concise one) for inspection."""
    reply = await chat(state, messages)
    texts = {**context, side: reply.content}
    if reply.finish_reason == "length":
        raise _Drop(f"{side}_truncated", "the reply hit the token limit.", **texts)
    if not reply.content.strip():
        raise _Drop(f"{side}_empty", "the reply had no text.", **texts)
    if not reaches_gold(reply.content, problem.answer):
        found = final_answer(reply.content, problem.answer)
        raise _Drop(f"{side}_wrong", f"final answer {found!r}, gold {problem.answer!r}.", **texts)
    return reply


# ---------------------------------------------------------------------------------------------------
# The run.


def build_pairs(problems: Sequence[Problem], out: str | Path, config: TeacherConfig) -> dict:
    """Write a pair for every problem not yet in `out` (nor dropped before); returns the summary (also saved)."""
    out = Path(out)
    if not config.prompts:
        config = dataclasses.replace(config, prompts=load_prompts())
    rejected_path, summary_path = side_paths(out)
    selected = list(problems[: config.limit] if config.limit else problems)
    pairs = JsonlAppender(out)
    try:
        _lock(pairs)  # before reading: the repair must not race another run's writes
        done = read_jsonl_ids(out)
        dropped_before = set() if config.retry_dropped else read_jsonl_ids(rejected_path)
        rejects = JsonlAppender(rejected_path)
    except BaseException:
        pairs.close()
        raise
    todo = [p for p in selected if p.id not in done and p.id not in dropped_before]
    summary = {
        "out": str(out),
        "model": config.model,
        "base_url": config.base_url,
        "problems": len(selected),
        "skipped_done": sum(p.id in done for p in selected),
        "skipped_dropped": sum(p.id in dropped_before and p.id not in done for p in selected),
        "written": 0,
        "dropped": Counter(),
        "failed": Counter(),
        "interrupted": False,
    }
    client = openai.AsyncOpenAI(  # retries are ours (backoff, Retry-After, fail-fast), so the client's are off
        base_url=config.base_url, api_key=config.api_key, timeout=config.timeout, max_retries=0
    )
    state = _RunState(config, client)
    start = time.perf_counter()
    try:
        asyncio.run(_run_all(todo, state, pairs, rejects, summary))
    except TeacherError as err:
        summary["error"] = str(err)
        raise
    except KeyboardInterrupt as interrupt:
        summary["interrupted"] = True
        interrupt.summary = summary  # finished below; main() prints it
        raise
    finally:
        pairs.close()
        rejects.close()
        _finish_summary(summary, state, time.perf_counter() - start)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


async def _run_all(
    todo: list[Problem], state: _RunState, pairs: JsonlAppender, rejects: JsonlAppender, summary: dict
) -> None:
    """`concurrency` workers take problems from one shared iterator and write each result as it completes.

    Everything runs on one event-loop thread, so each `write` (a plain blocking call) is whole: records never
    interleave, and each file has a single writer.
    """
    queue = iter(todo)
    bar = tqdm(total=len(todo), unit="problem", desc="pairs", disable=None if state.config.progress else True)

    async def worker() -> None:
        for problem in queue:  # a shared iterator: each problem goes to exactly one worker
            try:
                pairs.write(await make_pair(state, problem))
                summary["written"] += 1
            except _Drop as drop:
                reject = {"id": problem.id, "reason": drop.reason, "detail": drop.detail, "answer": problem.answer}
                rejects.write({**reject, "question": problem.question, **drop.extra})
                summary["dropped"][drop.reason] += 1
            except _GaveUp as gave_up:
                summary["failed"][str(gave_up)] += 1
            bar.update()
            bar.set_postfix(written=summary["written"], dropped=sum(summary["dropped"].values()), refresh=False)

    workers = [asyncio.create_task(worker()) for _ in range(max(1, min(state.config.concurrency, len(todo))))]
    try:
        await asyncio.gather(*workers)  # the first TeacherError ends the run ...
    finally:
        for task in workers:  # ... and the other workers are cancelled mid-request (nothing is half-written)
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        bar.close()
        await state.client.close()


def _finish_summary(summary: dict, state: _RunState, wall_s: float) -> None:
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
            f"{summary['skipped_dropped']} dropped before",
            f"dropped: {dropped}; failed after retries (a rerun retries them): {failed}",
            f"usage: {summary['requests']} requests, {summary['usage']['prompt_tokens']:,} prompt + "
            f"{summary['usage']['completion_tokens']:,} completion tokens; estimated cost: "
            + (f"${cost:.4f}" if isinstance(cost, float | int) else "unknown (pass --price-in/--price-out)"),
        ]
    )


def dry_run(problems: Sequence[Problem], out: Path, config: TeacherConfig) -> str:
    """What a run would send, for the first few problems still to do; sends nothing and writes nothing."""
    selected = list(problems[: config.limit] if config.limit else problems)
    skip = read_jsonl_ids(out, repair=False)
    if not config.retry_dropped:
        skip |= read_jsonl_ids(side_paths(out)[0], repair=False)
    todo = [p for p in selected if p.id not in skip]
    lines = [
        f"dry run: {len(todo)} of {len(selected)} problems to do, 2 requests each to {config.base_url} "
        f"(model {config.model}); nothing is sent."
    ]
    for problem in todo[:DRY_RUN_SHOWN]:
        lines.append(f"\n=== {problem.id} (gold answer {problem.answer}) ===")
        for title, concise in (("request 1 (concise)", None), ("request 2 (patient)", "<the concise solution>")):
            lines.append(f"--- {title} ---")
            lines += [
                f"[{m['role']}]\n{m['content']}" for m in build_messages(config.prompts, problem.question, concise)
            ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Command line.


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxpatience pairs", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--problems", required=True, metavar="FILE", help="JSONL of {id, question, answer} (GSM8K layout works)"
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="pairs JSONL, appended to and resumed")
    parser.add_argument(
        "--base-url",
        metavar="URL",
        default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM)",
    )
    parser.add_argument("--model", required=True, metavar="NAME", help="teacher model name, e.g. gpt-4o")
    parser.add_argument("--concurrency", type=_positive_int, metavar="N", default=8, help="problems in flight at once")
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N problems")
    parser.add_argument("--dry-run", action="store_true", help="print the prompts for the first problems; send nothing")
    parser.add_argument(
        "--max-retries", type=int, metavar="N", default=5, help="retries per request on 429/5xx/timeouts"
    )
    parser.add_argument("--timeout", type=float, metavar="S", default=120.0, help="seconds per request")
    parser.add_argument("--prompts", metavar="FILE", help=f"prompt templates (YAML); default {DEFAULT_PROMPTS}")
    parser.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (default: the server's)")
    parser.add_argument("--retry-dropped", action="store_true", help="ask again for problems dropped by earlier runs")
    parser.add_argument("--price-in", type=float, metavar="USD", help="$ per 1M prompt tokens (for the cost estimate)")
    parser.add_argument("--price-out", type=float, metavar="USD", help="$ per 1M completion tokens")
    parser.add_argument(
        "--backoff", type=float, metavar="S", default=1.0, help="first retry delay in seconds (doubles per retry)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """`jaxpatience pairs ...`: user errors raise TeacherError (cli.py prints it as one line, exit 2)."""
    args = parse_args(argv)
    if args.max_retries < 0 or args.timeout <= 0 or args.backoff < 0:
        raise TeacherError("--max-retries and --backoff must be >= 0 and --timeout > 0.")
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        if "api.openai.com" in args.base_url and not args.dry_run:
            raise TeacherError("set OPENAI_API_KEY to use the OpenAI API.")
        api_key = "EMPTY"  # local servers (vLLM, Ollama) accept any key
    config = TeacherConfig(
        base_url=args.base_url.rstrip("/"),
        model=args.model,
        api_key=api_key,
        concurrency=args.concurrency,
        limit=args.limit,
        max_retries=args.max_retries,
        timeout=args.timeout,
        temperature=args.temperature,
        backoff=args.backoff,
        prompts=load_prompts(args.prompts),
        retry_dropped=args.retry_dropped,
        price_in=args.price_in,
        price_out=args.price_out,
        progress=not args.no_progress,
    )
    problems = load_file(args.problems)
    if args.dry_run:
        print(dry_run(problems, Path(args.out), config))
        return 0
    try:
        summary = build_pairs(problems, args.out, config)
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
