"""The slot engine: continuous batching over a fixed set of cache rows ("slots").

    results = run_slots(plan, prompt_ids, budgets, stop_ids, tokenizer, on_result=..., stats=...)  # api.generate

Why: a static batch (static.py) decodes until its longest row is done, and its finished rows keep
computing. Here each of B slots holds one (prompt, sample) row with its own cache fill, position and budget, so a
row that finishes frees its slot for the next waiting prompt while the others go on.

The host loop, until the queue is empty and every slot is done:

1. **insert** (jitted): prefill a bucket of waiting prompts once each ([Bp, P], left-padded), sample each row's
   first token, and scatter the prompt's keys/values into its `num_samples` free slots (one prefill per prompt,
   however many samples), at cache slots [0, len): no padding inside a slot, so a row's cache slot is its
   RoPE position;
2. **decode a chunk** (jitted, one `lax.while_loop`): one token per slot per step, until enough slots are free to
   refill (or every slot is done, or `chunk_steps` steps have passed);
3. read back each slot's done flag and token count (a few bytes per slot), hand finished rows to `on_result`, and
   free their slots;
4. **the tail**: once the queue is empty, the remaining rows are gathered into the smallest power-of-two slot
   bucket that holds them (on a CPU an idle slot costs as much as a busy one).

Shapes stay static: the slot count B (`batch_size` rounded up to the mesh's batch shards, or the call's row count
bucketed when smaller) and the tail's buckets (powers of two rounded up to the batch shards), the cache length S
(a power of two above the longest prompt + its budget), the inserts' prompt counts Bp and the attention
windows (powers of two), prompt lengths P (2^k or 1.5 * 2^k): a call compiles a few executables and a second
call with the same buckets compiles nothing.

Per row: its own max_new_tokens (`budget`), stop tokens, seed, temperature, top_p and top_k (serving/live.py
mixes requests; `generate` gives every row the call's); keys from sampling.py (a sample is the same whatever
slot or batch it lands in). With a mesh, slots are split over the logical `batch` axis and every host-side
decision is made from arrays all processes read alike (sharding.fetch), so the same loop runs on a pod.

Shape letters: B slots, S cache slots per row, N token buffer per row (largest budget bucket), E stop tokens per
row, Bp prompts per insert, P prompt bucket, R rows per insert (Bp x num_samples, rounded up to the batch
shards), V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpatience import sharding
from jaxpatience.durability import progress as progress_bars
from jaxpatience.generation.sampling import Generation, chosen_logprobs, row_keys, sample_tokens, step_keys
from jaxpatience.generation.shapes import CACHE_AXES, MIN_LENGTH_BUCKET, Plan, bucket, round_up
from jaxpatience.model.qwen2 import KVCache, Qwen2ForCausalLM, init_kv_cache

Array = jax.Array
ROW = ("batch",)  # logical axes of a per-slot vector


class Slots(NamedTuple):
    """The device state of every slot; one row per slot. Free slots are `done`."""

    kv_cache: KVCache  # L x [B, S, K, H]: a row's prompt at slots [0, len), its new tokens after it
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


@dataclasses.dataclass
class EngineStats:
    """What one call did; pass one to generate(stats=...) to read it (benchmarks and tests do)."""

    prompts: int = 0
    rows: int = 0  # prompts x samples
    prefill_rows: int = 0  # prompts run through the model at insert (one per prompt, not per sample)
    inserts: int = 0
    chunks: int = 0
    decode_steps: int = 0
    slot_steps: int = 0  # sum over decode steps of the slot count (what the device computed)
    tokens: int = 0  # tokens returned (before stop tokens): the useful work
    slot_buckets: list[int] = dataclasses.field(default_factory=list)  # the slot counts the tail moved through


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
        buffer = lambda: jnp.zeros((rows, cache_len, kv_heads, head_dim), dtype)
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
    """Left-padded prompt rows [Bp, P, ...] rolled so that each row's `lengths` real entries come first."""
    prompt_len = rows.shape[1]
    source = (jnp.arange(prompt_len)[None, :] + (prompt_len - lengths)[:, None]) % prompt_len  # [Bp, P]
    return jnp.take_along_axis(rows, source.reshape(source.shape + (1,) * (rows.ndim - 2)), axis=1)


def _write_prompts(cache: KVCache, prompt_cache: KVCache, targets: Array, sources: Array, lengths: Array) -> KVCache:
    """The slots' cache with row r's prompt (prompt_cache: L x [Bp, P, K, H], left-padded) written to slot
    `targets[r]`, cache slots [0, P): prompt `sources[r]`, its `lengths` real entries first."""
    prompt_len = prompt_cache.k[0].shape[1]  # P
    write = lambda buffer, rows: buffer.at[targets, :prompt_len].set(
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
# Host side: one call per jitted function (shared with serving/live.py), then the batch loop `run_slots`.


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


def _power_of_two_below(n: int) -> int:
    """The largest power of two <= n (n >= 1)."""
    return 1 << (n.bit_length() - 1)


def _replicated(placed: Placed, *arrays):
    """Small host arrays and scalars every process holds alike, as (replicated) jit arguments."""
    return tuple(sharding.put_global(np.asarray(a), placed.mesh, (None,) * np.ndim(a)) for a in arrays)


def empty_slots(placed: Placed, shape: tuple) -> Slots:
    """A state of free slots. shape = (B, L, S, K, H, N, E, dtype name)."""
    rows, layers, *others = shape
    return _empty_slots(shape=(layers, rows, *others), mesh=placed.mesh)


def insert(placed: Placed, slots: Slots, sampler, prompts: list[list[int]], rows: list[Row]) -> Slots:
    """Prefill `prompts` (once each; a power of two of them wastes no prefill row) and start `rows` in their slots.

    Each row's prompt length + budget must fit the cache (the callers check it).
    """
    slot_count, cache_len = slots.done.shape[0], slots.kv_cache.k[0].shape[1]
    prompt_len = min(prompt_bucket(max(map(len, prompts))), cache_len)  # P
    ids = np.zeros((len(prompts), prompt_len), np.int32)
    mask = np.zeros((len(prompts), prompt_len), np.int32)
    for i, prompt in enumerate(prompts):  # left padding: every prompt's last token sits in slot P - 1
        ids[i, prompt_len - len(prompt) :] = prompt
        mask[i, prompt_len - len(prompt) :] = 1
    count = round_up(len(rows), placed.batch_shards)  # R
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
    placed: Placed, slots: Slots, sampler, *, steps: int, refill_at: int, busy: list[int]
) -> tuple[Slots, int]:
    """Decode up to `steps` tokens per slot (until `refill_at` slots are done); returns the slots and steps taken.

    busy: the slots in use, whose furthest cache slot in this chunk fixes the attention window.
    """
    index = sharding.fetch(slots.index)
    reach = max((int(index[slot]) for slot in busy), default=0) + steps
    window = min(slots.kv_cache.k[0].shape[1], bucket(reach, MIN_LENGTH_BUCKET))  # a power of two above it
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


@dataclasses.dataclass
class _Queue:
    """The call's rows: waiting prompts (shortest first), and which (prompt, sample) each slot holds."""

    prompt_ids: list[list[int]]
    budgets: list[int]
    stop_ids: list[list[int]]
    seed_indices: list[int]
    samples: int
    waiting: deque[int]
    owner: list[tuple[int, int] | None]  # slot -> (prompt, sample); None = free

    def free(self) -> list[int]:
        return [slot for slot, owner in enumerate(self.owner) if owner is None]


def _insert_batch(plan: Plan, slots: Slots, queue: _Queue, stats: EngineStats) -> Slots:
    """Take as many waiting prompts as the free slots hold (at most `plan.max_insert`) and insert them."""
    free = queue.free()
    # A power of two, so that no padding row is prefilled (on a CPU each one costs as much as a real prompt); the
    # caller inserts again while slots are free, e.g. 3 free slots take 2 prompts, then 1.
    take = _power_of_two_below(min(len(queue.waiting), len(free) // queue.samples, plan.max_insert))
    batch = [queue.waiting.popleft() for _ in range(take)]
    settings = dict(seed=plan.seed, temperature=float(plan.scalars["temperature"]), top_p=float(plan.scalars["top_p"]))
    rows = []
    for i, p in enumerate(batch):
        for sample in range(queue.samples):
            slot = free[len(rows)]
            rows.append(
                Row(
                    slot=slot,
                    prompt=i,
                    row_id=queue.seed_indices[p] * queue.samples + sample,
                    budget=queue.budgets[p],
                    stop_ids=queue.stop_ids[p],
                    **settings,
                )
            )
            queue.owner[slot] = (p, sample)
    stats.inserts += 1
    stats.prefill_rows += take
    return insert(plan, slots, plan.sampler, [queue.prompt_ids[p] for p in batch], rows)


def _finish_rows(
    queue: _Queue,
    done: np.ndarray,
    count: np.ndarray,
    stopped: np.ndarray,
    tokens_of,
    tokenizer,
    results: list,
    on_result,
) -> int:
    """Hand every newly done row to `results` / `on_result` and free its slot; returns the tokens returned."""
    finished = [slot for slot, owner in enumerate(queue.owner) if owner is not None and done[slot]]
    if not finished:
        return 0
    tokens = tokens_of()  # [B, N], copied only when some row finished
    returned = 0
    for slot in finished:
        (p, sample), length = queue.owner[slot], int(count[slot] - stopped[slot])  # the stop token is not returned
        new_ids = tokens[slot, :length].tolist()
        text = tokenizer.decode(new_ids, skip_special_tokens=True) if tokenizer is not None else ""
        results[p][sample] = Generation(
            text=text, token_ids=new_ids, finish_reason="stop" if stopped[slot] else "length"
        )
        queue.owner[slot] = None
        returned += length
        if on_result is not None:
            on_result(p, sample, results[p][sample])
    return returned


def _shrink(plan: Plan, slots: Slots, queue: _Queue, stats: EngineStats) -> Slots:
    """The tail: with nothing waiting, move the busy slots into the smallest power-of-two bucket that holds them."""
    size = slots.done.shape[0]
    busy = [slot for slot, owner in enumerate(queue.owner) if owner is not None]
    target = round_up(bucket(max(len(busy), 1)), plan.batch_shards)
    if queue.waiting or not busy or target >= size:
        return slots
    keep = busy + [slot for slot in range(size) if queue.owner[slot] is None][: target - len(busy)]
    queue.owner = [queue.owner[slot] for slot in keep]
    stats.slot_buckets.append(target)
    return resize(plan, slots, keep)


def _refill_at(plan: Plan, queue: _Queue, size: int) -> int:
    """How many done slots end a chunk: enough for a refill while prompts wait (a batch of slots, or what the
    queue still needs); with nothing waiting, half the slots (the tail then moves to a bucket half the size)."""
    free = len(queue.free())
    if queue.waiting:
        wanted = round_up(min(len(queue.waiting) * queue.samples, max(queue.samples, plan.refill_rows)), queue.samples)
        return min(free + wanted, size)
    # The next smaller bucket _shrink can move to: the largest 2^k busy rows whose bucket, rounded up to the
    # batch shards, is below `size` (with 3 shards and 6 slots there is none: run to the end).
    busy_at_most = 1 << max(size - 1, 1).bit_length()
    while busy_at_most > 1 and round_up(busy_at_most, plan.batch_shards) >= size:
        busy_at_most //= 2
    if round_up(busy_at_most, plan.batch_shards) >= size:
        return size + 1  # never: the chunk ends when every slot is done (or after chunk_steps)
    return size - busy_at_most


def _free_slots_for(plan: Plan, prompt_ids: list[list[int]], budgets: list[int], slot_count: int) -> Slots:
    """The call's device state, every slot free: S cache slots per row hold the longest prompt + its budget (a
    prompt sits at slots [0, len) and its new tokens follow), N tokens the largest budget (bucketed)."""
    config = plan.model_config
    lengths = (len(ids) + budget for ids, budget in zip(prompt_ids, budgets, strict=True))
    shape = (
        config.num_hidden_layers,
        slot_count,
        bucket(max(lengths), MIN_LENGTH_BUCKET),  # S
        config.num_key_value_heads,
        config.resolved_head_dim,
        bucket(max(budgets), MIN_LENGTH_BUCKET),  # N
        plan.stop_width,
        jnp.dtype(config.compute_dtype).name,
    )
    return _empty_slots(shape=shape, mesh=plan.mesh)


def run_slots(
    plan: Plan,
    prompt_ids: list[list[int]],
    budgets: list[int],
    stop_ids: list[list[int]],
    tokenizer,
    *,
    progress: bool | None = None,
    on_result=None,
    stats: EngineStats | None = None,
) -> list[list[Generation]]:
    """Generate every (prompt, sample) row; returns results[prompt][sample] in prompt order.

    budgets, stop_ids: per prompt. on_result(prompt, sample, generation) is called as each row finishes.
    """
    stats = stats if stats is not None else EngineStats()
    samples = plan.samples
    stats.prompts, stats.rows = len(prompt_ids), len(prompt_ids) * samples
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # similar lengths share an insert
    slot_count = min(plan.slots, round_up(bucket(len(prompt_ids) * samples), plan.batch_shards))  # B
    queue = _Queue(prompt_ids, budgets, stop_ids, plan.seed_indices, samples, deque(order), [None] * slot_count)
    slots = _free_slots_for(plan, prompt_ids, budgets, slot_count)
    stats.slot_buckets.append(slot_count)
    results: list[list[Generation | None]] = [[None] * samples for _ in prompt_ids]
    show = progress if progress is not None else len(prompt_ids) * samples > slot_count
    bar = progress_bars.bar(len(prompt_ids) * samples, unit="row", enabled=show, desc="generate")
    start = time.perf_counter()
    while queue.waiting or any(owner is not None for owner in queue.owner):
        while queue.waiting and len(queue.free()) >= samples:
            slots = _insert_batch(plan, slots, queue, stats)
        slots = _shrink(plan, slots, queue, stats)  # nothing waiting: into the smallest bucket that holds the rows
        size = slots.done.shape[0]
        refill_at = _refill_at(plan, queue, size)
        busy = [slot for slot, owner in enumerate(queue.owner) if owner is not None]
        slots, steps = decode_chunk(plan, slots, plan.sampler, steps=plan.chunk_steps, refill_at=refill_at, busy=busy)
        done, count, stopped = (sharding.fetch(a) for a in (slots.done, slots.count, slots.stopped))
        if steps == 0 and not any(owner is not None and done[slot] for slot, owner in enumerate(queue.owner)):
            raise RuntimeError(f"the slot engine made no progress (slots {size}, refill at {refill_at}); a bug.")
        stats.chunks += 1
        stats.decode_steps += steps
        stats.slot_steps += steps * size
        before = sum(owner is None for owner in queue.owner)
        stats.tokens += _finish_rows(
            queue, done, count, stopped, functools.partial(sharding.fetch, slots.tokens), tokenizer, results, on_result
        )
        bar.update(sum(owner is None for owner in queue.owner) - before)
        bar.set_postfix({"tokens/s": f"{stats.tokens / (time.perf_counter() - start):.1f}"})
    bar.close()
    return results
