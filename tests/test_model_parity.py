"""Rung 1: logits parity with transformers' PyTorch Qwen2 on tiny random checkpoints."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM as TorchQwen2

from jaxpatience import load_pretrained
from jaxpatience.model.qwen2 import init_kv_cache


def _batch(vocab_size: int, padding: str, seed: int = 0):
    """Token ids [3, 11] and a mask with ragged lengths padded on the given side."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(3, 11))
    lengths = [11, 7, 4]
    mask = np.zeros((3, 11), np.int64)
    for row, n in enumerate(lengths):
        if padding == "right":
            mask[row, :n] = 1
        else:
            mask[row, 11 - n :] = 1
    return ids, mask


def _torch_logits(path, ids, mask, dtype=torch.float32):
    model = TorchQwen2.from_pretrained(path, dtype=dtype).eval()
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # what HF's generate() passes for left padding
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_float32_logits_match_transformers(tiny_checkpoint, tied, padding):
    path = tiny_checkpoint(tied=tied)
    model, _ = load_pretrained(path, dtype="float32")
    ids, mask = _batch(model.config.vocab_size, padding)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = _torch_logits(path, ids, mask)
    real = mask.astype(bool)  # logits at padding slots are not defined by either side
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4


def test_bfloat16_logits_close_to_float32_reference(tiny_checkpoint):
    """bf16 weights and compute: relative error of the logits vs the float32 reference below 5%."""
    path = tiny_checkpoint(tied=False)
    model, _ = load_pretrained(path, dtype="bfloat16")
    assert model.model.layers[0].mlp.up_proj.weight[...].dtype == jnp.bfloat16
    ids, mask = _batch(model.config.vocab_size, "left")
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).astype(jnp.float32))
    ref = _torch_logits(path, ids, mask)
    real = mask.astype(bool)
    rel = np.linalg.norm(ours[real] - ref[real]) / np.linalg.norm(ref[real])
    assert rel < 0.05


def test_mixed_precision_float32_weights_bfloat16_compute(tiny_checkpoint):
    path = tiny_checkpoint()
    model, _ = load_pretrained(path, dtype="float32", compute_dtype="bfloat16")
    assert model.model.norm.weight[...].dtype == jnp.float32
    ids, mask = _batch(model.config.vocab_size, "right")
    logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert logits.dtype == jnp.bfloat16
    ref = _torch_logits(path, ids, mask)
    real = mask.astype(bool)
    ours = np.asarray(logits.astype(jnp.float32))
    assert np.linalg.norm(ours[real] - ref[real]) / np.linalg.norm(ref[real]) < 0.05


def test_padding_does_not_change_real_logits(tiny_checkpoint):
    """The same sequence alone, left-padded and right-padded gives the same logits at its real tokens."""
    model, _ = load_pretrained(tiny_checkpoint())
    ids = np.arange(5, 12)[None]
    alone = np.asarray(model(jnp.asarray(ids)))[0]
    pad = np.zeros((1, 4), np.int64)
    left = np.asarray(model(jnp.asarray(np.concatenate([pad, ids], 1)),
                            attention_mask=jnp.asarray([[0] * 4 + [1] * 7])))[0, 4:]  # fmt: skip
    right = np.asarray(model(jnp.asarray(np.concatenate([ids, pad], 1)),
                             attention_mask=jnp.asarray([[1] * 7 + [0] * 4])))[0, :7]  # fmt: skip
    np.testing.assert_allclose(left, alone, atol=1e-5)
    np.testing.assert_allclose(right, alone, atol=1e-5)


def test_kv_cache_prefill_then_steps_equals_full_forward(tiny_checkpoint):
    """The cache interface: prefill 6 tokens, then feed 3 one at a time; logits equal the uncached forward."""
    model, _ = load_pretrained(tiny_checkpoint(tied=True))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 9)))
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])  # row 0 left-padded
    full = np.asarray(model(ids, attention_mask=mask))
    cache = init_kv_cache(model.config, batch_size=2, max_len=12)
    cache_mask = jnp.zeros((2, 12), jnp.int32).at[:, :9].set(mask)  # slots 9..11 stay unused
    logits, cache = model(ids[:, :6], attention_mask=cache_mask, kv_cache=cache, cache_index=0)
    steps = [np.asarray(logits)]
    for t in range(6, 9):
        logits, cache = model(ids[:, t : t + 1], attention_mask=cache_mask, kv_cache=cache, cache_index=t)
        steps.append(np.asarray(logits))
    cached = np.concatenate(steps, axis=1)
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(cached[real], full[real], atol=1e-5)
