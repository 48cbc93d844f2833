"""Continuous batching for `generate`: the host loop that feeds a call's prompts into the slot engine's slots.

    results = run_slots(plan, prompt_ids, budgets, stop_ids, tokenizer, on_result=..., stats=...)  # api.generate

Why: a static batch (static.py) decodes until its longest row is done, and its finished rows keep computing.
Here each of B slots holds one (prompt, sample) row, so a row that finishes frees its slot for the next waiting
prompt while the others go on. The loop, until the queue is empty and every slot is done (slots.py does the
device work of each step):

1. **insert**: take as many waiting prompts (shortest first) as the free slots hold, a power of 4 at a time;
2. **decode a chunk**: until enough slots are free to refill (`_refill_at`), every slot is done, or
   `chunk_steps` steps have passed;
3. read back each slot's done flag and token count (a few bytes per slot), hand finished rows to `on_result`,
   and free their slots;
4. **the tail**: once the queue is empty, the remaining rows move into the smallest tail bucket that holds them
   (`_shrink`: on a CPU an idle slot costs as much as a busy one): the slot count divided by 4, 16, ..., not
   below 8 slots, since each bucket is a resize and a decode program to compile (seconds on a CPU).

Every host-side decision is made from arrays all processes read alike (sharding.fetch), so the same loop runs
on a pod. Shape letters: B slots, S cache slots per row, N token buffer per row.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import deque

import jax.numpy as jnp
import numpy as np

from jaxpatience import sharding
from jaxpatience.durability import progress as progress_bars
from jaxpatience.generation.sampling import Generation
from jaxpatience.generation.shapes import MIN_LENGTH_BUCKET, Plan, bucket, round_up
from jaxpatience.generation.slots import Row, Slots, decode_chunk, empty_slots, insert, power_below, resize

# Fewer compiled shapes (each one seconds of compiling on a CPU, more than the idle slots or extra inserts cost):
# the tail shrinks by a factor of 4 and not below 8 slots, inserts take a power of 4 of prompts.
TAIL_FACTOR = 4
MIN_TAIL_SLOTS = 8
INSERT_FACTOR = 4


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
    # A power of INSERT_FACTOR, so that no padding row is prefilled (on a CPU each one costs as much as a real
    # prompt) and few insert shapes compile; the caller inserts again while slots are free (5 free: 4, then 1).
    take = power_below(min(len(queue.waiting), len(free) // queue.samples, plan.max_insert), INSERT_FACTOR)
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


def _tail_target(plan: Plan, busy: int, size: int) -> int:
    """The tail's slot count for `busy` rows in `size` slots: the smallest bucket(size) / TAIL_FACTOR^k, at
    least MIN_TAIL_SLOTS, that holds them, rounded up to the batch shards."""
    target = bucket(size)
    while target // TAIL_FACTOR >= max(busy, MIN_TAIL_SLOTS, 1):
        target //= TAIL_FACTOR
    return round_up(target, plan.batch_shards)


def _shrink(plan: Plan, slots: Slots, queue: _Queue, stats: EngineStats) -> Slots:
    """The tail: with nothing waiting, move the busy slots into the smallest tail bucket that holds them."""
    size = slots.done.shape[0]
    busy = [slot for slot, owner in enumerate(queue.owner) if owner is not None]
    target = _tail_target(plan, len(busy), size)
    if queue.waiting or not busy or target >= size:
        return slots
    keep = busy + [slot for slot in range(size) if queue.owner[slot] is None][: target - len(busy)]
    queue.owner = [queue.owner[slot] for slot in keep]
    stats.slot_buckets.append(target)
    return resize(plan, slots, keep)


def _refill_at(plan: Plan, queue: _Queue, size: int) -> int:
    """How many done slots end a chunk: enough for a refill while prompts wait (a batch of slots, or what the
    queue still needs); with nothing waiting, all but the next tail bucket's count (the rows then move into it)."""
    free = len(queue.free())
    if queue.waiting:
        wanted = round_up(min(len(queue.waiting) * queue.samples, max(queue.samples, plan.refill_rows)), queue.samples)
        return min(free + wanted, size)
    # The next smaller bucket _shrink can move to: the largest tail bucket whose count, rounded up to the batch
    # shards, is below `size` (with 3 shards and 6 slots there is none: run to the end).
    busy_at_most = bucket(size) // TAIL_FACTOR
    while busy_at_most >= max(MIN_TAIL_SLOTS, 1) and round_up(busy_at_most, plan.batch_shards) >= size:
        busy_at_most //= TAIL_FACTOR
    if busy_at_most < max(MIN_TAIL_SLOTS, 1):
        return size + 1  # never: the chunk ends when every slot is done (or after chunk_steps)
    return size - busy_at_most


def _free_slots_for(plan: Plan, prompt_ids: list[list[int]], budgets: list[int], slot_count: int) -> Slots:
    """The call's device state, every slot free: S cache slots per row hold the longest prompt + its budget (a
    prompt sits at slots [0, len) and its new tokens follow), N tokens the largest budget (bucketed)."""
    config = plan.model_config
    lengths = (len(ids) + budget for ids, budget in zip(prompt_ids, budgets, strict=True))
    shape = (
        slot_count,  # B
        config.num_hidden_layers,
        bucket(max(lengths), MIN_LENGTH_BUCKET),  # S
        config.num_key_value_heads,
        config.resolved_head_dim,
        bucket(max(budgets), MIN_LENGTH_BUCKET),  # N
        plan.stop_width,
        jnp.dtype(config.compute_dtype).name,
    )
    return empty_slots(plan, shape)


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
