"""The settings of `jaxpatience pairs` (one frozen dataclass) and the error every teacher module raises.

`TeacherConfig` is read like every command's config (YAML < flags < key=value, see `config.command_parser`), so
each field is a plain YAML value: the prompts are a file *path* (teacher_prompts.load_prompts reads it), and the
API key is no setting at all: it comes only from OPENAI_API_KEY, so that it never lands in a config file.
Values from a command line arrive as YAML scalars, untyped by argparse: `__post_init__` checks their types.
"""

from __future__ import annotations

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
    timeout: float = 120.0  # seconds per request
    temperature: float | None = None  # None: the server's default
    backoff: float = 1.0  # first backoff sleep in seconds; doubles per retry, jittered
    prompts: str = ""  # prompt templates (YAML); "": configs/teacher_prompts.yaml
    retry_dropped: bool = False  # ask again for problems that earlier runs dropped
    price_in: float | None = None  # $ per 1M prompt tokens; None: from teacher.PRICES_PER_MILLION
    price_out: float | None = None  # $ per 1M completion tokens

    def __post_init__(self) -> None:
        for key in ("problems", "out", "base_url", "model", "prompts"):
            if getattr(self, key) is None:  # `key=` or `key: null` leaves a text setting unset, as "" does
                object.__setattr__(self, key, "")  # how a frozen dataclass sets a field of its own
        for key, (acceptable, expected) in _CHECKS.items():
            value = getattr(self, key)
            if not acceptable(value):
                raise ConfigError(f"pairs: {key} must be {expected}, not {value!r}.")

    def validate(self) -> TeacherConfig:
        """Raise ConfigError unless a command-line run can start (its problems, output and model are named)."""
        for key in ("problems", "out", "model"):
            if not getattr(self, key):
                raise ConfigError(f"pairs: {key} is not set (--{key} ... or {key}=...).")
        return self


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is an int to Python


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TEXT = (lambda value: isinstance(value, str), "text (quote it in YAML)")
_NUMBER_OR_NULL = (lambda value: value is None or _is_number(value), "a number or null")
# key -> (whether a value is acceptable, what it must be); a number given as a flag or key=value arrives untyped
_CHECKS = {
    "problems": _TEXT,
    "out": _TEXT,
    "base_url": _TEXT,
    "model": _TEXT,
    "prompts": _TEXT,
    "concurrency": (lambda value: _is_int(value) and value >= 1, "an integer >= 1"),
    "limit": (lambda value: value is None or (_is_int(value) and value >= 1), "an integer >= 1 or null"),
    "max_retries": (lambda value: _is_int(value) and value >= 0, "an integer >= 0"),
    "timeout": (lambda value: _is_number(value) and value > 0, "a number > 0"),
    "backoff": (lambda value: _is_number(value) and value >= 0, "a number >= 0"),
    "temperature": _NUMBER_OR_NULL,
    "price_in": _NUMBER_OR_NULL,
    "price_out": _NUMBER_OR_NULL,
    "retry_dropped": (lambda value: isinstance(value, bool), "true or false"),
}
