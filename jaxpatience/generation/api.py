"""Generation: `generate` continues prompts with the KV-cached Qwen2, greedy or sampled, on one device or a mesh.

    generate(model, tokenizer, prompts, max_new_tokens=256, temperature=0.0) -> [Generation(text, token_ids, ...)]
    generate(model, tokenizer, prompts, sampling=SamplingConfig(temperature=0.8, num_samples=4)) -> [[Generation]]
    generate(model, tokenizer, [Request(prompt, max_new_tokens=40, stop_tokens=["<|im_end|>"]), ...])

This file checks the input (one sentence per bad prompt, setting or request) and fixes a `Plan`: the split model
(graphdef + state, placed by sharding.RULES on a mesh), the static sampler, the traced settings. Two decoders run
the plan:

* scheduler.py over slots.py (default, `engine="slots"`): continuous batching over a fixed set of slots; a
  finished row frees its slot for the next prompt; one prefill per prompt for its n samples; per-request budgets
  and stop tokens; runs on several processes (every process calls generate alike; weights and slots are split
  over the global mesh).
* static.py (`engine="static"`): the earlier static batches, kept as the benchmark's baseline.

Both give the same tokens: greedy is token-exact against transformers and an uncached rollout, and each row draws
from its own key (sampling.py), so a sample does not depend on the rest of its batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxpatience.config import SamplingConfig
from jaxpatience.generation.sampling import Generation, Sampler, sample_tokens
from jaxpatience.generation.scheduler import EngineStats, run_slots
from jaxpatience.generation.shapes import Plan, make_plan
from jaxpatience.generation.static import run_batches
from jaxpatience.model.qwen2 import Qwen2ForCausalLM

__all__ = ["EngineStats", "Generation", "Request", "Sampler", "generate", "sample_tokens"]
ENGINES = ("slots", "static")


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt with its own settings; None takes the call's value.

    seed_index: the rows' key id (sampling.py): sample j draws from key(seed, seed_index * num_samples + j);
        None uses the prompt's position in the call. An evaluation passes each problem's index in its whole set,
        so that a resumed run draws the same samples as an uninterrupted one.
    """

    prompt: str | Sequence[int]
    max_new_tokens: int | None = None
    stop_tokens: Sequence[int | str] | None = None
    seed_index: int | None = None


def _tokenize(tokenizer, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    ids = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is a string, but no tokenizer was given to encode it.")
            ids.append(list(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
        elif isinstance(prompt, Sequence | np.ndarray):
            try:
                as_array = np.asarray(prompt)  # one conversion instead of a check per token
            except ValueError:
                as_array = np.asarray([[]])  # ragged nesting: rejected just below
            if as_array.ndim != 1 or (as_array.size and as_array.dtype.kind not in "iu"):
                raise ValueError(f"prompt {i} is not a flat list of integer token ids.")
            ids.append(as_array.astype(np.int64).tolist())
        else:
            raise ValueError(f"prompt {i} is a {type(prompt).__name__}; expected a string or a list of token ids.")
    return ids


def _check_prompts(ids: list[list[int]], vocab_size: int, context: int, budgets: list[int]) -> None:
    for i, (prompt, max_new_tokens) in enumerate(zip(ids, budgets, strict=True)):
        if not prompt:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token.")
        if len(prompt) > context:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens, longer than the model's context of {context}.")
        if len(prompt) + max_new_tokens > context:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens, so max_new_tokens={max_new_tokens} would run past the "
                f"model's context of {context}; lower max_new_tokens."
            )
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ValueError(f"prompt {i} holds a token id outside the vocabulary [0, {vocab_size}).")


def default_stop_ids(tokenizer) -> list[int]:
    """The ids that end a row by default: the tokenizer's eos and ChatML's <|im_end|> when the vocabulary has it."""
    return _stop_ids(tokenizer, None, 0)


def _stop_ids(tokenizer, stop_tokens: Sequence[int | str] | None, vocab_size: int) -> list[int]:
    """Stop token ids. None: the tokenizer's eos and ChatML's <|im_end|> when the vocabulary has it."""
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}  # token string -> id (no unk fallback)
    if stop_tokens is None:
        return sorted({t for t in (getattr(tokenizer, "eos_token_id", None), vocab.get("<|im_end|>")) if t is not None})
    ids = []
    for token in stop_tokens:
        if isinstance(token, str):
            token_id = vocab.get(token)
            if token_id is None:
                raise ValueError(f"stop token {token!r} is not a single token of the tokenizer's vocabulary.")
            ids.append(token_id)
        elif isinstance(token, int | np.integer) and 0 <= token < vocab_size:
            ids.append(int(token))
        else:
            raise ValueError(f"stop token {token!r} is not a token id in [0, {vocab_size}) nor a token string.")
    return ids


def _check_settings(settings: dict[str, Any], batch_size: int, engine: str, chunk_steps: int) -> None:
    """One clear ValueError for a bad sampling setting (before any tokenization or compilation)."""
    max_new_tokens, temperature, top_p, top_k, num_samples = (
        settings[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "num_samples")
    )
    checks = [
        (isinstance(max_new_tokens, int) and max_new_tokens >= 1, f"max_new_tokens must be >= 1, not {max_new_tokens}"),
        (temperature >= 0, f"temperature must be >= 0, not {temperature}"),
        (0 < top_p <= 1, f"top_p must be in (0, 1], not {top_p}"),
        (isinstance(top_k, int) and top_k >= 0, f"top_k must be an integer >= 0 (0 = off), not {top_k}"),
        (
            num_samples is None or (isinstance(num_samples, int) and num_samples >= 1),
            f"num_samples must be >= 1, not {num_samples}",
        ),
        (isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be >= 1, not {batch_size}"),
        (engine in ENGINES, f"unknown engine {engine!r}: use {' or '.join(ENGINES)}"),
        (isinstance(chunk_steps, int) and chunk_steps >= 1, f"chunk_steps must be an integer >= 1, not {chunk_steps}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message + ".")


def _requests(prompts: Sequence, settings: dict[str, Any], tokenizer, vocab_size: int):
    """Per prompt: its budget, its stop ids and its seed index (a Request's own values, else the call's)."""
    requests = [prompt if isinstance(prompt, Request) else Request(prompt) for prompt in prompts]
    budgets, stops = [], []
    for i, request in enumerate(requests):
        budget = settings["max_new_tokens"] if request.max_new_tokens is None else request.max_new_tokens
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"prompt {i}: max_new_tokens must be an integer >= 1, not {budget!r}.")
        budgets.append(budget)
        stop_tokens = settings["stop_tokens"] if request.stop_tokens is None else request.stop_tokens
        try:
            stops.append(_stop_ids(tokenizer, stop_tokens, vocab_size))
        except ValueError as err:
            raise (ValueError(f"prompt {i}: {err}") if request.stop_tokens is not None else err) from None
    seed_indices = [i if r.seed_index is None else r.seed_index for i, r in enumerate(requests)]
    return [r.prompt for r in requests], budgets, stops, seed_indices


class _Unset:
    """The default of generate's sampling arguments: tells "not passed" from an explicit value, so that `sampling=`
    together with any of them can be refused (a second, conflicting value would otherwise win silently)."""

    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()
# SamplingConfig's defaults, except two that generate() has always had: 256 new tokens (configs default to 512,
# an evaluation's budget) and no num_samples, which means a flat list of Generations.
_SAMPLING_DEFAULTS = {**SamplingConfig().generate_kwargs(), "max_new_tokens": 256, "num_samples": None}


def _sampling_settings(sampling: SamplingConfig | None, given: dict[str, Any]) -> dict[str, Any]:
    """generate's seven sampling arguments, from `sampling` or from the arguments `given` (defaults filled in)."""
    passed = [name for name, value in given.items() if value is not _UNSET]
    if sampling is None:
        return {name: _SAMPLING_DEFAULTS[name] if value is _UNSET else value for name, value in given.items()}
    if passed:
        raise ValueError(f"pass either sampling or {', '.join(passed)}, not both (sampling sets them all).")
    return sampling.generate_kwargs()


def _prepare_rows(prompts: Sequence, settings: dict[str, Any], tokenizer, config, engine: str):
    """The call's prompts as checked token ids, with their budgets, stop ids and seed indices (one of each per
    prompt); refuses per-prompt budgets or stops that the static engine cannot follow."""
    texts, budgets, stops, seed_indices = _requests(prompts, settings, tokenizer, config.vocab_size)
    prompt_ids = _tokenize(tokenizer, texts)
    _check_prompts(prompt_ids, config.vocab_size, config.max_position_embeddings, budgets)
    if engine == "static" and (len(set(budgets)) > 1 or any(stop != stops[0] for stop in stops)):
        raise ValueError("the static engine takes one max_new_tokens and one set of stop tokens per call.")
    return prompt_ids, budgets, stops, seed_indices


def _run_engine(
    engine: str,
    plan: Plan,
    prompt_ids: list[list[int]],
    budgets: list[int],
    stops: list[list[int]],
    tokenizer,
    progress: bool | None,
    on_result: Callable[[int, int, Generation], None] | None,
    stats: EngineStats | None,
) -> list[list[Generation]]:
    """Decode the plan with the chosen engine: results[prompt][sample], in prompt order."""
    if engine == "static":
        return run_batches(plan, prompt_ids, tokenizer, progress, on_result)
    return run_slots(plan, prompt_ids, budgets, stops, tokenizer, progress=progress, on_result=on_result, stats=stats)


def generate(
    model: Qwen2ForCausalLM,
    tokenizer,
    prompts: Sequence[str | Sequence[int] | Request],
    max_new_tokens: int = _UNSET,
    temperature: float = _UNSET,
    *,
    top_p: float = _UNSET,
    top_k: int = _UNSET,
    num_samples: int | None = _UNSET,
    seed: int = _UNSET,
    stop_tokens: Sequence[int | str] | None = _UNSET,
    sampling: SamplingConfig | None = None,
    batch_size: int = 32,
    mesh=None,
    progress: bool | None = None,
    engine: str = "slots",
    on_result: Callable[[int, int, Generation], None] | None = None,
    stats: EngineStats | None = None,
    chunk_steps: int = 32,
) -> list[Generation] | list[list[Generation]]:
    """Continue each prompt; returns one `Generation` per prompt, in prompt order.

    prompts: chat-formatted strings (encoded without adding special tokens), lists of token ids, or `Request`s
        (a prompt with its own max_new_tokens / stop tokens / seed index).
    max_new_tokens (256), temperature (0), top_p (1), top_k (0), num_samples (None), seed (0), stop_tokens (None):
        the sampling settings, one by one or all at once as `sampling=SamplingConfig(...)` (not both).
    temperature: 0 = greedy (argmax); otherwise sample from softmax(logits / temperature), optionally restricted
        to the top_k most likely tokens and/or the smallest set holding top_p of the probability (nucleus).
    num_samples: None -> a list [len(prompts)] of Generation; an int k (SamplingConfig's is) -> lists [k] per
        prompt. Each sample draws from its own key: the same seed reproduces it whatever batch it lands in.
    stop_tokens: ids or single-token strings that end a row (not included in the output). None: the tokenizer's
        eos token and "<|im_end|>" when the vocabulary has it. [] never stops early (benchmarks).
    batch_size: rows (prompt x sample) decoded at once: the slot count (or the static batch size).
    mesh: a sharding.make_mesh() mesh; weights are placed by sharding.RULES, rows split along the logical `batch`
        axis. On several processes every process calls generate alike (model loaded with the mesh).
    engine: "slots" (slots.py) or "static" (static.py: one budget and stop set per call, one process).
    on_result: on_result(prompt index, sample index, Generation) as soon as each row is done (streaming).
    stats: an `EngineStats` the slot engine fills in; chunk_steps: its most decode steps between host looks.
    progress: show a progress bar (None: when rows outnumber slots). tokenizer: None if prompts and stops are ids.
    """
    given = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        num_samples=num_samples,
        seed=seed,
        stop_tokens=stop_tokens,
    )
    settings = _sampling_settings(sampling, given)
    _check_settings(settings, batch_size, engine, chunk_steps)
    prompt_ids, budgets, stops, seed_indices = _prepare_rows(prompts, settings, tokenizer, model.config, engine)
    if not prompt_ids:
        return []
    plan = make_plan(model, settings, stops, budgets, seed_indices, batch_size, mesh, chunk_steps)
    results = _run_engine(engine, plan, prompt_ids, budgets, stops, tokenizer, progress, on_result, stats)
    return [row[0] for row in results] if settings["num_samples"] is None else results
