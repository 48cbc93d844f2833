"""The teacher's chat client: one chat completion, retried on what retrying can fix, fail-fast on the rest.

Failures: 429, 408, 409, 5xx, timeouts, connection resets and malformed replies (a 200 whose body is not a chat
completion: HTML, JSON without choices, a message without text, an `{"error": ...}` body, whose message is quoted)
are retried alike, with exponential backoff and jitter (honouring Retry-After). A bad key, an unknown model, a
refused first connection, another 4xx, or an endpoint that never once answered stops the run at once with one
sentence (TeacherError). What concerns one
problem only drops that problem (Drop): a request the server refuses once it has answered others, a refusal.
Transient failures that outlast the retries drop it too, as a GaveUp (a Drop with `transient` set), which a rerun
asks again. Every message that leaves this module has the API key (and any secret in the URL) masked.
The openai client's own retries are off: this module owns the retry policy.

A reply is untrusted input, read by one reader (`_request`, `_parse_reply`): `timeout` bounds the whole request
(a server that drips its reply a byte at a time is cut off like one that never answers), a body over
MAX_REPLY_BYTES is refused while it arrives (a Drop, `oversized`), the JSON is read by hand rather than through the
client's models (content as a string or a list of text parts; a `usage` block that is not counts of tokens is
ignored, never a reason to reject an answer).
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
MAX_REPLY_BYTES = 1 << 20  # a chat completion's body; 1 MiB is ~250k tokens, far past any solution
TEXT_PART_TYPES = ("text", "output_text")  # content parts that are text (OpenAI's chat and responses names)


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


class _Deadline(Exception):
    """The whole request (connection, headers and every byte of the body) took longer than `timeout`."""


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


def _parse_reply(body: bytes) -> Reply:
    """The assistant text and usage of a chat completion's body; raises _Malformed on anything else."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past reason
        text = body.decode(errors="replace")
        raise _Malformed(f"a body that is not JSON: {' '.join(text.split())[:SHOWN_BODY]!r}") from None
    if isinstance(data, dict) and "choices" not in data and data.get("error") is not None:
        error = data["error"]  # some gateways answer 200 with an error body
        message = error.get("message") if isinstance(error, dict) else error
        raise _Malformed(f"the server answered with an error: {_first_line(str(message or error))}")
    choices = data.get("choices") if isinstance(data, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise _Malformed("no chat completion (no choices[0].message)")
    content = _text(message.get("content"))
    refusal = message.get("refusal")
    refusal = refusal.strip() if isinstance(refusal, str) else ""
    finish_reason = choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None
    # No text, no refusal, and not cut off by the token limit: what overloaded gateways send instead of an error.
    if not content.strip() and not refusal and finish_reason != "length":
        raise _Malformed("a message without text")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    model = data.get("model") if isinstance(data.get("model"), str) else ""
    return Reply(content, finish_reason, model, _count(usage, "prompt_tokens"), _count(usage, "completion_tokens"),
                 refusal)  # fmt: skip


def _text(content) -> str:
    """A message's content: a string, null, or a list of text parts (`[{"type": "text", "text": ...}]`)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        kinds = [part.get("type") if isinstance(part, dict) else type(part).__name__ for part in content]
        other = next((kind for kind in kinds if kind not in TEXT_PART_TYPES), None)
        if other is None and all(isinstance(part.get("text"), str) for part in content):
            return "".join(part["text"] for part in content)
        raise _Malformed(f"message content holds a part that is not text ({other or 'no text'})")
    raise _Malformed(f"message content is {type(content).__name__}")


def _count(usage: dict, key: str) -> int:
    """A token count of `usage`, 0 when it is not a plausible one (negative, fractional, text, absurdly large):
    usage only feeds the cost estimate, so nonsense there never rejects an answer."""
    value = usage.get(key)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e12 and value == int(value)
    return int(value) if ok else 0


async def _request(state: RunState, messages: list[dict]) -> Reply:
    """One request, its body read by hand within `timeout` for the whole of it and MAX_REPLY_BYTES."""
    config = state.config
    extra = {} if config.temperature is None else {"temperature": config.temperature}
    if config.max_tokens is not None:
        extra["max_tokens"] = config.max_tokens

    async def send() -> bytes:
        create = state.client.chat.completions.with_streaming_response.create
        async with create(model=config.model, messages=messages, **extra) as response:
            body = bytearray()
            async for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_REPLY_BYTES:
                    raise Drop("oversized", f"the reply is longer than {MAX_REPLY_BYTES:,} bytes; it was cut off.")
            return bytes(body)

    try:
        body = await asyncio.wait_for(send(), config.timeout)
    except TimeoutError:  # httpx's timeout is per read: a dripping server never trips it
        raise _Deadline(f"no whole reply within {config.timeout:g} s") from None
    return _parse_reply(body)


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
    for attempt in range(config.max_retries + 1):
        try:
            state.requests += 1
            reply = await _request(state, messages)
        except (openai.APIError, _Malformed, _Deadline) as err:
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
    if isinstance(err, openai.APITimeoutError | _Deadline):  # (the first a subclass of APIConnectionError)
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
