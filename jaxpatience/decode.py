"""Batched generation: prefill a static KV cache, then one `lax.while_loop` of single-token steps.

    generate(model, tokenizer, prompts, max_new_tokens=256, temperature=0.0) -> [Generation(text, token_ids, ...)]
    generate(model, tokenizer, prompts, sampling=SamplingConfig(temperature=0.8, num_samples=4)) -> [[Generation]]

How it stays fast (gemma's sampler is the model for the structure):

* The module is split once per call into (graphdef, state); two plain `jax.jit` functions of the state,
  `_prefill` and `_decode`, take the graphdef as a static argument, so jit's own cache holds one executable per
  (graphdef, sampler kind, mesh, shape bucket) and repeated calls never retrace.
* Shapes are bucketed: prompt length P and new-token budget N round up to powers of two (min 16), the batch to a
  power of two (dummy rows fill it). The cache has S = P + N slots. `max_new_tokens`, temperature, top_p and the
  seed are traced values: changing them does not recompile; greedy vs sampling and top_k are static.
* Prompts are left-padded; positions come from the mask (model.py), so each row counts from its first real
  token, exactly like transformers' `generate`.
* `_decode` donates its carry (the KV cache included), so XLA updates the cache in place.
* Each row draws from its own key, `fold_in(fold_in(key(seed), row_id), step)` with row_id = prompt index *
  num_samples + sample index, so a sample does not depend on which other prompts share its batch.
* With `mesh=`, weights follow sharding.RULES, and the batch (prompts, cache) and the KV heads are placed by their
  logical axes (`batch`, `kv_heads`) through the same rule table as training; this file names no mesh axis.

Shape letters: B batch rows, P prompt bucket, N new-token bucket, S = P + N cache slots, V vocab, E stop tokens,
and L, K, H (layers, kv heads, head dim) in the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpatience import sharding
from jaxpatience.config import SamplingConfig
from jaxpatience.model import KVCache, Qwen2ForCausalLM, init_kv_cache

Array = jax.Array
MIN_LENGTH_BUCKET = 16  # smallest prompt / new-token bucket
CACHE_AXES = ("batch", "length", "kv_heads", None)  # logical names of one layer's [B, S, K, H] cache buffer


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generated continuation: `token_ids` are the new ids only (stop token excluded)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token ended it) or "length" (max_new_tokens reached)


class Sampler(NamedTuple):
    """The static part of the sampling settings (a change compiles a new executable)."""

    greedy: bool  # temperature == 0: argmax
    top_k: int  # 0 = no top-k filter
    use_top_p: bool  # top_p < 1


class DecodeState(NamedTuple):
    """The while_loop carry. One row per (prompt, sample); all arrays live on device."""

    step: Array  # [] tokens generated so far (the same for every row)
    tokens: Array  # [B, N] generated ids; -1 once a row is done
    lengths: Array  # [B] tokens generated before the stop token
    done: Array  # [B] bool: the row produced a stop token (dummy rows start done)
    row_keys: Array  # [B] PRNG keys, one per row
    cache_mask: Array  # [B, S] 1 at real prompt slots and at every generation slot
    kv_cache: KVCache  # keys and values: tuples of L buffers [B, S, K, H]


# ---------------------------------------------------------------------------------------------------
# Sampling (pure; the tests call it directly).


def sample_tokens(logits: Array, keys: Array, sampler: Sampler, temperature: Array, top_p: Array) -> Array:
    """Next token per row. logits [B, V] float32, keys [B] -> ids [B] int32."""
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if sampler.top_k:
        candidates, candidate_ids = jax.lax.top_k(logits, sampler.top_k)  # [B, k], sorted high to low
    elif sampler.use_top_p:
        candidate_ids = jnp.argsort(-logits, axis=-1)  # [B, V] high to low
        candidates = jnp.take_along_axis(logits, candidate_ids, axis=-1)
    else:
        candidates, candidate_ids = logits, None  # plain sampling from the whole vocabulary
    if sampler.use_top_p:
        probs = jax.nn.softmax(candidates, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the higher-ranked candidates
        candidates = jnp.where(mass_before < top_p, candidates, -jnp.inf)  # the top candidate always survives
    choice = jax.vmap(jax.random.categorical)(keys, candidates)  # [B] index into candidates
    if candidate_ids is not None:
        choice = jnp.take_along_axis(candidate_ids, choice[:, None], axis=-1)[:, 0]
    return choice.astype(jnp.int32)


def _step_keys(row_keys: Array, step: Array) -> Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)  # [B]


def _record(carry: DecodeState, token: Array, stop_ids: Array) -> DecodeState:
    """Write this step's token [B] into the carry and update the per-row done flags."""
    is_stop = jnp.isin(token, stop_ids)  # stop_ids [E], padded with -1 (never a token)
    tokens = jax.lax.dynamic_update_index_in_dim(carry.tokens, jnp.where(carry.done, -1, token), carry.step, axis=1)
    lengths = carry.lengths + (~carry.done & ~is_stop)  # a row's stop token is not counted
    return carry._replace(step=carry.step + 1, tokens=tokens, lengths=lengths, done=carry.done | is_stop)


def _mesh_context(mesh):
    return sharding.activate(mesh) if mesh is not None else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------
# The two jitted functions. Everything static is keyword-only and named in static_argnames.


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "new_bucket", "mesh"))
def _prefill(model_state: nnx.State, prompt_ids: Array, prompt_mask: Array, active: Array, row_ids: Array, seed: Array,
             stop_ids: Array, temperature: Array, top_p: Array, *, graphdef: nnx.GraphDef, sampler: Sampler,
             new_bucket: int, mesh) -> DecodeState:  # fmt: skip
    """Run the prompts [B, P] through the model into a fresh cache and sample the first new token."""
    with _mesh_context(mesh):
        model: Qwen2ForCausalLM = nnx.merge(graphdef, model_state)
        batch, prompt_len = prompt_ids.shape
        # Prefill over the P prompt slots only (attention scores [B, K, G, P, P], not P x S), then widen each
        # layer's [B, P, K, H] buffer to S = P + new slots. One buffer per layer (model.KVCache): XLA then writes
        # each decode step's keys and values in place.
        empty = init_kv_cache(model.config, batch, prompt_len)  # zeros, folded away by XLA
        hidden, prompt_cache = model.hidden_states(prompt_ids, prompt_mask, kv_cache=empty, cache_index=0)
        widen = lambda layer: sharding.constrain(jnp.pad(layer, ((0, 0), (0, new_bucket), (0, 0), (0, 0))), CACHE_AXES)
        kv_cache = KVCache(*(tuple(widen(layer) for layer in c) for c in prompt_cache))
        # Generation slots are marked real from the start: the causal mask hides each one until it is written.
        cache_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, new_bucket), prompt_mask.dtype)], axis=1)
        # Left padding puts every row's last prompt token in the last slot: project only that one, [B, V].
        logits = model.logits(hidden[:, -1]).astype(jnp.float32)
        row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), row_ids)  # [B]
        token = sample_tokens(logits, _step_keys(row_keys, 0), sampler, temperature, top_p)
        decode_state = DecodeState(
            step=jnp.zeros((), jnp.int32),
            tokens=jnp.full((batch, new_bucket), -1, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            done=~active,
            row_keys=row_keys,
            cache_mask=cache_mask,
            kv_cache=kv_cache,
        )
        return _record(decode_state, token, stop_ids)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "mesh"), donate_argnames=("decode_state",))
def _decode(model_state: nnx.State, decode_state: DecodeState, stop_ids: Array, max_new_tokens: Array,
            temperature: Array, top_p: Array, *, graphdef: nnx.GraphDef, sampler: Sampler,
            mesh) -> DecodeState:  # fmt: skip
    """Generate until every row is done or `max_new_tokens` tokens exist: one while_loop, one token per step."""
    with _mesh_context(mesh):
        model: Qwen2ForCausalLM = nnx.merge(graphdef, model_state)
        prompt_len = decode_state.cache_mask.shape[1] - decode_state.tokens.shape[1]  # P = S - N

        def keep_going(carry: DecodeState) -> Array:
            return (carry.step < max_new_tokens) & ~jnp.all(carry.done)

        def one_step(carry: DecodeState) -> DecodeState:
            last = jax.lax.dynamic_index_in_dim(carry.tokens, carry.step - 1, axis=1)  # [B, 1]
            last = jnp.maximum(last, 0)  # done rows hold -1: feed any valid id, their output is ignored
            # Token number step-1 sits in slot P + step - 1; its logits give token number `step`.
            hidden, kv_cache = model.hidden_states(last, carry.cache_mask, kv_cache=carry.kv_cache,
                                                   cache_index=prompt_len + carry.step - 1)  # fmt: skip
            logits = model.logits(hidden[:, 0]).astype(jnp.float32)  # [B, V]
            token = sample_tokens(logits, _step_keys(carry.row_keys, carry.step), sampler, temperature, top_p)
            return _record(carry._replace(kv_cache=kv_cache), token, stop_ids)

        return jax.lax.while_loop(keep_going, one_step, decode_state)


# ---------------------------------------------------------------------------------------------------
# Host side: validation, bucketing, batching.


def _bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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


def _check_prompts(ids: list[list[int]], vocab_size: int, context: int, max_new_tokens: int) -> None:
    for i, prompt in enumerate(ids):
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


def _check_settings(settings: dict[str, Any], batch_size: int) -> None:
    """One clear ValueError for a bad sampling setting (before any tokenization or compilation)."""
    max_new_tokens, temperature, top_p, top_k, num_samples = (
        settings[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "num_samples"))  # fmt: skip
    checks = [
        (isinstance(max_new_tokens, int) and max_new_tokens >= 1, f"max_new_tokens must be >= 1, not {max_new_tokens}"),
        (temperature >= 0, f"temperature must be >= 0, not {temperature}"),
        (0 < top_p <= 1, f"top_p must be in (0, 1], not {top_p}"),
        (isinstance(top_k, int) and top_k >= 0, f"top_k must be an integer >= 0 (0 = off), not {top_k}"),
        (num_samples is None or (isinstance(num_samples, int) and num_samples >= 1),
         f"num_samples must be >= 1, not {num_samples}"),
        (isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be >= 1, not {batch_size}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ValueError(message + ".")


def _pack_batch(prompt_ids: list[list[int]], batch: list[int], samples: int, full_rows: int, batch_shards: int):
    """Host arrays for one batch of prompts: left-padded ids and mask [B, P], active rows [B], row ids [B].

    B is a power of two (or `full_rows`, the size of a full batch) and a multiple of the mesh's batch shards;
    P is a power of two >= MIN_LENGTH_BUCKET. Rows are (prompt index, sample index) pairs.
    """
    rows = [(p, s) for p in batch for s in range(samples)]
    num_rows = min(full_rows, _round_up(_bucket(len(rows)), batch_shards))  # B
    prompt_len = _bucket(max(len(prompt_ids[p]) for p in batch), MIN_LENGTH_BUCKET)  # P
    ids = np.zeros((num_rows, prompt_len), np.int32)
    mask = np.zeros((num_rows, prompt_len), np.int32)
    for r in range(num_rows):
        p, _ = rows[min(r, len(rows) - 1)]  # dummy rows repeat the last real row (and start done)
        ids[r, prompt_len - len(prompt_ids[p]) :] = prompt_ids[p]  # left padding
        mask[r, prompt_len - len(prompt_ids[p]) :] = 1
    active = np.arange(num_rows) < len(rows)
    row_ids = np.array([p * samples + s for p, s in rows] + [0] * (num_rows - len(rows)), np.int32)
    return rows, ids, mask, active, row_ids


def _put(array: np.ndarray, mesh, axes: tuple[str | None, ...]) -> Array | np.ndarray:
    """Host array -> device, split along logical `axes` when there is a mesh (uncommitted numpy otherwise)."""
    return array if mesh is None else jax.device_put(array, sharding.named_sharding(mesh, axes, array.shape))


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


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one generate call fixes before its first batch: the split model, the static sampler, the buckets."""

    graphdef: nnx.GraphDef
    model_state: nnx.State  # placed by sharding.RULES when there is a mesh
    mesh: Any
    sampler: Sampler
    stop_array: np.ndarray  # [E] stop ids, padded with -1 so that E is bucketed too
    scalars: dict[str, np.float32]  # the traced sampling settings: temperature, top_p
    max_new_tokens: int
    new_bucket: int  # N
    seed: int
    samples: int  # rows per prompt
    prompts_per_batch: int
    full_rows: int  # B of a full batch: a multiple of the mesh's batch shards
    batch_shards: int


def _plan(model: Qwen2ForCausalLM, settings: dict[str, Any], stop_ids: list[int], batch_size: int, mesh) -> _Plan:
    """Split the model once (jit's cache is keyed on the hashable graphdef and shapes) and fix the buckets."""
    temperature, top_p, samples = settings["temperature"], settings["top_p"], settings["num_samples"] or 1
    top_k = min(settings["top_k"], model.config.vocab_size) if temperature > 0 else 0  # static: greedy ignores it
    graphdef, model_state = nnx.split(model)
    if mesh is not None:
        model_state = jax.device_put(model_state, sharding.state_shardings(mesh, model_state))
    stop_array = np.full(_bucket(len(stop_ids), 4), -1, np.int32)
    stop_array[: len(stop_ids)] = stop_ids
    prompts_per_batch, batch_shards = max(1, batch_size // samples), sharding.batch_shards(mesh)
    return _Plan(
        graphdef=graphdef,
        model_state=model_state,
        mesh=mesh,
        sampler=Sampler(greedy=temperature == 0, top_k=top_k, use_top_p=top_p < 1.0 and temperature > 0),
        stop_array=stop_array,
        scalars=dict(temperature=np.float32(max(temperature, 1e-6)), top_p=np.float32(top_p)),
        max_new_tokens=settings["max_new_tokens"],
        new_bucket=_bucket(settings["max_new_tokens"], MIN_LENGTH_BUCKET),
        seed=settings["seed"],
        samples=samples,
        prompts_per_batch=prompts_per_batch,
        full_rows=_round_up(prompts_per_batch * samples, batch_shards),
        batch_shards=batch_shards,
    )


def _launch(plan: _Plan, prompt_ids: list[list[int]], batch: list[int]) -> tuple[list[tuple[int, int]], DecodeState]:
    """Pad one batch to its buckets and dispatch prefill + decode (asynchronously: nothing waits here)."""
    rows, ids, mask, active, row_ids = _pack_batch(prompt_ids, batch, plan.samples, plan.full_rows, plan.batch_shards)
    mesh, static = plan.mesh, dict(graphdef=plan.graphdef, sampler=plan.sampler, mesh=plan.mesh)
    decode_state = _prefill(
        plan.model_state, _put(ids, mesh, ("batch", "length")), _put(mask, mesh, ("batch", "length")),
        _put(active, mesh, ("batch",)), _put(row_ids, mesh, ("batch",)), np.uint32(plan.seed), plan.stop_array,
        new_bucket=plan.new_bucket, **static, **plan.scalars,
    )  # fmt: skip
    decode_state = _decode(plan.model_state, decode_state, plan.stop_array, np.int32(plan.max_new_tokens), **static,
                           **plan.scalars)  # fmt: skip
    return rows, decode_state


def _collect(rows: list[tuple[int, int]], decode_state: DecodeState, tokenizer,
             results: list[list[Generation | None]]) -> int:  # fmt: skip
    """Copy one finished batch to the host and fill `results`; returns the number of tokens generated."""
    tokens, lengths, done = (np.asarray(a) for a in (decode_state.tokens, decode_state.lengths, decode_state.done))
    for r, (p, s) in enumerate(rows):
        new_ids = tokens[r, : lengths[r]].tolist()
        text = tokenizer.decode(new_ids, skip_special_tokens=True) if tokenizer is not None else ""
        results[p][s] = Generation(text=text, token_ids=new_ids, finish_reason="stop" if done[r] else "length")
    return int(lengths[: len(rows)].sum())


def _run_batches(plan: _Plan, prompt_ids: list[list[int]], tokenizer, progress: bool | None) -> list[list[Generation]]:
    """All batches, shortest prompts first; the next batch is dispatched before the previous one is copied back.

    Returns results[prompt][sample] in the original prompt order.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # similar lengths share a batch
    step = plan.prompts_per_batch
    batches = [order[i : i + step] for i in range(0, len(order), step)]
    results: list[list[Generation | None]] = [[None] * plan.samples for _ in prompt_ids]
    show = progress if progress is not None else len(batches) > 1
    bar = tqdm(total=len(prompt_ids), unit="prompt", disable=not show, desc="generate")
    start, generated = time.perf_counter(), 0
    pending = None
    for batch in batches + [None]:
        launched = _launch(plan, prompt_ids, batch) if batch is not None else None  # dispatch before waiting
        if pending is not None:
            generated += _collect(*pending, tokenizer, results)
            bar.update(len(pending[0]) // plan.samples)
            bar.set_postfix({"tokens/s": f"{generated / (time.perf_counter() - start):.1f}"})
        pending = launched
    bar.close()
    return results


def generate(
    model: Qwen2ForCausalLM,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
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
) -> list[Generation] | list[list[Generation]]:
    """Continue each prompt; returns one `Generation` per prompt, in prompt order.

    prompts: chat-formatted strings (encoded without adding special tokens) or lists of token ids.
    max_new_tokens (default 256), temperature (0), top_p (1), top_k (0), num_samples (None),
    seed (0), stop_tokens (None): the sampling settings, given one by one or all at once as
        `sampling=SamplingConfig(...)` (then none of them may be passed; its num_samples is an int, so the result
        is a list of lists).
    temperature: 0 = greedy (argmax); otherwise sample from softmax(logits / temperature), optionally restricted
        to the top_k most likely tokens and/or the smallest set holding top_p of the probability (nucleus).
    num_samples: None -> a list [len(prompts)] of Generation. An int k -> a list [len(prompts)] of lists [k]
        (sample j of prompt i is result[i][j]); each sample draws from its own key, so rerunning with the same
        seed reproduces it whatever the batch it lands in.
    stop_tokens: ids or single-token strings that end a row (not included in the output). None: the tokenizer's
        eos token and "<|im_end|>" when the vocabulary has it. [] never stops early (benchmarks).
    batch_size: rows (prompt x sample) per device batch, rounded to whole prompts; prompts are sorted by length
        so that a batch holds similar lengths, and results are returned in the original order.
    mesh: a sharding.make_mesh() mesh; weights are placed by sharding.RULES (a no-op when the model was loaded
        with the same mesh), batches are split along the logical `batch` axis.
    progress: a tqdm bar with prompts/s and tokens/s; None shows it when there is more than one batch.
    tokenizer: may be None when prompts and stop tokens are ids; `.text` is then "".
    """
    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                 num_samples=num_samples, seed=seed, stop_tokens=stop_tokens)  # fmt: skip
    settings = _sampling_settings(sampling, given)
    _check_settings(settings, batch_size)
    config = model.config
    prompt_ids = _tokenize(tokenizer, prompts)
    _check_prompts(prompt_ids, config.vocab_size, config.max_position_embeddings, settings["max_new_tokens"])
    stop_ids = _stop_ids(tokenizer, settings["stop_tokens"], config.vocab_size)
    if not prompt_ids:
        return []
    results = _run_batches(_plan(model, settings, stop_ids, batch_size, mesh), prompt_ids, tokenizer, progress)
    return [row[0] for row in results] if settings["num_samples"] is None else results
