"""The settings of `jaxpatience pairs` (one frozen dataclass) and the error every teacher module raises.

`TeacherConfig` is read like every command's config (YAML < flags < key=value, see `config.command_parser`), so
each field is a plain YAML value: the prompts are a file *path* (load_prompts of teacher/prompts.py reads it), and the
API key is no setting at all: it comes only from OPENAI_API_KEY, so that it never lands in a config file.
Values from a command line arrive as YAML scalars, untyped by argparse: `__post_init__` checks their types.
`public_url` and `redact` keep secrets (the key, a password or token in the URL) out of every message and file.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from jaxpatience.config import ConfigError

OPENAI_URL = "https://api.openai.com/v1"


class TeacherError(ValueError):
    """A user-facing error (bad key, model, endpoint, prompts or output file) in one sentence."""


@dataclass(frozen=True)
class TeacherConfig:
    """One `jaxpatience pairs` run: where the problems come from and go to, the teacher, and how to ask it."""

    problems: str = ""  # JSONL of {id, question, answer} (GSM8K layout works)
    out: str = ""  # pairs JSONL, appended to and resumed; OUT.rejected.jsonl and OUT.summary.json go beside it
    base_url: str = ""  # OpenAI-compatible endpoint; "": $OPENAI_BASE_URL, else OPENAI_URL (resolved by main)
    model: str = ""  # teacher model name, e.g. gpt-4o
    concurrency: int = 8  # problems in flight at once
    limit: int | None = None  # only the first N problems
    max_retries: int = 5  # retries after the first attempt, per request
    timeout: float = 120.0  # seconds per request, the whole of it (connecting, waiting, reading the reply)
    temperature: float | None = None  # None: the server's default
    max_tokens: int | None = None  # cap on each reply's tokens (sent as max_tokens); None: the server's default
    backoff: float = 1.0  # first backoff sleep in seconds; doubles per retry, jittered
    prompts: str = ""  # prompt templates (YAML); "": configs/teacher_prompts.yaml
    retry_dropped: bool = False  # ask again for problems dropped for their content too (transient drops always are)
    price_in: float | None = None  # $ per 1M prompt tokens; None: from PRICES_PER_MILLION (teacher/run.py)
    price_out: float | None = None  # $ per 1M completion tokens

    def __post_init__(self) -> None:
        for key in ("problems", "out", "base_url", "model", "prompts"):
            if getattr(self, key) is None:  # `key=` or `key: null` leaves a text setting unset, as "" does
                object.__setattr__(self, key, "")  # how a frozen dataclass sets a field of its own
        for key, (acceptable, expected) in _CHECKS.items():
            value = getattr(self, key)
            if not acceptable(value):
                shown = public_url(value) if isinstance(value, str) else value
                raise ConfigError(f"pairs: {key} must be {expected}, not {shown!r}.")

    def validate(self) -> TeacherConfig:
        """Raise ConfigError unless a command-line run can start (its problems, output and model are named)."""
        for key in ("problems", "out", "model"):
            if not getattr(self, key):
                raise ConfigError(f"pairs: {key} is not set (--{key} ... or {key}=...).")
        return self


def url_secrets(url: str) -> list[str]:
    """The secrets a URL may carry: the password of `user:password@host`, the values of its query."""
    parts = urllib.parse.urlsplit(url)
    found = [parts.password] if parts.password else []
    found += [value for _, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=False)]
    return found


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced by ***; ones under 4 characters (and "EMPTY", a local server's
    placeholder key) are too short to tell from words and are not secrets anyway."""
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one secret may contain another
        if len(secret) >= 4 and secret != "EMPTY":
            text = text.replace(secret, "***")
    return text


def public_url(url: str) -> str:
    """The URL as messages, summaries and logs show it: a password or query value in it masked."""
    return redact(url, url_secrets(url))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is an int to Python


def _is_number(value: object) -> bool:
    """A finite int or float: nan and inf pass every comparison check wrongly or mean nothing here."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_url(value: object) -> bool:
    """ "" (resolved later) or an http(s) URL with a host."""
    if not isinstance(value, str):
        return False
    parts = urllib.parse.urlsplit(value)
    return not value or (parts.scheme in ("http", "https") and bool(parts.netloc))


_TEXT = (lambda value: isinstance(value, str), "text (quote it in YAML)")
_NUMBER_OR_NULL = (lambda value: value is None or (_is_number(value) and value >= 0), "a number >= 0 or null")
# key -> (whether a value is acceptable, what it must be); a number given as a flag or key=value arrives untyped
_CHECKS = {
    "problems": _TEXT,
    "out": _TEXT,
    "base_url": (is_url, "an http:// or https:// URL, e.g. http://localhost:8000/v1"),
    "model": _TEXT,
    "prompts": _TEXT,
    "concurrency": (lambda value: _is_int(value) and value >= 1, "an integer >= 1"),
    "limit": (lambda value: value is None or (_is_int(value) and value >= 1), "an integer >= 1 or null"),
    "max_retries": (lambda value: _is_int(value) and value >= 0, "an integer >= 0"),
    "timeout": (lambda value: _is_number(value) and value > 0, "a number > 0"),
    "max_tokens": (lambda value: value is None or (_is_int(value) and value >= 1), "an integer >= 1 or null"),
    "backoff": (lambda value: _is_number(value) and value >= 0, "a number >= 0"),
    "temperature": _NUMBER_OR_NULL,
    "price_in": _NUMBER_OR_NULL,
    "price_out": _NUMBER_OR_NULL,
    "retry_dropped": (lambda value: isinstance(value, bool), "true or false"),
}
