"""Rung 4: log-probs and preference losses against an independent NumPy reference."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpatience.config import LossConfig
from jaxpatience.training import losses


def _np_log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _np_sequence_logps(logits, ids, loss_mask, attention):
    """Loop-based reference: token t+1 is scored by the logits at t, if it is a real response token."""
    logp = _np_log_softmax(logits.astype(np.float64))
    sums = np.zeros(ids.shape[:-1])
    counts = np.zeros(ids.shape[:-1])
    for index in np.ndindex(*ids.shape[:-1]):
        for t in range(ids.shape[-1] - 1):
            if loss_mask[index][t + 1] and attention[index][t + 1] and attention[index][t]:
                sums[index] += logp[index][t, ids[index][t + 1]]
                counts[index] += 1
    return sums, counts


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _np_loss(policy, counts, ref, cfg: LossConfig):
    """NumPy transcription of the formulas in losses.py's docstring (float64)."""
    valid = counts[:, 0] > 0
    pairs = max(valid.sum(), 1)
    if cfg.loss_type == "ipo":
        policy, ref = policy / np.maximum(counts, 1), ref / np.maximum(counts, 1)
    logits = (policy[:, 0] - policy[:, 1]) - (ref[:, 0] - ref[:, 1])
    if cfg.loss_type == "sigmoid":
        eps = cfg.label_smoothing
        per_pair = -(1 - eps) * _np_log_sigmoid(cfg.beta * logits) - eps * _np_log_sigmoid(-cfg.beta * logits)
    elif cfg.loss_type == "hinge":
        per_pair = np.maximum(0.0, 1 - cfg.beta * logits)
    else:
        per_pair = (logits - 1 / (2 * cfg.beta)) ** 2
    dpo = per_pair[valid].sum() / pairs
    return dpo, logits, policy


@pytest.mark.parametrize(
    "loss_type,label_smoothing,nll_normalization,weights",
    [
        ("sigmoid", 0.0, "sequence", (1.0, 0.0)),
        ("sigmoid", 0.2, "sequence", (1.0, 1.0)),
        ("sigmoid", 0.0, "token", (1.0, 0.5)),
        ("ipo", 0.0, "sequence", (1.0, 1.0)),
        ("ipo", 0.0, "token", (0.7, 0.0)),
        ("hinge", 0.0, "sequence", (1.0, 1.0)),
        ("hinge", 0.0, "token", (1.0, 2.0)),
        ("sigmoid", 0.0, "sequence", (0.0, 1.0)),  # plain SFT
    ],
)
def test_loss_and_metrics_match_numpy(loss_type, label_smoothing, nll_normalization, weights):
    rng = np.random.default_rng(7)
    pairs, length, vocab = 5, 9, 11
    logits = rng.normal(size=(pairs, 2, length, vocab)).astype(np.float32) * 3
    ref_logits = logits + rng.normal(size=logits.shape).astype(np.float32)
    ids = rng.integers(0, vocab, size=(pairs, 2, length))
    attention = np.ones((pairs, 2, length), np.int32)
    attention[1, 0, 6:] = 0  # right padding
    attention[2, 1, :3] = 0  # left padding
    loss_mask = (rng.random((pairs, 2, length)) > 0.3).astype(np.int32)
    loss_mask[4, 0] = 0  # a pair with an empty chosen response: must not count
    cfg = LossConfig(loss_type=loss_type, beta=0.3, label_smoothing=label_smoothing, dpo_weight=weights[0],
                     nll_weight=weights[1], nll_normalization=nll_normalization)  # fmt: skip

    policy, counts = losses.sequence_logps_from_logits(jnp.asarray(logits), ids, loss_mask, attention)
    ref, _ = losses.sequence_logps_from_logits(jnp.asarray(ref_logits), ids, loss_mask, attention)
    loss, metrics = losses.preference_loss(policy, counts, ref, cfg)

    np_policy, np_counts = _np_sequence_logps(logits, ids, loss_mask, attention)
    np_ref, _ = _np_sequence_logps(ref_logits, ids, loss_mask, attention)
    np.testing.assert_allclose(policy, np_policy, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(counts, np_counts)
    valid = np_counts[:, 0] > 0
    assert not valid[4] and valid[:4].all()
    dpo, _, compared = _np_loss(np_policy, np_counts, np_ref, cfg)
    if nll_normalization == "sequence":
        nll = (-np_policy[valid, 0] / np_counts[valid, 0]).mean()
    else:
        nll = -np_policy[valid, 0].sum() / np_counts[:, 0].sum()
    chosen_rewards = cfg.beta * (compared[:, 0] - (np_ref / np.maximum(np_counts, 1) if loss_type == "ipo"
                                                   else np_ref)[:, 0])  # fmt: skip
    rejected_rewards = cfg.beta * (compared[:, 1] - (np_ref / np.maximum(np_counts, 1) if loss_type == "ipo"
                                                     else np_ref)[:, 1])  # fmt: skip
    expected = {
        "loss": weights[0] * dpo + weights[1] * nll,
        "dpo_loss": dpo,
        "nll": nll,
        "logps/chosen": compared[valid, 0].mean(),
        "logps/rejected": compared[valid, 1].mean(),
        "rewards/chosen": chosen_rewards[valid].mean(),
        "rewards/rejected": rejected_rewards[valid].mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards)[valid].mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards)[valid].mean(),
    }
    assert set(metrics) == set(expected)
    np.testing.assert_allclose(loss, expected["loss"], rtol=1e-5)
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_token_alignment_by_hand():
    """ids [5, 6, 7, 8], response = the last two tokens: log p(7 | logits at 1) + log p(8 | logits at 2)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 4, 10)).astype(np.float32)
    ids = np.array([[5, 6, 7, 8]])
    loss_mask = np.array([[0, 0, 1, 1]])
    total, count = losses.sequence_logps_from_logits(jnp.asarray(logits), ids, loss_mask, np.ones_like(ids))
    logp = _np_log_softmax(logits[0].astype(np.float64))
    assert float(count[0]) == 2
    np.testing.assert_allclose(total[0], logp[1, 7] + logp[2, 8], rtol=1e-6)


def test_chunked_logps_and_gradients_equal_full_logits():
    """The chunked path (T = 10 not a multiple of C = 3) equals the full-logits path, values and gradients."""
    rng = np.random.default_rng(1)
    rows, length, dim, vocab = 4, 10, 6, 13
    hidden = jnp.asarray(rng.normal(size=(rows, length, dim)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)
    ids = rng.integers(0, vocab, size=(rows, length))
    loss_mask = (rng.random((rows, length)) > 0.4).astype(np.int32)
    attention = np.ones_like(ids)
    attention[0, 7:] = 0

    def chunked(h, w):
        return losses.sequence_logps(h, lambda x: x @ w.T, ids, loss_mask, attention, chunk_size=3)

    def full(h, w):
        return losses.sequence_logps_from_logits(h @ w.T, ids, loss_mask, attention)

    for a, b in zip(chunked(hidden, weight), full(hidden, weight), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    grads_chunked = jax.grad(lambda h, w: chunked(h, w)[0].sum(), argnums=(0, 1))(hidden, weight)
    grads_full = jax.grad(lambda h, w: full(h, w)[0].sum(), argnums=(0, 1))(hidden, weight)
    for a, b in zip(grads_chunked, grads_full, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_logps_never_hold_full_logits():
    """The compiled chunked path allocates no [N, T, V] array (a 4096-token, 50k-vocab case)."""
    rows, length, dim, vocab = 2, 4096, 8, 50_000
    ids = jnp.zeros((rows, length), jnp.int32)
    ones = jnp.ones((rows, length), jnp.int32)
    weight = jnp.zeros((vocab, dim), jnp.float32)

    def total(h):
        return losses.sequence_logps(h, lambda x: x @ weight.T, ids, ones, ones, chunk_size=256)[0].sum()

    hlo = jax.jit(jax.grad(total)).lower(jnp.zeros((rows, length, dim))).compile().as_text()
    assert f"f32[{rows},{length},{vocab}]" not in hlo
    assert f"f32[{rows},256,{vocab}]" in hlo  # one chunk's logits, as designed


def test_micro_batch_terms_add_up_to_the_batch():
    """With whole-batch denominators, the losses and metrics of two halves sum to those of the whole."""
    rng = np.random.default_rng(3)
    policy = jnp.asarray(rng.normal(size=(8, 2)) * 10 - 30, jnp.float32)
    ref = policy + jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    counts = jnp.asarray(rng.integers(0, 6, size=(8, 2)), jnp.float32)
    for loss_type, norm_kind in itertools.product(("sigmoid", "ipo", "hinge"), ("sequence", "token")):
        cfg = LossConfig(loss_type=loss_type, nll_weight=1.0, nll_normalization=norm_kind)
        whole_loss, whole = losses.preference_loss(policy, counts, ref, cfg)
        norm = losses.denominators(counts)
        parts = [losses.preference_loss(policy[s], counts[s], ref[s], cfg, norm) for s in (slice(0, 3), slice(3, 8))]
        np.testing.assert_allclose(parts[0][0] + parts[1][0], whole_loss, rtol=1e-5)
        for name in whole:
            np.testing.assert_allclose(parts[0][1][name] + parts[1][1][name], whole[name], rtol=1e-5, atol=1e-6)


def test_dpo_is_log2_when_policy_equals_reference():
    policy = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)) - 20, jnp.float32)
    loss, metrics = losses.preference_loss(policy, jnp.full((6, 2), 4.0), policy, LossConfig())
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
    assert float(metrics["rewards/margins"]) == 0.0


def test_dpo_without_reference_is_an_error():
    with pytest.raises(ValueError, match="reference"):
        losses.preference_loss(jnp.zeros((2, 2)), jnp.ones((2, 2)), None, LossConfig())
