"""Choosing the next token: greedy, temperature, top-k and nucleus (top-p) sampling, with per-row keys.

Pure functions of logits and keys, shared by both decoders (slots.py's engine and static.py's batches);
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
    # Per-row settings (the server's slots, each from another request): temperature, top_p and top_k per row, and
    # a row with temperature 0 takes the argmax. A row without a filter draws from the whole vocabulary, a row with
    # one from the vocabulary ranked (use_top_p then says whether any row filters), so a row's draw depends on its
    # own settings only, never on its neighbours'.
    per_row: bool = False


ROW_PLAIN = Sampler(greedy=False, top_k=0, use_top_p=False, per_row=True)  # no busy row filters
ROW_FILTERED = Sampler(greedy=False, top_k=0, use_top_p=True, per_row=True)  # some busy row has top_k or top_p


def _column(value: Array) -> Array:
    """A per-row setting [B] as a column [B, 1] (a scalar stays a scalar)."""
    value = jnp.asarray(value)
    return value[:, None] if value.ndim == 1 else value


def sample_tokens(
    logits: Array, keys: Array, sampler: Sampler, temperature: Array, top_p: Array, top_k: Array | None = None
) -> Array:
    """Next token per row. logits [B, V] float32, keys [B] -> ids [B] int32.

    temperature, top_p: scalars or one per row [B]; top_k [B]: per-row cut-offs (0 = off), read with `per_row`.
    """
    if sampler.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if sampler.per_row:
        return _sample_per_row(logits, keys, temperature, top_p, top_k, filtered=sampler.use_top_p)
    logits = logits / _column(temperature)
    if sampler.top_k:
        candidates, candidate_ids = jax.lax.top_k(logits, sampler.top_k)  # [B, k], sorted high to low
    elif sampler.use_top_p:
        candidate_ids = jnp.argsort(-logits, axis=-1)  # [B, V] high to low
        candidates = jnp.take_along_axis(logits, candidate_ids, axis=-1)
    else:
        candidates, candidate_ids = logits, None  # plain sampling from the whole vocabulary
    if sampler.use_top_p:
        candidates = _nucleus(candidates, _column(top_p))
    choice = jax.vmap(jax.random.categorical)(keys, candidates)  # [B] index into candidates
    if candidate_ids is not None:
        choice = jnp.take_along_axis(candidate_ids, choice[:, None], axis=-1)[:, 0]
    return choice.astype(jnp.int32)


def _nucleus(candidates: Array, top_p: Array) -> Array:
    """Keep the smallest set of candidates (sorted high to low) holding top_p of the probability."""
    probs = jax.nn.softmax(candidates, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the higher-ranked candidates
    return jnp.where(mass_before < top_p, candidates, -jnp.inf)  # the top candidate always survives


def _sample_per_row(
    logits: Array, keys: Array, temperature: Array, top_p: Array, top_k: Array, *, filtered: bool
) -> Array:
    """Sampler.per_row: temperature, top_p, top_k [B] each; rows with temperature 0 take the argmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    choice = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)  # rows without a filter
    if filtered:  # rank the vocabulary once for every row; only the rows with a filter use it
        candidate_ids = jnp.argsort(-scaled, axis=-1)  # [B, V] high to low
        candidates = jnp.take_along_axis(scaled, candidate_ids, axis=-1)
        rank = jnp.arange(candidates.shape[-1])
        candidates = jnp.where((top_k[:, None] <= 0) | (rank < top_k[:, None]), candidates, -jnp.inf)
        # top_p = 1 keeps every candidate (a cumulative sum rounded up to 1.0 must not drop the tail).
        candidates = jnp.where(top_p[:, None] >= 1.0, candidates, _nucleus(candidates, top_p[:, None]))
        ranked = jax.vmap(jax.random.categorical)(keys, candidates)
        ranked = jnp.take_along_axis(candidate_ids, ranked[:, None], axis=-1)[:, 0].astype(jnp.int32)
        choice = jnp.where((top_k > 0) | (top_p < 1.0), ranked, choice)
    return jnp.where(temperature > 0, choice, greedy)


def chosen_logprobs(logits: Array, tokens: Array) -> Array:
    """The model's log-probability (temperature 1, no filter) of each row's chosen token: logits [B, V], tokens [B]."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]


def row_keys(seed: Array, row_ids: Array) -> Array:
    """One key per row [B] from a seed (the call's, or one per row [B]) and the rows' ids [B]."""
    if jnp.ndim(seed) == 0:
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), row_ids)
    return jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(seed, row_ids)


def step_keys(keys: Array, steps: Array) -> Array:
    """The keys [B] of token number `steps` (a scalar, or one count per row [B])."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, 0 if jnp.ndim(steps) else None))(keys, steps)
