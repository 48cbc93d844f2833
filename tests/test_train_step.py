"""Rungs 3-5: the jitted train step: reference at init, frozen base, accumulation, meshes, padding, remat."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpatience import training
from jaxpatience.config import PRESETS, ConfigError, LoraConfig, LossConfig, OptimizerConfig, TrainConfig
from jaxpatience.model import lora
from jaxpatience.model.qwen2 import Qwen2ForCausalLM
from jaxpatience.sharding import make_mesh

PAIRS, LENGTH = 8, 16


@functools.cache
def _model_parts(seed: int = 0):
    """A tiny random model, built once (eager init is slow); `_model` hands out fresh modules sharing it."""
    return nnx.split(Qwen2ForCausalLM(PRESETS["tiny"], rngs=nnx.Rngs(seed)))


def _model(seed: int = 0) -> Qwen2ForCausalLM:
    graphdef, state = _model_parts(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # new Variables: the cached ones stay untouched


def _batch(seed: int = 0, pairs: int = PAIRS, length: int = LENGTH) -> dict[str, np.ndarray]:
    """Prompt of 6 tokens, then a response of ragged length, right-padded; chosen and rejected differ."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, PRESETS["tiny"].vocab_size, size=(pairs, 2, length)).astype(np.int32)
    ids[:, 1, :6] = ids[:, 0, :6]  # the same prompt for both responses
    ends = rng.integers(9, length + 1, size=(pairs, 2))
    position = np.arange(length)
    attention = (position < ends[..., None]).astype(np.int32)
    loss_mask = attention * (position >= 6)
    return {"input_ids": ids * attention, "attention_mask": attention, "loss_mask": loss_mask}


def _config(**changes) -> TrainConfig:
    base = TrainConfig(
        lora=LoraConfig(rank=4, alpha=8),
        loss=LossConfig(beta=0.5, nll_weight=1.0),
        optimizer=OptimizerConfig(learning_rate=1e-2, decay="constant", eps=1e-4),
        batch_size=PAIRS,
        logits_chunk_size=5,  # several chunks, the last one partly padding
    )
    return dataclasses.replace(base, **changes)


def _one_device():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def test_dpo_is_log2_at_init_and_base_stays_bit_identical():
    trainer = _fresh(_config())
    frozen_before = _host(trainer.frozen)
    adapters_before = _host(trainer.state.params)
    batch = _batch()
    old_step = trainer.state.step
    first = trainer.step(batch)
    assert old_step.is_deleted()  # the state was donated: updated in place, no second copy
    np.testing.assert_allclose(first["dpo_loss"], np.log(2.0), rtol=1e-6)  # B = 0: policy == reference
    np.testing.assert_allclose(first["loss"], np.log(2.0) + first["nll"], rtol=1e-6)  # dpo_weight = nll_weight = 1
    assert abs(float(first["rewards/margins"])) < 1e-6
    for _ in range(2):
        trainer.step(batch)
    assert int(trainer.state.step) == 3
    jax.tree.map(np.testing.assert_array_equal, _host(trainer.frozen), frozen_before)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), _host(trainer.state.params), adapters_before)
    assert max(jax.tree.leaves(moved)) > 0  # the adapters did train
    # Only adapters are trained and held by the optimizer.
    assert all(isinstance(v, lora.LoRAParam) for _, v in nnx.to_flat_state(trainer.state.params))
    moments = [leaf for leaf in jax.tree.leaves(trainer.state.opt_state) if leaf.ndim > 0]
    assert sum(m.size for m in moments) == 2 * sum(p.size for p in jax.tree.leaves(trainer.state.params))


def test_loss_falls_on_a_fixed_set():
    trainer = _fresh(_config())
    batch = _batch()
    metrics = [trainer.step(batch) for _ in range(8)]
    losses, dpo = [float(m["loss"]) for m in metrics], [float(m["dpo_loss"]) for m in metrics]
    assert losses[-1] < losses[0] - 0.5 and dpo[-1] < 0.5 * dpo[0]
    assert float(metrics[-1]["rewards/accuracies"]) == 1.0
    size = trainer.step_fn._cache_size()
    trainer.step(_batch(seed=1))  # another batch of the same shape: no recompilation
    assert trainer.step_fn._cache_size() == size


def test_full_parameter_sft_trains_every_parameter_and_dpo_needs_a_reference():
    config = _config(lora=None, loss=LossConfig(dpo_weight=0.0, nll_weight=1.0), optimizer=OptimizerConfig(
        learning_rate=3e-3, decay="constant"))  # fmt: skip
    trainer = _fresh(config)
    assert len(jax.tree.leaves(trainer.frozen)) == 0
    batch = _batch()
    losses = [float(trainer.step(batch)["loss"]) for _ in range(10)]
    assert losses[-1] < losses[0] - 1.0
    dpo = training.create_trainer(_model(), _config(lora=None), _one_device())
    with pytest.raises(ValueError, match="ref_logps"):  # raised while tracing, before any compilation
        dpo.step(batch)


def test_sft_skips_the_rejected_row_and_equals_the_full_formula():
    """SFT (dpo_weight = 0) runs only the chosen rows; its loss is the formula over the full pair forward,
    and nothing about the rejected rows can change the update."""
    from jaxpatience.training import losses as losses_module

    config = _config(lora=None, loss=LossConfig(dpo_weight=0.0, nll_weight=1.0))
    batch = _batch(seed=4)
    direct_model = _model()
    policy, counts = training.pair_logps(direct_model, batch, chunk_size=5)
    expected, _ = losses_module.preference_loss(policy, counts, None, config.loss)
    other = dict(batch)
    other["input_ids"] = batch["input_ids"].copy()
    other["input_ids"][:, 1] = (other["input_ids"][:, 1] + 7) % PRESETS["tiny"].vocab_size  # new rejected tokens
    results = []
    for b in (batch, other):
        trainer = _fresh(config)
        metrics = trainer.step(b)
        results.append((float(metrics["loss"]), _host(trainer.state.params)))
    np.testing.assert_allclose(results[0][0], float(expected), rtol=1e-5)
    assert results[0][0] == results[1][0] and "logps/rejected" not in metrics
    jax.tree.map(np.testing.assert_array_equal, results[0][1], results[1][1])


def test_bfloat16_base_with_float32_adapters_and_optimizer():
    """Base weights stay bf16 (frozen, untouched); adapters, Adam moments, log-probs and losses are float32."""
    bf16 = Qwen2ForCausalLM(PRESETS["tiny"].replace(param_dtype="bfloat16", compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    trainer = training.create_trainer(bf16, _config(), _one_device())
    assert {x.dtype for x in jax.tree.leaves(trainer.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(trainer.state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    frozen_before = _host(trainer.frozen)
    metrics = [trainer.step(_batch()) for _ in range(3)]
    assert all(m["loss"].dtype == jnp.float32 for m in metrics)
    np.testing.assert_allclose(metrics[0]["dpo_loss"], np.log(2.0), rtol=1e-5)
    assert float(metrics[-1]["dpo_loss"]) < float(metrics[0]["dpo_loss"])
    jax.tree.map(np.testing.assert_array_equal, _host(trainer.frozen), frozen_before)


def test_full_parameter_bfloat16_model_trains_float32_master_weights():
    """Without LoRA the trained weights become float32 master copies, so small AdamW steps are not rounded away."""
    bf16 = Qwen2ForCausalLM(PRESETS["tiny"].replace(param_dtype="bfloat16", compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    before = np.asarray(bf16.model.layers[0].mlp.up_proj.weight[...].astype(jnp.float32))
    config = _config(lora=None, loss=LossConfig(dpo_weight=0.0, nll_weight=1.0),
                     optimizer=OptimizerConfig(learning_rate=1e-5, decay="constant"))  # fmt: skip
    trainer = training.create_trainer(bf16, config, _one_device())
    assert {x.dtype for x in jax.tree.leaves(trainer.state.params)} == {jnp.dtype(jnp.float32)}
    trainer.step(_batch())
    after = np.asarray(trainer.model().model.layers[0].mlp.up_proj.weight[...])
    assert np.mean(after != before) > 0.9  # in bf16, most of these 1e-5 updates would vanish


def test_precomputed_reference_equals_the_in_step_reference():
    batch = _batch()
    carried = _fresh(_config())  # the shared trainer: the two runs go one after the other
    reference = np.asarray(_logps_fn(_config())(batch))
    carried_metrics = [_host(carried.step(batch | {"ref_logps": reference})) for _ in range(3)]
    in_step = _fresh(_config())
    in_step_metrics = [_host(in_step.step(batch)) for _ in range(3)]
    for a, b in zip(in_step_metrics, carried_metrics, strict=True):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert abs(float(in_step_metrics[-1]["rewards/margins"])) > 1e-3  # the policy has moved from the reference


def test_precomputed_reference_in_micro_batches_equals_one_pass():
    """make_logps_fn walks the micro-batches like the step (same peak memory) and returns rows in batch order."""
    batch = _batch(seed=3)
    whole = np.asarray(_logps_fn(_config())(batch))
    in_parts = np.asarray(_logps_fn(_config(micro_batches=4))(batch))
    np.testing.assert_allclose(in_parts, whole, rtol=1e-5)
    assert np.abs(whole[:, 0] - whole[:, 1]).max() > 1e-3  # rows differ, so a wrong order would show


@functools.cache
def _trainer(config: TrainConfig, mesh_shape: tuple[int, int, int] = (1, 1, 1)):
    """One trainer (one compiled step) per config and mesh, shared by the tests, with its initial state."""
    mesh = _one_device() if mesh_shape == (1, 1, 1) else make_mesh(*mesh_shape)
    trainer = training.create_trainer(_model(), config, mesh)
    return trainer, _host(trainer.state)


@functools.cache
def _logps_fn(config: TrainConfig, adapters: bool = False):
    """make_logps_fn of the shared trainer, compiled once (it reads the trainer's current state at each call)."""
    return training.make_logps_fn(_trainer(config, (1, 1, 1))[0], adapters=adapters)  # the key _fresh uses


def _fresh(config: TrainConfig, mesh_shape: tuple[int, int, int] = (1, 1, 1)) -> training.Trainer:
    """The shared trainer, reset to its initial state (the state is donated each step, so restore a copy)."""
    trainer, initial = _trainer(config, mesh_shape)
    trainer.state = jax.device_put(initial, trainer.state_shardings)
    return trainer


def test_next_iteration_merges_the_adapter_into_the_base():
    """Iterative RPO: after merging the trained adapter, the new reference (adapters off) is the old policy."""
    batch = _batch()
    trainer = _fresh(_config())
    for _ in range(2):
        trainer.step(batch)
    policy = np.asarray(_logps_fn(_config(), adapters=True)(batch))
    frozen_before = _host(trainer.frozen)
    model = trainer.model()
    assert lora.merge(model) == 14
    jax.tree.map(np.testing.assert_array_equal, _host(trainer.frozen), frozen_before)  # the trainer is untouched
    following = training.create_trainer(model, _config(), _one_device())  # fresh adapters: A random, B zero
    reference = np.asarray(training.make_logps_fn(following)(batch))
    np.testing.assert_allclose(reference, policy, rtol=1e-5)
    assert np.abs(reference - np.asarray(_logps_fn(_config())(batch))).max() > 1e-3


def _run(config, mesh_shape, batch, steps=2):
    trainer = _fresh(config, mesh_shape)
    metrics = [trainer.step(batch) for _ in range(steps)]
    return _host(metrics), _host(trainer.state.params)


def _assert_close(run_a, run_b, rtol, atol, param_atol=None):
    for index, (step_a, step_b) in enumerate(zip(run_a[0], run_b[0], strict=True)):
        for name in step_a:
            if index == 0 and name == "rewards/accuracies":
                continue  # at init both rewards are 0 up to float noise, so "chosen > rejected" is noise
            np.testing.assert_allclose(step_a[name], step_b[name], rtol=rtol, atol=atol, err_msg=name)
    param_atol = atol if param_atol is None else param_atol
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=param_atol), run_a[1], run_b[1])


def test_gradient_accumulation_and_remat_equal_one_big_batch():
    """4 micro-batches (with every layer rematerialised) give the same two steps as one batch, no remat."""
    batch = _batch()
    whole = _run(_config(), (1, 1, 1), batch)
    accumulated = _run(_config(micro_batches=4, remat="full"), (1, 1, 1), batch)
    # Parameters to atol 1e-5 (0.1% of one step of lr = 1e-2; seen: 1.7e-6): the micro-batch gradients add up in
    # another order, and Adam's division by |g| magnifies that float32 noise where a gradient is tiny.
    _assert_close(whole, accumulated, rtol=1e-5, atol=1e-6, param_atol=1e-5)


# Tolerance for sharded vs one-device steps: float32 reductions run in another order. Metrics of two steps agree
# to rtol 1e-4 / atol 1e-5 (seen: under 5% of that). Parameters after two AdamW steps to atol 3e-5, i.e. 0.3% of
# one step of size lr = 1e-2 (seen: up to 5e-6): Adam divides by |g|, which magnifies noise in tiny gradients.
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_step_equals_one_device_step(shape):
    batch = _batch()
    config = _config(micro_batches=1)
    reference = _run(config, (1, 1, 1), batch)
    sharded = _run(config, shape, batch)
    _assert_close(reference, sharded, rtol=1e-4, atol=1e-5, param_atol=3e-5)
    # The weights really are split as the rules say: up_proj [F, D] over (tensor, fsdp); its lora_A [R, D] over fsdp.
    _, fsdp, tensor = shape
    trainer = _fresh(config, shape)
    # Both layers stacked (model.LayerStack): a leading [L = 2] axis, never split.
    up_proj = trainer.frozen["model"]["layers"]["layer"]["mlp"]["up_proj"]
    assert up_proj["weight"][...].addressable_shards[0].data.shape == (2, 128 // tensor, 64 // fsdp)
    lora_a = trainer.state.params["model"]["layers"]["layer"]["mlp"]["up_proj"]["lora"]["lora_A"][...]
    assert lora_a.addressable_shards[0].data.shape == (2, 4, 64 // fsdp)


def test_place_batch_splits_pairs_over_the_data_axes_and_keeps_every_value():
    """The one placement of a batch: pairs split over data x fsdp, replicated over tensor; placed arrays pass."""
    mesh, batch = make_mesh(2, 2, 2), _batch() | {"ref_logps": np.zeros((PAIRS, 2), np.float32)}
    placed = training.place_batch(batch, mesh, _config())
    for key, value in placed.items():
        assert value.sharding == training.batch_sharding(mesh) and value.shape == batch[key].shape
        assert {shard.data.shape[0] for shard in value.addressable_shards} == {PAIRS // 4}
        np.testing.assert_array_equal(np.asarray(value), batch[key])
    again = training.place_batch(placed, mesh, _config())
    assert all(again[key] is placed[key] for key in placed)
    with pytest.raises(ValueError, match="4 data-parallel devices"):
        training.place_batch({k: v[:6] for k, v in batch.items()}, mesh, _config(batch_size=6))


def test_padding_does_not_change_log_probs():
    """Right or left padding changes neither the response log-probs nor the token counts (so nor the loss)."""
    batch = _batch()
    wider = {k: np.pad(v, ((0, 0), (0, 0), (0, 8))) for k, v in batch.items()}  # 8 more padding tokens on the right
    left = {k: np.zeros_like(v) for k, v in wider.items()}  # every row's real tokens moved to the end
    for index in np.ndindex(PAIRS, 2):
        n = int(batch["attention_mask"][index].sum())
        for k in left:
            left[k][index][-n:] = batch[k][index][:n]
    trainer = _fresh(_config())
    for _ in range(2):  # move the adapters away from zero, so the policy differs from the base
        trainer.step(batch)
    policy_logps = _logps_fn(_config(), adapters=True)
    expected = np.asarray(policy_logps(batch))
    for padded in (wider, left):
        np.testing.assert_allclose(np.asarray(policy_logps(padded)), expected, rtol=1e-5)
    assert np.abs(expected - np.asarray(_logps_fn(_config())(batch))).max() > 1e-3  # adapters matter


def test_bad_batches_and_configs_fail_with_a_clear_message():
    trainer = training.create_trainer(_model(), _config(micro_batches=2), _one_device())
    batch = _batch()
    with pytest.raises(ValueError, match="lacks 'loss_mask'"):
        trainer.step({k: v for k, v in batch.items() if k != "loss_mask"})
    with pytest.raises(ValueError, match=r"expected \[B, 2, T\]"):
        trainer.step({k: v[:, 0] for k, v in batch.items()})
    with pytest.raises(ValueError, match="micro-batches"):
        trainer.step({k: v[:3] for k, v in batch.items()})
    with pytest.raises(ConfigError, match="multiple of micro_batches"):
        TrainConfig(batch_size=6, micro_batches=4)
    with pytest.raises(ConfigError, match="mesh"):
        training.make_mesh(dataclasses.replace(TrainConfig().mesh, data=16))


def test_schedule_warmup_then_cosine_decay():
    config = OptimizerConfig(learning_rate=1.0, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    schedule = training.make_schedule(config, total_steps=110)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(schedule(60), 0.1 + 0.9 * 0.5, atol=1e-6)  # half-way through the decay
    np.testing.assert_allclose(schedule(110), 0.1, atol=1e-6)
    linear = training.make_schedule(dataclasses.replace(config, decay="linear"), total_steps=110)
    np.testing.assert_allclose(linear(60), 0.55, atol=1e-6)
