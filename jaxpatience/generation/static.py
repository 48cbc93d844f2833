"""Static batching: prefill a batch, then one `lax.while_loop` until its longest row is done.

    results = run_batches(plan, prompt_ids, tokenizer, progress)  # api.generate(engine="static")

The decoder before the slot engine (slots.py), kept as the baseline `scripts/bench_decode.py --workload varied`
measures the slots against. Every row of a batch computes until the batch's last row is done, so on answers of
mixed lengths most steps are spent on rows that have already stopped. One budget and one set of stop tokens for
the whole call.

* Shapes are bucketed: prompt length P and new-token budget N round up to powers of two (min 16), the batch to a
  power of two (dummy rows fill it). The cache has S = P + N slots. Prompts are left-padded; positions come
  from the mask (model/qwen2.py), so each row counts from its first real token, exactly like transformers' `generate`.
* `_decode` donates its carry (the KV cache included), so XLA updates the cache in place.
* Keys: sampling.py (a sample does not depend on its batch).

Shape letters: B batch rows, P prompt bucket, N new-token bucket, S = P + N cache slots, V vocab, E stop tokens.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpatience import sharding
from jaxpatience.durability import progress as progress_bars
from jaxpatience.generation.sampling import Generation, Sampler, row_keys, sample_tokens, step_keys
from jaxpatience.generation.shapes import CACHE_AXES, MIN_LENGTH_BUCKET, Plan, bucket, round_up
from jaxpatience.model.qwen2 import KVCache, Qwen2ForCausalLM, init_kv_cache

Array = jax.Array


class DecodeState(NamedTuple):
    """The while_loop carry. One row per (prompt, sample); all arrays live on device."""

    step: Array  # [] tokens generated so far (the same for every row)
    tokens: Array  # [B, N] generated ids; -1 once a row is done
    lengths: Array  # [B] tokens generated before the stop token
    done: Array  # [B] bool: the row produced a stop token (dummy rows start done)
    row_keys: Array  # [B] PRNG keys, one per row
    cache_mask: Array  # [B, S] 1 at real prompt slots and at every generation slot
    kv_cache: KVCache  # keys and values: tuples of L buffers [B, K, S, H]


def _record(carry: DecodeState, token: Array, stop_ids: Array) -> DecodeState:
    """Write this step's token [B] into the carry and update the per-row done flags."""
    is_stop = jnp.isin(token, stop_ids)  # stop_ids [E], padded with -1 (never a token)
    tokens = jax.lax.dynamic_update_index_in_dim(carry.tokens, jnp.where(carry.done, -1, token), carry.step, axis=1)
    lengths = carry.lengths + (~carry.done & ~is_stop)  # a row's stop token is not counted
    return carry._replace(step=carry.step + 1, tokens=tokens, lengths=lengths, done=carry.done | is_stop)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "new_bucket", "mesh"))
def _prefill(
    model_state: nnx.State,
    prompt_ids: Array,
    prompt_mask: Array,
    active: Array,
    row_ids: Array,
    seed: Array,
    stop_ids: Array,
    temperature: Array,
    top_p: Array,
    *,
    graphdef: nnx.GraphDef,
    sampler: Sampler,
    new_bucket: int,
    mesh,
) -> DecodeState:
    """Run the prompts [B, P] through the model into a fresh cache and sample the first new token."""
    with sharding.activate_if(mesh):
        model: Qwen2ForCausalLM = nnx.merge(graphdef, model_state)
        batch, prompt_len = prompt_ids.shape
        # Prefill over the P prompt slots only (attention scores [B, K, G, P, P], not P x S), then widen each
        # layer's [B, P, K, H] buffer to S = P + new slots. One buffer per layer (qwen2.KVCache): XLA then writes
        # each decode step's keys and values in place.
        empty = init_kv_cache(model.config, batch, prompt_len)  # zeros, folded away by XLA
        hidden, prompt_cache = model.hidden_states(prompt_ids, prompt_mask, kv_cache=empty, cache_index=0)
        widen = lambda layer: sharding.constrain(jnp.pad(layer, ((0, 0), (0, 0), (0, new_bucket), (0, 0))), CACHE_AXES)
        kv_cache = KVCache(*(tuple(widen(layer) for layer in c) for c in prompt_cache))
        # Generation slots are marked real from the start: the causal mask hides each one until it is written.
        cache_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, new_bucket), prompt_mask.dtype)], axis=1)
        # Left padding puts every row's last prompt token in the last slot: project only that one, [B, V].
        logits = model.logits(hidden[:, -1]).astype(jnp.float32)
        keys = row_keys(seed, row_ids)  # [B]
        token = sample_tokens(logits, step_keys(keys, 0), sampler, temperature, top_p)
        decode_state = DecodeState(
            step=jnp.zeros((), jnp.int32),
            tokens=jnp.full((batch, new_bucket), -1, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            done=~active,
            row_keys=keys,
            cache_mask=cache_mask,
            kv_cache=kv_cache,
        )
        return _record(decode_state, token, stop_ids)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "mesh"), donate_argnames=("decode_state",))
def _decode(
    model_state: nnx.State,
    decode_state: DecodeState,
    stop_ids: Array,
    max_new_tokens: Array,
    temperature: Array,
    top_p: Array,
    *,
    graphdef: nnx.GraphDef,
    sampler: Sampler,
    mesh,
) -> DecodeState:
    """Generate until every row is done or `max_new_tokens` tokens exist: one while_loop, one token per step."""
    with sharding.activate_if(mesh):
        model: Qwen2ForCausalLM = nnx.merge(graphdef, model_state)
        prompt_len = decode_state.cache_mask.shape[1] - decode_state.tokens.shape[1]  # P = S - N

        def keep_going(carry: DecodeState) -> Array:
            return (carry.step < max_new_tokens) & ~jnp.all(carry.done)

        def one_step(carry: DecodeState) -> DecodeState:
            last = jax.lax.dynamic_index_in_dim(carry.tokens, carry.step - 1, axis=1)  # [B, 1]
            last = jnp.maximum(last, 0)  # done rows hold -1: feed any valid id, their output is ignored
            # Token number step-1 sits in slot P + step - 1; its logits give token number `step`.
            hidden, kv_cache = model.hidden_states(
                last, carry.cache_mask, kv_cache=carry.kv_cache, cache_index=prompt_len + carry.step - 1
            )
            logits = model.logits(hidden[:, 0]).astype(jnp.float32)  # [B, V]
            token = sample_tokens(logits, step_keys(carry.row_keys, carry.step), sampler, temperature, top_p)
            return _record(carry._replace(kv_cache=kv_cache), token, stop_ids)

        return jax.lax.while_loop(keep_going, one_step, decode_state)


def _pack_batch(prompt_ids: list[list[int]], batch: list[int], plan: Plan, seed_indices: list[int]):
    """Host arrays for one batch of prompts: left-padded ids and mask [B, P], active rows [B], row ids [B].

    B is a power of two (or `full_rows`, the size of a full batch) and a multiple of the mesh's batch shards;
    P is a power of two >= MIN_LENGTH_BUCKET. Rows are (prompt index, sample index) pairs.
    """
    samples, full_rows, batch_shards = plan.samples, plan.full_rows, plan.batch_shards
    rows = [(p, s) for p in batch for s in range(samples)]
    num_rows = min(full_rows, round_up(bucket(len(rows)), batch_shards))  # B
    prompt_len = bucket(max(len(prompt_ids[p]) for p in batch), MIN_LENGTH_BUCKET)  # P
    ids = np.zeros((num_rows, prompt_len), np.int32)
    mask = np.zeros((num_rows, prompt_len), np.int32)
    for r in range(num_rows):
        p, _ = rows[min(r, len(rows) - 1)]  # dummy rows repeat the last real row (and start done)
        ids[r, prompt_len - len(prompt_ids[p]) :] = prompt_ids[p]  # left padding
        mask[r, prompt_len - len(prompt_ids[p]) :] = 1
    active = np.arange(num_rows) < len(rows)
    row_ids = np.array([seed_indices[p] * samples + s for p, s in rows] + [0] * (num_rows - len(rows)), np.int32)
    return rows, ids, mask, active, row_ids


def _launch(plan: Plan, prompt_ids: list[list[int]], batch: list[int]) -> tuple[list[tuple[int, int]], DecodeState]:
    """Pad one batch to its buckets and dispatch prefill + decode (asynchronously: nothing waits here)."""
    rows, ids, mask, active, row_ids = _pack_batch(prompt_ids, batch, plan, plan.seed_indices)
    mesh, static = plan.mesh, dict(graphdef=plan.graphdef, sampler=plan.sampler, mesh=plan.mesh)
    put = functools.partial(sharding.put_global, mesh=mesh)
    decode_state = _prefill(
        plan.model_state,
        put(ids, axes=("batch", "length")),
        put(mask, axes=("batch", "length")),
        put(active, axes=("batch",)),
        put(row_ids, axes=("batch",)),
        np.uint32(plan.seed),
        plan.stop_array,
        new_bucket=plan.new_bucket,
        **static,
        **plan.scalars,
    )
    decode_state = _decode(
        plan.model_state, decode_state, plan.stop_array, np.int32(plan.max_new_tokens), **static, **plan.scalars
    )
    return rows, decode_state


def _collect(
    rows: list[tuple[int, int]], decode_state: DecodeState, tokenizer, results: list[list[Generation | None]], on_result
) -> int:
    """Copy one finished batch to the host and fill `results`; returns the number of tokens generated."""
    tokens, lengths, done = (sharding.fetch(a) for a in (decode_state.tokens, decode_state.lengths, decode_state.done))
    for r, (p, s) in enumerate(rows):
        new_ids = tokens[r, : lengths[r]].tolist()
        text = tokenizer.decode(new_ids, skip_special_tokens=True) if tokenizer is not None else ""
        results[p][s] = Generation(text=text, token_ids=new_ids, finish_reason="stop" if done[r] else "length")
        if on_result is not None:
            on_result(p, s, results[p][s])
    return int(lengths[: len(rows)].sum())


def run_batches(
    plan: Plan, prompt_ids: list[list[int]], tokenizer, progress: bool | None, on_result=None
) -> list[list[Generation]]:
    """All batches, shortest prompts first; the next batch is dispatched before the previous one is copied back.

    Returns results[prompt][sample] in the original prompt order; `on_result(prompt, sample, generation)` is
    called for each row as its batch comes back.
    """
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # similar lengths share a batch
    step = plan.prompts_per_batch
    batches = [order[i : i + step] for i in range(0, len(order), step)]
    results: list[list[Generation | None]] = [[None] * plan.samples for _ in prompt_ids]
    show = progress if progress is not None else len(batches) > 1
    bar = progress_bars.bar(len(prompt_ids), unit="prompt", enabled=show, desc="generate")
    start, generated = time.perf_counter(), 0
    pending = None
    for batch in batches + [None]:
        launched = _launch(plan, prompt_ids, batch) if batch is not None else None  # dispatch before waiting
        if pending is not None:
            generated += _collect(*pending, tokenizer, results, on_result)
            bar.update(len(pending[0]) // plan.samples)
            bar.set_postfix({"tokens/s": f"{generated / (time.perf_counter() - start):.1f}"})
        pending = launched
    bar.close()
    return results
