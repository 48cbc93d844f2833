"""The OpenAI wire format of `jaxpatience serve`: request bodies in (checked field by field), response bodies out.

No web framework and no JAX here: app.py moves bytes, this file says what they mean, and the tests call it
directly. A bad field is an `ApiError` (HTTP status + one sentence naming the field), returned in OpenAI's error
shape `{"error": {"message", "type", "param", "code"}}`.

A body is checked as a whole before any field is used (`check_body`, one door for hostile input): every string in
it (keys too) must be Unicode that UTF-8 can carry (a lone surrogate such as "\\ud800" is refused, naming where
it is), every field must be one this endpoint knows (an unknown or misspelt one is refused by name, with the
likeliest meant one), and a prompt text longer than the context could hold even at the tokenizer's longest token
is refused by its length before it is tokenized (`max_chars`).

Accepted fields (fields OpenAI defines that change nothing here, such as `user` or `metadata`, are accepted and
ignored; ones that would change the answer and are not implemented, such as a non-zero penalty, are refused):

    model, prompt (string, list of strings, token ids, list of token-id lists) / messages, max_tokens
    (chat: also max_completion_tokens; completions: 0 generates nothing, with `echo` the prompt is scored only),
    temperature [0, 2], top_p (0, 1], top_k (>= 0; -1 = off), n, seed, stop (string or list of strings), stream,
    stream_options.include_usage, logprobs (completions: an integer N in [0, 5], the chosen tokens' log-probs and
    the N likeliest alternatives at each position; chat: true/false, with top_logprobs N in [0, 20]), echo
    (completions: the prompt comes back before the completion, with its tokens' log-probs when logprobs is set;
    what lm-evaluation-harness's loglikelihood requests send), ignore_eos (vLLM's extension: only max_tokens and
    stop strings end a row; benchmarks use it). Alternatives and echo are not streamed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import secrets
import time
import uuid
from typing import Any

from jaxpatience.data.pairs import CHAT_ROLES

MAX_STOP_STRINGS = 16  # OpenAI allows 4; lm-evaluation-harness's local-completions may send more
MAX_TOP_LOGPROBS = {False: 5, True: 20}  # completions' logprobs, chat's top_logprobs (OpenAI's limits)
ACCEPTED_ONLY = {  # fields not implemented -> the values that ask for nothing (besides null)
    "best_of": (1,),
    "suffix": ("",),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "tools": ([],),
    "response_format": ({"type": "text"},),
    "tool_choice": ("none", "auto"),
}
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")  # they change nothing here
COMMON_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream",
                 "stream_options", "logprobs", "ignore_eos")  # fmt: skip
FIELDS = {  # chat -> every field that endpoint takes
    False: frozenset((*COMMON_FIELDS, "prompt", "echo", *ACCEPTED_ONLY, *IGNORED)),
    True: frozenset(
        (*COMMON_FIELDS, "messages", "max_completion_tokens", "top_logprobs", "echo", *ACCEPTED_ONLY, *IGNORED)
    ),
}
STREAM_OPTIONS = frozenset(("include_usage",))


class ApiError(Exception):
    """A request the server refuses: HTTP `status` and one sentence."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclasses.dataclass(frozen=True)
class Settings:
    """One request's prompts and sampling settings, checked (prompt_ids: one list per prompt)."""

    prompt_ids: list[list[int]]
    max_tokens: int
    n: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_ids: list[int]
    stop_strings: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int = 0  # alternatives per position (0: none)
    echo: bool = False  # completions: the prompt and its log-probs come back too


def _field(body: dict, name: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    """body[name] if it is one of `kinds` (never a bool for a number), else a 400 naming the field."""
    value = body.get(name, default)
    if value is None:
        return default
    is_bool = isinstance(value, bool)
    if (is_bool and bool not in kinds) or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}, not {type(value).__name__} {value!r:.40}.", name)
    return value


def _in_range(name: str, value, ok: bool, rule: str):
    if not ok:
        raise ApiError(400, f"'{name}' must be {rule}, not {value!r}.", name)
    return value


def check_body(body: Any, served_name: str, chat: bool | None = None) -> dict:
    """The parsed JSON body as a dict of known fields (those of the chat endpoint or the completions one; None:
    not checked), with text UTF-8 can carry, whose `model` (if given) is the served one."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    _check_text(body, "")
    if chat is not None:
        _check_names(body, FIELDS[chat], "", "/v1/chat/completions" if chat else "/v1/completions")
        if isinstance(body.get("stream_options"), dict):
            _check_names(body["stream_options"], STREAM_OPTIONS, "stream_options.", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string, not {type(model).__name__}.", "model")
    if model not in (None, served_name):
        raise ApiError(
            404, f"model {model!r} does not exist; this server serves {served_name!r}.", "model", "not_found_error"
        )
    for name, accepted in ACCEPTED_ONLY.items():
        if body.get(name) is not None and body[name] not in accepted:
            raise ApiError(400, f"'{name}' = {body[name]!r:.40} is not supported by this server.", name)
    return body


def _check_names(body: dict, known: frozenset, prefix: str, where: str) -> None:
    """Refuse the first field of `body` not in `known`, naming it and the likeliest meant one."""
    for name in body:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ApiError(400, f"unknown field '{prefix}{name:.60}' for {where}{hint}.", prefix + name)


def _check_text(value: Any, where: str) -> None:
    """Refuse a string (a value or a key, at any depth) that UTF-8 cannot carry: a lone surrogate ("\\ud800"),
    which JSON's escapes allow and every tokenizer rejects."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                shown = ascii(value[err.start : err.end])
                raise ApiError(
                    400, f"'{where or 'the body'}' holds {shown}, a lone surrogate, not a Unicode character.", where
                ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, f"{where}.{ascii(key)[1:-1]}".lstrip("."))
            _check_text(item, f"{where}.{key}".lstrip("."))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{where}[{i}]")


def _check_length(text: str, max_chars: int | None, where: str, param: str) -> None:
    """Refuse, before tokenizing it, a text longer than the context can hold at the tokenizer's longest token."""
    if max_chars is not None and len(text) > max_chars:
        raise ApiError(
            400,
            f"{where} has {len(text):,} characters, more than the context can hold (at most {max_chars:,} "
            "characters, the context's tokens at the tokenizer's longest token); shorten it.",
            param,
        )


def max_prompt_chars(tokenizer, max_model_len: int) -> int:
    """The most characters a text of max_model_len tokens can have: each token's text is at most as long as its
    longest vocabulary entry (byte-level entries spell one byte per character)."""
    return max_model_len * max(map(len, tokenizer.get_vocab()), default=1)


def completion_prompts(body: dict, tokenizer, max_chars: int | None = None) -> list[list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists -> ids per prompt."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids (and not empty).", "prompt")
    for i, item in enumerate(prompt):  # every text's length first: tokenizing a long one is what takes time
        if isinstance(item, str):
            _check_length(item, max_chars, f"prompt {i}", "prompt")
    ids = []
    for item in prompt:
        if isinstance(item, str):
            ids.append(list(tokenizer(item, add_special_tokens=False)["input_ids"]))
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids.append(list(item))
        else:
            raise ApiError(400, "each 'prompt' item must be a string or a list of integer token ids.", "prompt")
    return ids


def chat_prompt(body: dict, tokenizer, max_chars: int | None = None) -> list[list[int]]:
    """`messages` through the checkpoint's chat template (with the assistant's turn opened) -> ids."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.", "messages")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'.", "messages")
        if message["role"] not in CHAT_ROLES:  # the one role table (data/pairs.py), as for training records
            raise ApiError(
                400,
                f"messages[{i}].role is {message['role']!r:.40}; a role is one of {', '.join(CHAT_ROLES)}.",
                f"messages[{i}].role",
            )
        content = message.get("content")
        if content is None and message["role"] == "assistant":  # an assistant turn that only called tools
            content = ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                for part in content
            ):
                raise ApiError(400, f"messages[{i}].content may hold text parts only.", "messages")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts.", "messages")
        plain.append({"role": message["role"], "content": content})
    _check_length("".join(m["content"] for m in plain), max_chars, "the messages", "messages")
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # the template's own complaint (jinja raises its own exception types)
        raise ApiError(400, f"the chat template rejected the messages: {err}", "messages") from None
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"])]


def _check_prompt_ids(prompt_ids: list[list[int]], vocab: int, max_prompts: int) -> None:
    if len(prompt_ids) > max_prompts:
        raise ApiError(
            400,
            f"the request holds {len(prompt_ids)} prompts; this server queues at most {max_prompts} (--max-queue).",
            "prompt",
        )
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ApiError(400, f"prompt {i} is empty.", "prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ApiError(400, f"prompt {i} holds a token id outside the vocabulary [0, {vocab}).", "prompt")


def _sampler_fields(body: dict, vocab: int, max_n: int) -> tuple[float, float, int, int, int]:
    """temperature, top_p, top_k (0: off), n and seed, each checked; a request without a seed gets a random one."""
    number = (int, float)
    temperature = _field(body, "temperature", number, 1.0, "a number")
    top_p = _field(body, "top_p", number, 1.0, "a number")
    top_k = _field(body, "top_k", (int,), 0, "an integer")
    n = _field(body, "n", (int,), 1, "an integer")
    _in_range("temperature", temperature, 0 <= temperature <= 2, "in [0, 2]")
    _in_range("top_p", top_p, 0 < top_p <= 1, "in (0, 1]")
    _in_range("top_k", top_k, top_k >= -1, ">= 0 (0 or -1: off)")
    _in_range("n", n, 1 <= n <= max_n, f"in [1, {max_n}] (the server's slots)")
    seed = _field(body, "seed", (int,), None, "an integer")
    seed = secrets.randbits(32) if seed is None else seed % 2**32  # any integer, as OpenAI takes
    top_k = min(top_k, vocab)  # a larger cut keeps every token anyway
    return float(temperature), float(top_p), max(top_k, 0), n, seed


def _stop_fields(body: dict, tokenizer, end_ids: list[int]) -> tuple[list[str], list[int]]:
    """`stop` (the strings matched on the text) and the token ids that end a row: the tokenizer's end tokens
    (none with `ignore_eos`) and each stop string that is a single token of the vocabulary."""
    stop = _field(body, "stop", (str, list), [], "a string or a list of strings")
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings.", "stop")
    ignore_eos = _field(body, "ignore_eos", (bool,), False, "true or false")
    vocab_ids = tokenizer.get_vocab()
    stop_ids = [] if ignore_eos else list(end_ids)
    stop_ids += [vocab_ids[s] for s in stop if s in vocab_ids]  # a special token such as "<|im_end|>" never reaches
    # the text (it is skipped when decoding), so a one-token stop string also stops as a token
    return [s for s in stop if s], sorted(set(stop_ids))


def _output_fields(body: dict, chat: bool) -> tuple[bool, bool, bool, int, bool]:
    """What the answer carries: stream, stream_options.include_usage, logprobs (completions: an integer N in [0, 5],
    where 0 too asks for the chosen tokens' log-probabilities; chat: true or false), N alternatives per position
    (completions: logprobs's N; chat: top_logprobs) and echo (completions only)."""
    stream = _field(body, "stream", (bool,), False, "true or false")
    options = _field(body, "stream_options", (dict,), {}, "an object")
    include_usage = _field(options, "include_usage", (bool,), False, "true or false")
    logprobs = _field(body, "logprobs", (bool,) if chat else (int,), None, "true or false" if chat else "an integer")
    top = _field(body, "top_logprobs", (int,), 0, "an integer") if chat else (logprobs or 0)
    _in_range("top_logprobs" if chat else "logprobs", top, 0 <= top <= MAX_TOP_LOGPROBS[chat],
              f"in [0, {MAX_TOP_LOGPROBS[chat]}]")  # fmt: skip
    if chat and top and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true.", "top_logprobs")
    echo = _field(body, "echo", (bool,), False, "true or false")
    if chat and echo:
        raise ApiError(400, "'echo' is for /v1/completions; chat answers do not repeat the messages.", "echo")
    if stream and (echo or top):
        raise ApiError(400, "'echo' and top log-probs are not streamed; send the request with stream false.", "stream")
    return stream, include_usage, bool(logprobs) or (logprobs == 0 and not chat), top, echo


def _max_tokens(body: dict, prompt_ids: list[list[int]], *, chat: bool, max_model_len: int) -> int:
    """max_tokens (chat: or max_completion_tokens), which must fit in the context after the longest prompt;
    when not given, OpenAI's defaults: the rest of the context (chat) or 16 tokens (completions)."""
    longest = max(map(len, prompt_ids))
    room = max_model_len - longest
    if room < 1:
        raise ApiError(
            400,
            f"the prompt has {_tokens(longest)}, which leaves no room in the context of {_tokens(max_model_len)}.",
            "prompt",
        )
    names = ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",)
    given = (_field(body, name, (int,), None, "an integer") for name in names if body.get(name) is not None)
    max_tokens = next(given, None)
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)
    _in_range("max_tokens", max_tokens, max_tokens >= (1 if chat else 0), ">= 1" if chat else ">= 0")
    if longest + max_tokens > max_model_len:
        raise ApiError(
            400,
            f"the prompt has {_tokens(longest)} and max_tokens is {max_tokens}: {longest + max_tokens} tokens, more "
            f"than the context of {max_model_len}; lower max_tokens.",
            "max_tokens",
        )
    return max_tokens


def sampling_settings(
    body: dict,
    prompt_ids: list[list[int]],
    tokenizer,
    *,
    chat: bool,
    max_model_len: int,
    max_n: int,
    max_prompts: int,
    end_ids: list[int],
) -> Settings:
    """Check every sampling field against the model (vocabulary, context) and the server (slots, queue)."""
    vocab = len(tokenizer)
    _check_prompt_ids(prompt_ids, vocab, max_prompts)
    temperature, top_p, top_k, n, seed = _sampler_fields(body, vocab, max_n)
    stop_strings, stop_ids = _stop_fields(body, tokenizer, end_ids)
    stream, include_usage, logprobs, top_logprobs, echo = _output_fields(body, chat)
    max_tokens = _max_tokens(body, prompt_ids, chat=chat, max_model_len=max_model_len)
    return Settings(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        n=n,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop_ids=stop_ids,
        stop_strings=stop_strings,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        echo=echo,
    )


# ---------------------------------------------------------------------------------------------------
# Responses.


def _tokens(count: int) -> str:
    return f"{count} token" if count == 1 else f"{count} tokens"


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def logprobs_body(
    tokenizer,
    token_ids: list[int],
    logprobs: list[float | None],
    *,
    chat: bool,
    offset: int = 0,
    top: list[list[tuple[int, float]] | None] | None = None,
) -> dict:
    """The tokens' log-probabilities in OpenAI's shape; `top`: each position's alternatives as (id, log-prob),
    likeliest first (None: not computed). An echoed prompt's first token has no log-prob (None), as in OpenAI's.

    A token's `text_offset` is where its text starts in the completion (`offset`: the text already sent), found by
    decoding each prefix, so that a character split over several tokens does not shift the rest.
    """
    pieces = [tokenizer.decode([t]) for t in token_ids]
    top = top or [None] * len(token_ids)
    if chat:
        rows = zip(token_ids, pieces, logprobs, top, strict=True)
        return {
            "content": [
                {
                    "token": piece,
                    "logprob": lp,
                    "bytes": list(_token_bytes(tokenizer, t, piece)),
                    "top_logprobs": [_alternative(tokenizer, a, alp) for a, alp in alternatives or []],
                }
                for t, piece, lp, alternatives in rows
            ]
        }
    offsets = [offset + len(tokenizer.decode(token_ids[:i], skip_special_tokens=True)) for i in range(len(token_ids))]
    # Alternatives as {text: log-prob}, the least likely first: two ids with the same text keep the likelier value.
    tops = [None if a is None else {tokenizer.decode([t]): lp for t, lp in reversed(a)} for a in top]
    return {
        "tokens": pieces,
        "token_logprobs": logprobs,
        "top_logprobs": tops if any(a is not None for a in top) else None,
        "text_offset": offsets,
    }


def _alternative(tokenizer, token_id: int, logprob: float) -> dict:
    piece = tokenizer.decode([token_id])
    return {"token": piece, "logprob": logprob, "bytes": list(_token_bytes(tokenizer, token_id, piece))}


def _token_bytes(tokenizer, token_id: int, piece: str) -> bytes:
    """A token's own bytes: a byte-level BPE token (Qwen's) maps each character back to one byte; other
    tokenizers give the UTF-8 of the token's text."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    table = _unicode_to_bytes()
    if isinstance(token, str) and token and all(char in table for char in token):
        return bytes(table[char] for char in token)
    return piece.encode()


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    """The inverse of GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for 256 + i."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {chr(b): b for b in printable}, 0
    for byte in range(256):
        if byte not in printable:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


def choice_body(
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict | None,
    *,
    chat: bool,
    stream: bool,
    first: bool = False,
) -> dict:
    """One choice of a response (stream: of a chunk)."""
    if not chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if stream:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def response_body(
    request_id: str, model: str, choices: list[dict], *, chat: bool, stream: bool, usage_body: dict | None
) -> dict:
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage_body is not None or not stream:
        body["usage"] = usage_body
    return body
