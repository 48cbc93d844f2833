"""Choosing the next token: greedy, temperature, top-k and nucleus (top-p) sampling, with per-row keys.

Pure functions of logits and keys, shared by both decoders (engine.py's slots and decode_static.py's batches);
the tests call `sample_tokens` directly.

Keys: row r of a call draws token t with `fold_in(fold_in(key(seed), row_id), t)`, where row_id = prompt's seed
index * num_samples + sample index. A sample therefore depends on its prompt, its sample index, the seed and its
own token count only, never on which other prompts share its batch or which slot it lands in.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generated continuation (what both decoders return): `token_ids` are the new ids only (stop token
    excluded)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token ended it) or "length" (max_new_tokens reached)


class Sampler(NamedTuple):
    """The static part of the sampling settings (a change compiles a new executable)."""

    greedy: bool  # temperature == 0: argmax
    top_k: int  # 0 = no top-k filter
    use_top_p: bool  # top_p < 1


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


def row_keys(seed: Array, row_ids: Array) -> Array:
    """One key per row [B] from the call's seed and the rows' ids [B]."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), row_ids)


def step_keys(keys: Array, steps: Array) -> Array:
    """The keys [B] of token number `steps` (a scalar, or one count per row [B])."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, 0 if jnp.ndim(steps) else None))(keys, steps)
