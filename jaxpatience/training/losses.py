"""Sequence log-probs and the preference losses, as pure float32 functions.

Token alignment (the one convention every function here follows): the logits at position t predict token
t + 1. A token at position t + 1 counts when `loss_mask[t + 1]` is 1 (it is a response token) and both it and
its predecessor are real (attention mask 1). So `shift_targets` turns ids [N, T] and masks [N, T] into targets
[N, T] and target weights [N, T] aligned with the logits; the last position predicts nothing.

Losses (β = beta, logits = (π_c − π_r) − (ref_c − ref_r), where π and ref are sequence log-probs):
    sigmoid   −(1 − ε) log σ(β·logits) − ε log σ(−β·logits)     DPO; ε = label smoothing (conservative DPO)
    hinge     relu(1 − β·logits)                                  (SLiC)
    ipo       (logits − 1/(2β))²                                  IPO, Eq. 17 of Azar et al.
IPO follows TRL's DPOTrainer: its log-probs are *averaged* over response tokens (sum / count) before the loss,
and the logps/* and rewards/* metrics are then averages too; sigmoid and hinge use summed log-probs.

NLL on the chosen response: "sequence" = mean over pairs of −log π(w) / |w| (Iterative RPO, Pang et al.);
"token" = −Σ log π(w) / Σ|w| over the batch (TRL's rpo_alpha). `loss = dpo_weight·DPO + nll_weight·NLL`.

Every loss and metric is a *sum over pairs (or tokens) divided by a batch-wide denominator* (`Denominators`),
so the values of micro-batches add up exactly to the value of the whole batch (gradient accumulation).
A pair whose chosen response has no counted tokens (batch padding) contributes nothing.

Shape letters: N rows (= 2B: chosen and rejected), B pairs, T tokens, C tokens per chunk, D model dim, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxpatience.config import LossConfig

Array = jax.Array


def shift_targets(input_ids: Array, loss_mask: Array, attention_mask: Array) -> tuple[Array, Array]:
    """ids, masks [..., T] -> (targets [..., T], weights [..., T] float32): position t predicts token t + 1."""
    targets = jnp.concatenate([input_ids[..., 1:], jnp.zeros_like(input_ids[..., :1])], axis=-1)
    real = attention_mask.astype(jnp.float32)
    counted = loss_mask.astype(jnp.float32)[..., 1:] * real[..., 1:] * real[..., :-1]
    weights = jnp.concatenate([counted, jnp.zeros_like(counted[..., :1])], axis=-1)
    return targets, weights


def token_logps(logits: Array, targets: Array) -> Array:
    """log softmax(logits)[target] in float32, by gather + logsumexp (no [.., V] log-softmax kept). [...]"""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_logps_from_logits(
    logits: Array, input_ids: Array, loss_mask: Array, attention_mask: Array
) -> tuple[Array, Array]:
    """(sum of response-token log-probs [...], counted tokens [...]) from full logits [..., T, V]."""
    targets, weights = shift_targets(input_ids, loss_mask, attention_mask)
    return jnp.sum(token_logps(logits, targets) * weights, axis=-1), jnp.sum(weights, axis=-1)


def segment_weights(weights: Array, segment_ids: Array, num_segments: int) -> Array:
    """Target weights [N, T] of packed rows -> [N, T, S]: column s holds segment s + 1's weights (0 = padding)."""
    targets_segment = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=-1)
    same = (targets_segment == segment_ids).astype(weights.dtype)  # never predict across a segment boundary
    return (weights * same)[..., None] * jax.nn.one_hot(segment_ids - 1, num_segments, dtype=weights.dtype)


def sequence_logps(
    hidden: Array,
    project: Callable[[Array], Array],
    input_ids: Array,
    loss_mask: Array,
    attention_mask: Array,
    chunk_size: int = 256,
    segment_ids: Array | None = None,
    num_segments: int = 1,
) -> tuple[Array, Array]:
    """Like `sequence_logps_from_logits`, from hidden states [N, T, D] and `project` ([..., D] -> [..., V]).

    Packed rows (`segment_ids` [N, T], 0 = padding, 1..S one per sequence) give sums and counts per segment,
    [N, S] each; otherwise [N]. Logits exist only for one chunk of C positions at a time, and the chunk is
    rematerialised in the backward pass, so neither the forward nor the backward ever holds an [N, T, V] array.
    """
    rows, length, dim = hidden.shape
    targets, weights = shift_targets(input_ids, loss_mask, attention_mask)  # [N, T] each
    if segment_ids is None:
        weights = weights[..., None]  # [N, T, 1]: one sequence per row
    else:
        weights = segment_weights(weights, segment_ids, num_segments)  # [N, T, S]
    chunk = min(chunk_size, length)
    pad = -length % chunk  # pad T to a multiple of C; padded positions have weight 0
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad), (0, 0)))
    chunks = (length + pad) // chunk

    def to_chunks(x: Array) -> Array:  # [N, T, ...] -> [T/C, N, C, ...]
        return jnp.moveaxis(x.reshape(rows, chunks, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint  # save only the chunk's inputs; recompute its [N, C, V] logits when differentiating
    def one_chunk(carry: Array, xs: tuple[Array, Array, Array]) -> tuple[Array, None]:
        hidden_chunk, target_chunk, weight_chunk = xs  # [N, C, D], [N, C], [N, C, S]
        logps = token_logps(project(hidden_chunk), target_chunk)  # [N, C]
        return carry + jnp.einsum("nc,ncs->ns", logps, weight_chunk), None

    init = jnp.zeros((rows, weights.shape[-1]), jnp.float32)
    sums, _ = jax.lax.scan(one_chunk, init, (to_chunks(hidden), to_chunks(targets), to_chunks(weights)))
    counts = jnp.sum(weights, axis=1)  # [N, S]
    return (sums[:, 0], counts[:, 0]) if segment_ids is None else (sums, counts)


# ---------------------------------------------------------------------------------------------------
# Preference losses over [B, 2] (chosen, rejected) sequence log-probs.


def dpo_losses(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Array:
    """Per-pair preference loss [B] (see the module docstring for the formulas)."""
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # [B]
    if loss_type == "sigmoid":
        chosen_wins = jax.nn.log_sigmoid(beta * logits)
        return -(1 - label_smoothing) * chosen_wins - label_smoothing * jax.nn.log_sigmoid(-beta * logits)
    if loss_type == "hinge":
        return jax.nn.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}; expected sigmoid, ipo or hinge.")


class Denominators(NamedTuple):
    """Batch-wide normalisers: pairs that count, and chosen-response tokens (for token-averaged NLL)."""

    pairs: Array  # scalar float32, >= 1
    chosen_tokens: Array  # scalar float32, >= 1


def denominators(token_counts: Array, axis_name: str | tuple[str, ...] | None = None) -> Denominators:
    """From counted tokens [B, 2] of a whole batch (all micro-batches together).

    Inside `jax.shard_map` (training/shard_map.py) `token_counts` are one device's pairs and `axis_name` the mesh axes
    the batch is split over: the counts are summed over the devices before the floor of 1 is applied.
    """
    chosen = token_counts[..., 0]
    totals = jnp.stack([jnp.sum((chosen > 0).astype(jnp.float32)), jnp.sum(chosen)])  # [2]: pairs, tokens
    if axis_name is not None:
        totals = jax.lax.psum(totals, axis_name)
    return Denominators(jnp.maximum(totals[0], 1.0), jnp.maximum(totals[1], 1.0))


def preference_loss(
    policy_logps: Array,
    token_counts: Array,
    ref_logps: Array | None,
    config: LossConfig,
    norm: Denominators | None = None,
) -> tuple[Array, dict[str, Array]]:
    """(loss, metrics) from summed log-probs [B, 2] (chosen, rejected), counts [B, 2] and reference [B, 2].

    `ref_logps` may be None only when config.dpo_weight == 0 (SFT): then no rewards/* metrics are reported.
    `norm` defaults to this batch's own denominators; pass the whole batch's when this is a micro-batch.
    """
    policy_logps, token_counts = policy_logps.astype(jnp.float32), token_counts.astype(jnp.float32)
    norm = denominators(token_counts) if norm is None else norm
    valid = (token_counts[:, 0] > 0).astype(jnp.float32)  # [B]; an empty chosen response = a padding pair

    def pair_mean(values: Array) -> Array:  # [B] -> scalar: sum over valid pairs / batch-wide pair count
        return jnp.sum(valid * values) / norm.pairs

    nll = _chosen_nll(policy_logps[:, 0], token_counts[:, 0], valid, norm, config.nll_normalization, pair_mean)
    loss = config.nll_weight * nll if config.nll_weight else jnp.zeros((), jnp.float32)

    # IPO (TRL's convention) compares length-averaged log-probs; sigmoid and hinge compare sums.
    per_token = config.loss_type == "ipo"
    logps = policy_logps / jnp.maximum(token_counts, 1.0) if per_token else policy_logps  # [B, 2]
    metrics = {"nll": nll, "logps/chosen": pair_mean(logps[:, 0]), "logps/rejected": pair_mean(logps[:, 1])}
    if ref_logps is None:
        if config.dpo_weight:
            raise ValueError("a DPO loss (dpo_weight > 0) needs reference log-probs.")
        return loss, metrics | {"loss": loss}

    ref = ref_logps.astype(jnp.float32)
    ref = ref / jnp.maximum(token_counts, 1.0) if per_token else ref
    pair_losses = dpo_losses(
        logps[:, 0],
        logps[:, 1],
        ref[:, 0],
        ref[:, 1],
        beta=config.beta,
        loss_type=config.loss_type,
        label_smoothing=config.label_smoothing,
    )
    dpo = pair_mean(pair_losses)
    if config.dpo_weight:
        loss = loss + config.dpo_weight * dpo
    return loss, metrics | {"loss": loss, "dpo_loss": dpo} | _reward_metrics(logps, ref, config.beta, pair_mean)


def _chosen_nll(
    chosen_sum: Array,
    chosen_count: Array,
    valid: Array,
    norm: Denominators,
    normalization: str,
    pair_mean: Callable[[Array], Array],
) -> Array:
    """The NLL of the chosen responses, from summed (never averaged) log-probs [B] and counts [B]:
    "sequence" averages each response over its tokens, then over pairs; "token" divides by all chosen tokens."""
    if normalization == "sequence":
        return pair_mean(-chosen_sum / jnp.maximum(chosen_count, 1.0))
    return -jnp.sum(valid * chosen_sum) / norm.chosen_tokens


def _reward_metrics(logps: Array, ref: Array, beta: float, pair_mean: Callable[[Array], Array]) -> dict[str, Array]:
    """The rewards/* metrics: β·(policy − reference) log-probs [B, 2] of each side, without gradient, as means
    over the pairs (margins and accuracies compare the two sides)."""
    chosen_rewards = beta * jax.lax.stop_gradient(logps[:, 0] - ref[:, 0])  # [B]
    rejected_rewards = beta * jax.lax.stop_gradient(logps[:, 1] - ref[:, 1])
    return {
        "rewards/chosen": pair_mean(chosen_rewards),
        "rewards/rejected": pair_mean(rejected_rewards),
        "rewards/margins": pair_mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": pair_mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
    }
