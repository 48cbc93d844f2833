"""The slot engine: continuous batching over a fixed set of cache rows ("slots"), the device side.

Each of B slots holds one (prompt, sample) row with its own cache fill, position and budget; a row that finishes
frees its slot for the next waiting prompt while the others go on. Two host loops drive these functions:
`generate`'s (scheduler.py: insert, decode a chunk, hand out finished rows, shrink the tail) and the server's
(serving/live.py: requests join and leave between chunks). The jitted steps:

* **insert**: prefill a bucket of waiting prompts once each ([Bp, P], left-padded), sample each row's first token,
  and scatter the prompt's keys/values into its `num_samples` free slots (one prefill per prompt, however many
  samples), at cache slots [0, len): no padding inside a slot, so a row's cache slot is its RoPE position;
* **decode a chunk** (one `lax.while_loop`): one token per slot per step, until enough slots are free to refill
  (or every slot is done, or `chunk_steps` steps have passed);
* **resize** / **release**: gather the busy slots into a smaller bucket (the tail), or free slots.

Shapes stay static: the slot count B (`batch_size` rounded up to the mesh's batch shards, or the call's row count
bucketed when smaller) and the tail's buckets (B / 4^k, rounded up to the batch shards), the cache length S
(a power of two above the longest prompt + its budget), the inserts' prompt counts Bp (powers of 4 from
scheduler.py; a fixed count from serving's `fixed_shapes`) and the attention windows (powers of two), prompt
lengths P (2^k or 1.5 * 2^k): a call compiles a few executables and a second call with the same buckets
compiles nothing.

Per row: its own max_new_tokens (`budget`), stop tokens, seed, temperature, top_p and top_k (serving/live.py
mixes requests; `generate` gives every row the call's); keys from sampling.py (a sample is the same whatever
slot or batch it lands in). With a mesh, slots are split over the logical `batch` axis and every host-side
decision is made from arrays all processes read alike (sharding.fetch), so the same loops run on a pod.

Shape letters: B slots, S cache slots per row, N token buffer per row (largest budget bucket), E stop tokens per
row, Bp prompts per insert, P prompt bucket, R rows per insert (Bp x num_samples, rounded up to the batch
shards), V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpatience import sharding
from jaxpatience.generation.sampling import chosen_logprobs, row_keys, sample_tokens, step_keys
from jaxpatience.generation.shapes import CACHE_AXES, MIN_LENGTH_BUCKET, bucket, round_up
from jaxpatience.model.qwen2 import KVCache, Qwen2ForCausalLM, init_kv_cache

Array = jax.Array
ROW = ("batch",)  # logical axes of a per-slot vector


class Slots(NamedTuple):
    """The device state of every slot; one row per slot. Free slots are `done`."""

    kv_cache: KVCache  # L x [B, K, S, H]: a row's prompt at slots [0, len), its new tokens after it
    index: Array  # [B] the cache slot the next fed token is written to (= its RoPE position: no padding inside)
    last: Array  # [B] the last sampled token, fed at the next step
    tokens: Array  # [B, N] the row's sampled tokens so far (its stop token included)
    logprobs: Array  # [B, N] float32: each sampled token's log-probability under the model (temperature 1)
    count: Array  # [B] tokens sampled so far
    budget: Array  # [B] the row's max_new_tokens
    stopped: Array  # [B] bool: the row sampled one of its stop tokens
    done: Array  # [B] bool: stopped or budget reached (free slots are done)
    stop_ids: Array  # [B, E] the row's stop ids, padded with -1 (never a token)
    row_id: Array  # [B] the row's key id (sampling.row_keys)
    seed: Array  # [B] uint32: the row's seed
    temperature: Array  # [B] float32 (0: greedy)
    top_p: Array  # [B] float32
    top_k: Array  # [B] int32 (0: off); read by Sampler.per_row only (else the sampler's static top_k)


# ---------------------------------------------------------------------------------------------------
# The jitted functions. Everything static is keyword-only; the slots are donated (updated in place).


def _constrain_slots(slots: Slots) -> Slots:
    kv = KVCache(*(tuple(sharding.constrain(layer, CACHE_AXES) for layer in part) for part in slots.kv_cache))
    rows = {
        name: sharding.constrain(value, ROW + (None,) * (value.ndim - 1))
        for name, value in slots._asdict().items()
        if name != "kv_cache"
    }
    return Slots(kv_cache=kv, **rows)


def _mark_free(slots: Slots) -> Slots:
    """Zeroed slots made free: done, with no stop id (-1 is never a token)."""
    return slots._replace(done=jnp.ones_like(slots.done), stop_ids=jnp.full_like(slots.stop_ids, -1))


@functools.partial(jax.jit, static_argnames=("shape", "mesh"))
def _empty_slots(*, shape: tuple[int, ...], mesh) -> Slots:
    """Every slot free. shape = (L, B, S, K, H, N, E, dtype name)."""
    layers, rows, cache_len, kv_heads, head_dim, new_len, stop_len, dtype = shape
    with sharding.activate_if(mesh):
        buffer = lambda: jnp.zeros((rows, kv_heads, cache_len, head_dim), dtype)
        zeros = lambda dtype=jnp.int32: jnp.zeros((rows,), dtype)
        zeroed = Slots(
            kv_cache=KVCache(tuple(buffer() for _ in range(layers)), tuple(buffer() for _ in range(layers))),
            index=zeros(),
            last=zeros(),
            tokens=jnp.zeros((rows, new_len), jnp.int32),
            logprobs=jnp.zeros((rows, new_len), jnp.float32),
            count=zeros(),
            budget=zeros(),
            stopped=zeros(bool),
            done=zeros(bool),
            stop_ids=jnp.zeros((rows, stop_len), jnp.int32),
            row_id=zeros(),
            seed=zeros(jnp.uint32),
            temperature=zeros(jnp.float32),
            top_p=zeros(jnp.float32),
            top_k=zeros(),
        )
        return _constrain_slots(_mark_free(zeroed))


def _is_stop(token: Array, stop_ids: Array) -> Array:
    return jnp.any(token[:, None] == stop_ids, axis=-1)  # token [B], stop_ids [B, E] -> [B]


def _left_to_front(rows: Array, lengths: Array) -> Array:
    """Left-padded prompt caches [Bp, K, P, H] rolled so that each row's `lengths` real entries come first."""
    prompt_len = rows.shape[2]
    source = (jnp.arange(prompt_len)[None, :] + (prompt_len - lengths)[:, None]) % prompt_len  # [Bp, P]
    return jnp.take_along_axis(rows, source[:, None, :, None], axis=2)


def _write_prompts(cache: KVCache, prompt_cache: KVCache, targets: Array, sources: Array, lengths: Array) -> KVCache:
    """The slots' cache with row r's prompt (prompt_cache: L x [Bp, K, P, H], left-padded) written to slot
    `targets[r]`, cache slots [0, P): prompt `sources[r]`, its `lengths` real entries first."""
    prompt_len = prompt_cache.k[0].shape[2]  # P
    write = lambda buffer, rows: buffer.at[targets, :, :prompt_len].set(
        _left_to_front(rows, lengths)[sources], mode="drop"
    )
    return KVCache(
        *(tuple(write(b, p) for b, p in zip(*parts, strict=True)) for parts in zip(cache, prompt_cache, strict=True))
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "mesh"), donate_argnames=("slots",))
def _insert(
    model_state: nnx.State,
    slots: Slots,
    prompt_ids: Array,
    prompt_mask: Array,
    targets: Array,
    sources: Array,
    settings: dict[str, Array],
    *,
    graphdef: nnx.GraphDef,
    sampler,
    mesh,
) -> Slots:
    """Prefill prompts [Bp, P] once each; row r (of R) copies prompt `sources[r]` into slot `targets[r]`.

    settings: the rows' own values [R] of row_id, budget, stop_ids [R, E], seed, temperature, top_p, top_k.
    The prompt's keys/values go to cache slots [0, len) (its left padding rolled to the back, where the row's
    first new tokens overwrite it; the causal mask hides it until then). Padding rows target slot B (out of
    range): their writes are dropped.
    """
    with sharding.activate_if(mesh):
        model: Qwen2ForCausalLM = nnx.merge(graphdef, model_state)
        prompts, prompt_len = prompt_ids.shape
        empty = init_kv_cache(model.config, prompts, prompt_len)  # zeros, folded away by XLA
        hidden, prompt_cache = model.hidden_states(prompt_ids, prompt_mask, kv_cache=empty, cache_index=0)
        logits = model.logits(hidden[:, -1]).astype(jnp.float32)[sources]  # [R, V]: left padding, last slot
        keys = step_keys(row_keys(settings["seed"], settings["row_id"]), 0)
        token = sample_tokens(logits, keys, sampler, settings["temperature"], settings["top_p"], settings["top_k"])
        lengths = jnp.sum(prompt_mask, axis=1)  # [Bp]
        kv = _write_prompts(slots.kv_cache, prompt_cache, targets, sources, lengths)
        stopped = _is_stop(token, settings["stop_ids"])
        put = lambda array, values: array.at[targets].set(values, mode="drop")
        first = lambda array, values: array.at[targets, 0].set(values, mode="drop")
        return _constrain_slots(
            Slots(
                kv_cache=kv,
                index=put(slots.index, lengths[sources]),  # the first sampled token goes to slot len
                last=put(slots.last, token),
                tokens=first(slots.tokens, token),
                logprobs=first(slots.logprobs, chosen_logprobs(logits, token)),
                count=put(slots.count, jnp.ones_like(targets)),
                budget=put(slots.budget, settings["budget"]),
                stopped=put(slots.stopped, stopped),
                done=put(slots.done, stopped | (settings["budget"] <= 1)),
                **{
                    name: put(getattr(slots, name), settings[name])
                    for name in ("stop_ids", "row_id", "seed", "temperature", "top_p", "top_k")
                },
            )
        )


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "window", "mesh"), donate_argnames=("slots",))
def _decode_chunk(
    model_state: nnx.State,
    slots: Slots,
    max_steps: Array,
    refill_at: Array,
    *,
    graphdef: nnx.GraphDef,
    sampler,
    window: int,
    mesh,
) -> tuple[Slots, Array]:
    """One token per slot per step until `refill_at` slots are done, every slot is done, or `max_steps` steps.

    Attention reads only the first `window` cache slots (a bucket above every busy row's last slot in this
    chunk). Done slots compute too (a static shape) but change nothing. Returns the slots and the steps taken.
    """
    with sharding.activate_if(mesh):
        model: Qwen2ForCausalLM = nnx.merge(graphdef, model_state)
        rows, new_len = slots.tokens.shape

        def keep_going(carry) -> Array:
            state, steps = carry
            free = jnp.sum(state.done)
            return (steps < max_steps) & (free < rows) & (free < refill_at)

        def one_step(carry):
            state, steps = carry
            active = ~state.done
            hidden, kv = model.hidden_states(
                state.last[:, None],
                kv_cache=state.kv_cache,
                cache_index=state.index,
                positions=state.index[:, None],
                attend_len=window,
            )
            logits = model.logits(hidden[:, 0]).astype(jnp.float32)  # [B, V]
            keys = step_keys(row_keys(state.seed, state.row_id), state.count)
            token = sample_tokens(logits, keys, sampler, state.temperature, state.top_p, state.top_k)  # [B]
            column = jnp.where(active, state.count, new_len)  # done rows write nothing (out of range: dropped)
            at_column = lambda buffer, values: buffer.at[jnp.arange(rows), column].set(values, mode="drop")
            stopped = state.stopped | (active & _is_stop(token, state.stop_ids))
            count = state.count + active
            state = state._replace(
                kv_cache=kv,
                index=state.index + active,
                last=jnp.where(active, token, state.last),
                tokens=at_column(state.tokens, token),
                logprobs=at_column(state.logprobs, chosen_logprobs(logits, token)),
                count=count,
                stopped=stopped,
                done=stopped | (count >= state.budget),
            )
            return state, steps + 1

        slots, steps = jax.lax.while_loop(keep_going, one_step, (slots, jnp.zeros((), jnp.int32)))
        return _constrain_slots(slots), steps


@functools.partial(jax.jit, static_argnames=("mesh",))  # no donation: the output has another size
def _resize_slots(slots: Slots, keep: Array, *, mesh) -> Slots:
    """A new state of len(keep) slots: slot i is old slot keep[i], or a free one where keep[i] >= B (the tail
    shrinks this way; the server also grows)."""
    with sharding.activate_if(mesh):
        fresh = _mark_free(jax.tree.map(lambda a: jnp.zeros((keep.shape[0],) + a.shape[1:], a.dtype), slots))
        joined = jax.tree.map(lambda old, new: jnp.concatenate([old, new]), slots, fresh)
        return _constrain_slots(jax.tree.map(lambda array: array[keep], joined))


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("slots",))
def _release_slots(slots: Slots, release: Array, *, mesh) -> Slots:
    """Mark the slots `release` [B] bool done (a cancelled request's rows: their slots become free)."""
    with sharding.activate_if(mesh):
        return _constrain_slots(slots._replace(done=slots.done | release))


# ---------------------------------------------------------------------------------------------------
# Host side: one call per jitted function, shared by generate's loop (scheduler.py) and serving/live.py.


class Placed(Protocol):
    """What the host calls need of a model: shapes.Plan has it, and so has serving's LiveEngine."""

    graphdef: nnx.GraphDef
    model_state: nnx.State
    mesh: Any
    batch_shards: int  # the mesh's split of the batch axis: row counts are multiples of it


@dataclasses.dataclass(frozen=True)
class Row:
    """One (prompt, sample) row to insert: where it goes and its own settings."""

    slot: int
    prompt: int  # index into the insert's prompts
    row_id: int  # its key id (sampling.row_keys)
    budget: int  # max_new_tokens
    stop_ids: Sequence[int]
    seed: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0


def prompt_bucket(n: int) -> int:
    """The prefill length of an insert: the smallest 2^k or 1.5 * 2^k >= n (>= 16), so that at most a third of
    a prefill (about a sixth on average) is padding, with twice as many buckets as powers of two."""
    power = bucket(n, MIN_LENGTH_BUCKET)
    return power * 3 // 4 if power * 3 // 4 >= n and power > MIN_LENGTH_BUCKET else power


def power_below(n: int, base: int = 2) -> int:
    """The largest power of `base` <= n (n >= 1)."""
    power = 1
    while power * base <= n:
        power *= base
    return power


def _replicated(placed: Placed, *arrays):
    """Small host arrays and scalars every process holds alike, as (replicated) jit arguments."""
    return tuple(sharding.put_global(np.asarray(a), placed.mesh, (None,) * np.ndim(a)) for a in arrays)


def empty_slots(placed: Placed, shape: tuple) -> Slots:
    """A state of free slots. shape = (B, L, S, K, H, N, E, dtype name)."""
    rows, layers, *others = shape
    return _empty_slots(shape=(layers, rows, *others), mesh=placed.mesh)


def insert(
    placed: Placed,
    slots: Slots,
    sampler,
    prompts: list[list[int]],
    rows: list[Row],
    shape: tuple[int, int] | None = None,
) -> Slots:
    """Prefill `prompts` (once each; a power of two of them wastes no prefill row) and start `rows` in their slots.

    shape: (Bp, P) to prefill exactly Bp prompts of P tokens and start Bp rows (at least the given ones), so that
    every insert of a known workload is one compiled program (serving/live.py's fixed_shapes); the prompts past
    `prompts` are one token each and start no row. Each row's prompt length + budget must fit the cache (the
    callers check it).
    """
    slot_count, cache_len = slots.done.shape[0], slots.kv_cache.k[0].shape[2]
    prompt_count, prompt_len = shape or (len(prompts), min(prompt_bucket(max(map(len, prompts))), cache_len))
    if shape and (max(len(prompts), len(rows)) > prompt_count or max(map(len, prompts)) > prompt_len):
        raise ValueError(f"{len(prompts)} prompts of up to {max(map(len, prompts))} tokens and {len(rows)} rows "
                         f"exceed the insert shape {shape}.")  # fmt: skip
    ids = np.zeros((prompt_count, prompt_len), np.int32)
    mask = np.zeros((prompt_count, prompt_len), np.int32)
    mask[len(prompts) :, -1] = 1  # padding prompts: one token, read by no row
    for i, prompt in enumerate(prompts):  # left padding: every prompt's last token sits in slot P - 1
        ids[i, prompt_len - len(prompt) :] = prompt
        mask[i, prompt_len - len(prompt) :] = 1
    count = round_up(prompt_count if shape else len(rows), placed.batch_shards)  # R
    targets = np.full(count, slot_count, np.int32)  # padding rows: out of range, dropped
    sources = np.zeros(count, np.int32)
    settings = {
        "row_id": np.zeros(count, np.int32),
        "budget": np.zeros(count, np.int32),
        "stop_ids": np.full((count, slots.stop_ids.shape[1]), -1, np.int32),
        "seed": np.zeros(count, np.uint32),
        "temperature": np.zeros(count, np.float32),
        "top_p": np.ones(count, np.float32),
        "top_k": np.zeros(count, np.int32),
    }
    for r, row in enumerate(rows):
        targets[r], sources[r] = row.slot, row.prompt
        settings["stop_ids"][r, : len(row.stop_ids)] = row.stop_ids
        for name in ("row_id", "budget", "seed", "temperature", "top_p", "top_k"):
            settings[name][r] = getattr(row, name)
    put = functools.partial(sharding.put_global, mesh=placed.mesh, axes=ROW + (None,))
    targets, sources, *values = _replicated(placed, targets, sources, *settings.values())
    return _insert(
        placed.model_state,
        slots,
        put(ids),
        put(mask),
        targets,
        sources,
        dict(zip(settings, values, strict=True)),
        graphdef=placed.graphdef,
        sampler=sampler,
        mesh=placed.mesh,
    )


def decode_chunk(
    placed: Placed, slots: Slots, sampler, *, steps: int, refill_at: int, busy: list[int], window: int | None = None
) -> tuple[Slots, int]:
    """Decode up to `steps` tokens per slot (until `refill_at` slots are done); returns the slots and steps taken.

    busy: the slots in use, whose furthest cache slot in this chunk fixes the attention window (unless `window`
    is given: the whole cache for one compiled program whatever the rows' lengths).
    """
    if window is None:
        index = sharding.fetch(slots.index)
        reach = max((int(index[slot]) for slot in busy), default=0) + steps
        window = min(slots.kv_cache.k[0].shape[2], bucket(reach, MIN_LENGTH_BUCKET))  # a power of two above it
    max_steps, refill = _replicated(placed, np.int32(steps), np.int32(refill_at))
    slots, taken = _decode_chunk(
        placed.model_state,
        slots,
        max_steps,
        refill,
        graphdef=placed.graphdef,
        sampler=sampler,
        window=window,
        mesh=placed.mesh,
    )
    return slots, int(sharding.fetch(taken))


def resize(placed: Placed, slots: Slots, keep: list[int]) -> Slots:
    """The slots `keep` (indices >= the slot count: new free slots) as a state of len(keep) slots."""
    (keep_array,) = _replicated(placed, np.asarray(keep, np.int32))
    return _resize_slots(slots, keep_array, mesh=placed.mesh)


def release(placed: Placed, slots: Slots, free: list[int]) -> Slots:
    """Make the slots `free` done (their rows' results are dropped)."""
    release_mask = np.zeros(slots.done.shape[0], bool)
    release_mask[free] = True
    (release_array,) = _replicated(placed, release_mask)
    return _release_slots(slots, release_array, mesh=placed.mesh)
