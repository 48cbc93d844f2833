"""The teacher's chat client: one chat completion, retried on what retrying can fix, fail-fast on the rest.

Failures: 429, 408, 409, 5xx, timeouts, connection resets and malformed replies (a 200 whose body is not a chat
completion: HTML, JSON without choices, a message without text) are retried alike, with exponential backoff
and jitter (honouring Retry-After). A bad key, an unknown model, a refused first connection, another 4xx, or an
endpoint that never once answered stops the run at once with one sentence (TeacherError). What concerns one
problem only drops that problem (Drop): a request the server refuses once it has answered others, a refusal.
Transient failures that outlast the retries drop it too, as a GaveUp (a Drop with `transient` set), which a rerun
asks again. Every message that leaves this module has the API key (and any secret in the URL) masked.
The openai client's own retries are off: this module owns the retry policy.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import openai

from jaxpatience.teacher.config import TeacherConfig, TeacherError, public_url, redact, url_secrets

CONNECT_ATTEMPTS = 2  # a refused connection before any reply: the endpoint is wrong, fail after this many tries
MAX_DELAY_S = 60.0  # cap on one backoff sleep and on an honoured Retry-After
SHOWN_BODY = 60  # characters of a non-JSON body quoted in a "malformed" detail


class Drop(Exception):
    """This problem yields no pair; `reason` is counted in the summary and written to the rejected file.

    `transient` is False for what the problem's content caused (a wrong answer, a refusal): a rerun skips it.
    """

    transient = False

    def __init__(self, reason: str, detail: str = "", **extra):
        super().__init__(reason)
        self.reason, self.detail, self.extra = reason, detail, extra


class GaveUp(Drop):
    """Retries ran out on a transient failure (malformed reply, 429, 5xx, timeout): a rerun asks again."""

    transient = True


class _Malformed(Exception):
    """A 200 reply whose body is not a chat completion."""


@dataclass
class RunState:
    """What the workers share (one event loop, so no locks): counters and whether the endpoint ever answered."""

    config: TeacherConfig
    client: openai.AsyncOpenAI
    secrets: tuple[str, ...] = ()  # masked in every message (redact)
    answered: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    retries: Counter = field(default_factory=Counter)


def open_client(config: TeacherConfig, api_key: str) -> RunState:
    """A client for `config.base_url` and the state one run's workers share; the caller closes `state.client`."""
    client = openai.AsyncOpenAI(  # retries are ours (backoff, Retry-After, fail-fast), so the client's are off
        base_url=config.base_url, api_key=api_key, timeout=config.timeout, max_retries=0
    )
    return RunState(config, client, secrets=(api_key, *url_secrets(config.base_url)))


@dataclass
class Reply:
    """One chat completion, reduced to what a pair record needs."""

    content: str
    finish_reason: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    refusal: str = ""  # the model declined (OpenAI's `message.refusal`; content is then null)


def _parse_reply(response) -> Reply:
    """The assistant text and usage of a chat completion; raises _Malformed on anything else."""
    if isinstance(response, str | bytes):  # the client hands back the text of a body that is not JSON
        text = response.decode(errors="replace") if isinstance(response, bytes) else response
        raise _Malformed(f"a body that is not JSON: {' '.join(text.split())[:SHOWN_BODY]!r}")
    try:
        choice = response.choices[0]
        content = choice.message.content
        refusal = getattr(choice.message, "refusal", None)
        usage = response.usage
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    except (AttributeError, IndexError, TypeError, ValueError, KeyError) as err:
        raise _Malformed(f"no chat completion ({type(err).__name__}: {err})") from None
    if content is not None and not isinstance(content, str):
        raise _Malformed(f"message content is {type(content).__name__}")
    refusal = refusal if isinstance(refusal, str) else ""
    finish_reason = getattr(choice, "finish_reason", None)
    # No text, no refusal, and not cut off by the token limit: what overloaded gateways send instead of an error.
    if not (content or "").strip() and not refusal.strip() and finish_reason != "length":
        raise _Malformed("a message without text")
    model = response.model if isinstance(getattr(response, "model", None), str) else ""
    return Reply(content or "", finish_reason, model, prompt_tokens, completion_tokens, refusal.strip())


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


def _unreachable(state: RunState, attempts: int, err: Exception | None) -> TeacherError:
    """The endpoint cannot be reached: never answered (wrong URL, server down) or went away mid-run."""
    url = public_url(state.config.base_url)
    cause = f" ({_first_line(err.__cause__ or err)})" if err is not None else ""
    if not state.answered:
        return TeacherError(f"cannot reach {url}{cause}; is the server running at that URL?")
    return TeacherError(f"lost the connection to {url} after {attempts} attempts{cause}; rerun to resume.")


async def chat(state: RunState, messages: list[dict]) -> Reply:
    """One chat completion, retried on transient failures; raises TeacherError, Drop or GaveUp (a Drop).

    Their messages never hold the API key: a server may echo it (an error body quoting the header it refused).
    """
    try:
        return await _chat(state, messages)
    except TeacherError as err:
        raise TeacherError(redact(str(err), state.secrets)) from None
    except Drop as drop:
        drop.detail = redact(drop.detail, state.secrets)
        raise


async def _chat(state: RunState, messages: list[dict]) -> Reply:
    config = state.config
    extra = {} if config.temperature is None else {"temperature": config.temperature}
    for attempt in range(config.max_retries + 1):
        try:
            state.requests += 1
            reply = _parse_reply(
                await state.client.chat.completions.create(model=config.model, messages=messages, **extra)
            )
        except (openai.APIError, _Malformed, json.JSONDecodeError, UnicodeDecodeError) as err:
            last_error = err
            kind, wait = _classify(err, state, attempt)  # raises on what retrying cannot fix
        else:
            state.answered = True
            state.prompt_tokens += reply.prompt_tokens
            state.completion_tokens += reply.completion_tokens
            return reply
        if attempt < config.max_retries:
            state.retries[kind] += 1  # counts retries sent, so a summary's retries match the server's log
            await asyncio.sleep(backoff_delay(attempt, config.backoff, wait))
    raise _out_of_retries(state, kind, last_error)


def _out_of_retries(state: RunState, kind: str, err: Exception) -> Exception:
    """What to raise when every attempt failed with a transient `kind` (the last failure: `err`)."""
    attempts = state.config.max_retries + 1
    if kind == "connection":  # the endpoint is gone: stop the run
        return _unreachable(state, attempts, err)
    if not state.answered:  # it never worked: do not go on through every problem
        hint = (
            "is --base-url an OpenAI-compatible endpoint (it usually ends in /v1)?"
            if kind == "malformed"
            else "is the server overloaded or still starting?"
        )
        return TeacherError(
            f"{public_url(state.config.base_url)} answered no request ({kind} {attempts} times in a row: "
            f"{_first_line(err)}); {hint}"
        )
    return GaveUp(kind, f"{kind} {attempts} times in a row, the last: {_first_line(err)}.")


def _classify(err: Exception, state: RunState, attempt: int) -> tuple[str, float | None]:
    """(kind, server-requested delay) of a retryable failure; raises TeacherError or Drop for the others."""
    url = public_url(state.config.base_url)
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
            raise Drop("bad_request", f"HTTP {status}: {_server_message(err)}") from None
        raise TeacherError(f"{url} rejected the request (HTTP {status}: {_server_message(err)}).") from None
    return "malformed", None  # a 200 whose body is not a chat completion


def backoff_delay(attempt: int, base: float, retry_after: float | None = None) -> float:
    """Seconds to sleep before retry `attempt + 1`: Retry-After when given, else base·2^attempt, jittered ±50%."""
    if retry_after is not None:
        return min(retry_after, MAX_DELAY_S) * random.uniform(1.0, 1.1)  # never earlier than asked
    return min(base * 2**attempt, MAX_DELAY_S) * random.uniform(0.5, 1.5)
