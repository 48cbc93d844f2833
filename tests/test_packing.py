"""Packed pairs (data/packing.py): the same pairs give the same losses, metrics and gradients as the padded batch;
attention implementations agree; the LoRA remat policy and the scanned layer stack change nothing but memory and
compile time."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lora_grads
from flax import nnx
from test_train_step import PAIRS, _assert_close, _config, _fresh, _host, _model

from jaxpatience import training
from jaxpatience.config import PRESETS, LossConfig
from jaxpatience.data.pairs import DataError, EncodedPair, PairLoader
from jaxpatience.model import lora
from jaxpatience.model.qwen2 import attend, set_attention
from jaxpatience.sharding import make_mesh

VOCAB = PRESETS["tiny"].vocab_size


def _pairs(count: int = 24, seed: int = 0) -> list[EncodedPair]:
    """Ragged pairs (prompt 3-10 tokens, chosen 2-20, rejected 2-12) that share their prompt."""
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(1, VOCAB, size=n).astype(np.int32)
    return [EncodedPair(ids(rng.integers(3, 11)), ids(rng.integers(2, 21)), ids(rng.integers(2, 13)))
            for _ in range(count)]  # fmt: skip


def _loaders(pairs, **kwargs):
    common = dict(batch_size=PAIRS, buckets=(16, 32), pad_id=0, seed=3) | kwargs
    return PairLoader(pairs, **common), PairLoader(pairs, packing=True, **common)


def test_packed_batches_hold_the_same_pairs_once_each_with_restarting_positions():
    pairs = _pairs()
    padded, packed = _loaders(pairs, row_multiple=4, micro_batches=2, buckets=(48,))  # sequences of 5 to 30 tokens
    assert packed.pack_length == 48 and padded.steps_per_epoch == packed.steps_per_epoch
    slots = [0, 0]  # token slots of the epoch: packed, padded
    for bucket, indices in padded.plan(0):
        batch = packed.make_batch(bucket, indices)
        rows, length = batch["input_ids"].shape
        assert length == 48 and rows % 4 == 0 and batch["segment_pairs"].shape == (rows, packed.segments)
        np.testing.assert_array_equal(batch["pair_index"], indices)  # the padded batch's pairs, in its order
        seen = []
        for row, segment in zip(*np.nonzero(batch["segment_pairs"] >= 0), strict=True):
            position, side = divmod(int(batch["segment_pairs"][row, segment]), 2)
            assert position % 2 == row % 2  # micro-batch m holds rows and pairs m, m + 2, ...
            pair = pairs[indices[position]]
            at = batch["segment_ids"][row] == segment + 1
            response = (pair.chosen, pair.rejected)[side]
            np.testing.assert_array_equal(batch["input_ids"][row, at], np.concatenate([pair.prompt, response]))
            np.testing.assert_array_equal(batch["positions"][row, at], np.arange(at.sum()))
            assert batch["loss_mask"][row, at].sum() == len(response) and batch["loss_mask"][row, at][-1] == 1
            seen.append((position, side))
        assert sorted(seen) == [(b, side) for b in range(PAIRS) for side in (0, 1)]  # every sequence once
        assert np.array_equal(batch["attention_mask"], batch["segment_ids"] > 0)
        slots[0] += batch["input_ids"].size
        slots[1] += padded.make_batch(bucket, indices)["input_ids"].size
    assert slots[0] < slots[1] / 1.5  # the same tokens in far fewer slots
    # Two hosts: each gets half the rows, and half the pairs, of the same global layout.
    hosts = [_loaders(pairs, row_multiple=4, micro_batches=2, buckets=(48,), process_index=i, process_count=2)[1]
             for i in range(2)]  # fmt: skip
    bucket, indices = padded.plan(1)[0]
    whole = packed.make_batch(bucket, indices)
    for key in ("input_ids", "segment_pairs", "pair_index"):
        both = np.concatenate([h.make_batch(bucket, indices)[key] for h in hosts])
        np.testing.assert_array_equal(both, whole[key])


def test_packed_step_equals_the_padded_step_on_the_same_pairs():
    """Log-probs per pair, gradients, and two AdamW steps' metrics and parameters agree within float32 rounding
    (the sequences meet other shapes and summation orders; seen: log-probs 4e-6 relative, parameters 2e-7)."""
    pairs = _pairs(seed=1)
    padded_loader, packed_loader = _loaders(pairs)
    bucket, indices = padded_loader.plan(0)[0]
    padded = training.device_batch(padded_loader.make_batch(bucket, indices))
    host = packed_loader.make_batch(bucket, indices)
    packed = training.device_batch(host)
    assert host["input_ids"].size < padded["input_ids"].size  # the point: fewer slots for the same tokens

    model = _model()
    want, want_counts = training.pair_logps(model, padded, 5)  # [B, 2], in the order of `indices`
    got, got_counts = training.pair_logps(model, packed, 5)  # [B, 2] in the same order
    np.testing.assert_allclose(got, want, rtol=2e-5)
    np.testing.assert_array_equal(got_counts, want_counts)

    config = _config()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 _host(lora_grads(_model(), config, padded, 5)),
                 _host(lora_grads(_model(), config, packed, 5)))  # fmt: skip
    runs = []
    for batch in (padded, packed):
        trainer = _fresh(config)
        runs.append((_host([trainer.step(batch) for _ in range(2)]), _host(trainer.state.params)))
    _assert_close(*runs, rtol=1e-4, atol=1e-6, param_atol=1e-6)


@pytest.mark.parametrize("loss", ["dpo+nll", "sft"])
def test_packed_micro_batches_on_a_mesh_equal_one_padded_batch(loss):
    """SFT packs only the chosen sequences (the loss reads nothing else) into fewer rows."""
    pairs = _pairs(seed=2)
    sft = loss == "sft"
    padded_loader, packed_loader = _loaders(pairs, row_multiple=4, micro_batches=2, chosen_only=sft)  # 2 x 2 devices
    bucket, indices = padded_loader.plan(0)[0]
    padded = training.device_batch(padded_loader.make_batch(bucket, indices))
    host = packed_loader.make_batch(bucket, indices)
    packed = training.device_batch(host)
    both_sides = _loaders(pairs, row_multiple=4, micro_batches=2)[1].make_batch(bucket, indices)
    segments = host["segment_pairs"][host["segment_pairs"] >= 0]
    if sft:  # every chosen sequence once, no rejected one, in fewer rows and fewer counted tokens
        assert sorted(segments // 2) == list(range(PAIRS)) and not np.any(segments % 2)
        assert len(host["input_ids"]) < len(both_sides["input_ids"])
        assert host["real_tokens"] == sum(len(pairs[i].prompt) + len(pairs[i].chosen) for i in indices)
        with pytest.raises(DataError, match="need both sequences"):  # a reference table needs the rejected too
            next(packed_loader.reference_batches())
    else:
        assert len(segments) == 2 * PAIRS
    changes = {"sft": {"lora": None, "loss": LossConfig(dpo_weight=0.0, nll_weight=1.0)}}.get(loss, {})
    runs = []
    for batch, config, mesh in ((padded, _config(**changes), (1, 1, 1)),
                                (packed, _config(micro_batches=2, **changes), (2, 1, 1))):  # fmt: skip
        trainer = _fresh(config, mesh)
        runs.append((_host([trainer.step(batch) for _ in range(2)]), _host(trainer.state.params)))
    _assert_close(*runs, rtol=1e-4, atol=1e-5, param_atol=3e-5)  # the tolerance of test_train_step's meshes
    one_micro = training.device_batch(_loaders(pairs)[1].make_batch(bucket, indices))  # laid out for M = 1
    with pytest.raises(ValueError, match="another number of micro-batches than 2"):
        training.place_batch(one_micro, make_mesh(2, 1, 1, devices=jax.devices()[:2]), _config(micro_batches=2))


@pytest.mark.parametrize("case", ["causal", "padded", "segmented"])
def test_attention_implementations_agree(case):
    """jax.nn.dot_product_attention (XLA) against the written-out einsum, GQA (4 query heads on 2 kv heads)."""
    rng = np.random.default_rng(0)
    batch, length = 3, 12
    q, k, v = (jnp.asarray(rng.normal(size=(batch, length, heads, 8)), jnp.float32) for heads in (4, 2, 2))
    mask = np.tril(np.ones((length, length), bool))[None].repeat(batch, 0)
    if case == "padded":
        mask &= (np.arange(length) < np.array([12, 7, 3])[:, None])[:, None, :]
    if case == "segmented":
        segments = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12, [1] * 2 + [2] * 2 + [3] * 8])
        mask &= segments[:, :, None] == segments[:, None, :]
    mask = jnp.asarray(mask)
    want, got = attend(q, k, v, mask, "einsum"), attend(q, k, v, mask, "xla")
    rows = np.asarray(mask).any(-1)  # queries with something to attend to (padding queries are undefined)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=1e-5)
    if case == "causal" and jax.default_backend() == "cpu":  # cuDNN refuses on a CPU: XLA's, with a warning
        with pytest.warns(UserWarning, match="cuDNN attention refused"):
            np.testing.assert_array_equal(attend(q, k, v, mask, "cudnn"), got)


def test_model_attention_choice_keeps_logits():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 10)), jnp.int32)
    segments = jnp.asarray([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3])
    model = _model()
    want = model.hidden_states(ids, segment_ids=segments)[0]
    set_attention(model, "xla")
    got = model.hidden_states(ids, segment_ids=segments)[0]
    real = np.asarray(segments) > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
    with pytest.raises(ValueError, match="attention must be one of"):
        set_attention(model, "flash")


def test_lora_remat_policy_gives_the_same_steps():
    """remat="lora" (save the base projections' outputs, recompute the rest) changes memory, not the update."""
    pairs = _pairs(seed=4)
    _, packed_loader = _loaders(pairs)
    batch = training.device_batch(packed_loader.make_batch(32, np.arange(PAIRS)))
    runs = []
    for remat in ("none", "lora"):
        trainer = _fresh(_config(remat=remat))
        runs.append((_host([trainer.step(batch) for _ in range(2)]), _host(trainer.state.params)))
    _assert_close(*runs, rtol=1e-5, atol=1e-6, param_atol=1e-5)


def test_scanned_layers_equal_unrolled_layers():
    """model.LayerStack (the default) against the per-layer loop: the same steps; Trainer.model() has HF names."""
    batch = training.device_batch(_loaders(_pairs(seed=5))[1].make_batch(32, np.arange(PAIRS)))
    runs = []
    for config in (_config(scan_layers=False), _config(), _config(remat="full")):
        trainer = _fresh(config)
        runs.append((_host([trainer.step(batch) for _ in range(2)]), trainer))
    for metrics, _ in runs[1:]:
        for step_a, step_b in zip(runs[0][0], metrics, strict=True):
            for name in ("loss", "nll", "grad_norm", "rewards/margins"):
                np.testing.assert_allclose(step_b[name], step_a[name], rtol=1e-5, atol=1e-6, err_msg=name)
    unrolled, scanned = (lora.adapters(trainer.model()) for _, trainer in runs[:2])
    for (name_a, a), (name_b, b) in zip(unrolled, scanned, strict=True):
        assert name_a == name_b  # e.g. model.layers.1.mlp.up_proj
        np.testing.assert_allclose(np.asarray(b.lora_B[...]), np.asarray(a.lora_B[...]), atol=1e-5)


def test_layers_of_different_structure_train_unrolled():
    """LoRA on one layer only: the layers cannot be stacked, so the trainer says so and unrolls them."""
    config = _config(lora=dataclasses.replace(_config().lora, targets=r"model\.layers\.1\.mlp\.up_proj"))
    with pytest.warns(UserWarning, match="layer 1 differs in structure"):
        trainer = training.create_trainer(_model(), config, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    assert not trainer.config.scan_layers and len(list(lora.adapters(trainer.model()))) == 1


def test_stacked_norms_and_biases_get_no_weight_decay():
    """Full-parameter training with weight decay: stacking gives norm scales [L, D] two dims, yet only matrices
    decay, so the scanned and the unrolled runs update alike."""
    optimizer = dataclasses.replace(_config().optimizer, weight_decay=0.5)
    changes = {"lora": None, "loss": LossConfig(dpo_weight=0.0, nll_weight=1.0), "optimizer": optimizer}
    batch = training.device_batch(_loaders(_pairs(seed=6))[1].make_batch(32, np.arange(PAIRS)))
    params = []
    for scan in (False, True):
        trainer = _fresh(_config(scan_layers=scan, **changes))
        for _ in range(2):
            trainer.step(batch)
        params.append(_host(nnx.state(trainer.model(), nnx.Param)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *params)
