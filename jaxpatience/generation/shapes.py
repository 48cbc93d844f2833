"""What a generate call fixes before it decodes: the `Plan` (split model, static sampler, bucketed shapes) and
the bucketing every decoder shares (api.py, slots.py, static.py, serving's live engine).

Every jitted decoder function sees a few fixed shapes: prompt length, token budget, slots, inserts and attention
windows round up to powers of two (`bucket`), row counts to multiples of the mesh's batch shards (`round_up`).

Shape letters: B batch rows, S cache slots, K kv heads, H head dim, E stop tokens, N new-token bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxpatience import sharding
from jaxpatience.generation.sampling import Sampler
from jaxpatience.model.qwen2 import Qwen2ForCausalLM

MIN_LENGTH_BUCKET = 16  # smallest prompt / new-token bucket
CACHE_AXES = ("batch", "kv_heads", "length", None)  # logical names of one layer's [B, K, S, H] cache buffer


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one generate call fixes before decoding: the split model, the static sampler, the shapes' knobs."""

    graphdef: nnx.GraphDef
    model_state: nnx.State  # placed by sharding.RULES when there is a mesh
    model_config: Any
    mesh: Any
    sampler: Sampler
    scalars: dict[str, np.float32]  # the traced sampling settings: temperature, top_p
    seed: int
    seed_indices: list[int]  # per prompt (Request.seed_index)
    samples: int  # rows per prompt
    batch_shards: int  # the mesh's split of the batch axis: row counts are multiples of it
    # The slot engine:
    slots: int  # rows decoded at once
    chunk_steps: int  # decode steps between two looks from the host (at most)
    refill_rows: int  # free slots worth a refill while prompts wait
    max_insert: int  # prompts prefilled per insert
    stop_width: int  # E: stop ids per row (bucketed)
    # The static batches:
    stop_array: np.ndarray  # [E] the call's stop ids, padded with -1
    max_new_tokens: int
    new_bucket: int  # N
    prompts_per_batch: int
    full_rows: int  # B of a full batch: a multiple of the mesh's batch shards


def make_plan(
    model: Qwen2ForCausalLM,
    settings: dict[str, Any],
    stops: list[list[int]],
    budgets: list[int],
    seed_indices: list[int],
    batch_size: int,
    mesh,
    chunk_steps: int,
) -> Plan:
    """Split the model once (jit's cache is keyed on the hashable graphdef and shapes) and fix the buckets."""
    temperature, top_p, samples = settings["temperature"], settings["top_p"], settings["num_samples"] or 1
    top_k = min(settings["top_k"], model.config.vocab_size) if temperature > 0 else 0  # static: greedy ignores it
    graphdef, model_state = nnx.split(model)
    if mesh is not None:
        model_state = jax.device_put(model_state, sharding.state_shardings(mesh, model_state))
    stop_width = bucket(max(map(len, stops)), 4)
    stop_array = np.full(stop_width, -1, np.int32)
    stop_array[: len(stops[0])] = stops[0]  # the static batches: one set of stop ids for the call
    prompts_per_batch, batch_shards = max(1, batch_size // samples), sharding.batch_shards(mesh)
    slots = round_up(max(batch_size, samples), batch_shards)
    return Plan(
        graphdef=graphdef,
        model_state=model_state,
        model_config=model.config,
        mesh=mesh,
        sampler=Sampler(greedy=temperature == 0, top_k=top_k, use_top_p=top_p < 1.0 and temperature > 0),
        scalars=dict(temperature=np.float32(max(temperature, 1e-6)), top_p=np.float32(top_p)),
        seed=settings["seed"],
        seed_indices=seed_indices,
        samples=samples,
        batch_shards=batch_shards,
        slots=slots,
        chunk_steps=chunk_steps,
        refill_rows=max(1, slots // 8),
        max_insert=max(1, slots // samples),
        stop_width=stop_width,
        stop_array=stop_array,
        max_new_tokens=max(budgets),
        new_bucket=bucket(max(budgets), MIN_LENGTH_BUCKET),
        prompts_per_batch=prompts_per_batch,
        full_rows=round_up(prompts_per_batch * samples, batch_shards),
    )
