"""train.strategy=shard_map (training/shard_map.py): the hand-written per-device step equals GSPMD's on the same mesh.

Tolerance: the two programs hold the same float32 math, reduced in another order (per-device partial sums then a
psum, against XLA's own split of the same sums). Metrics of two steps to rtol 1e-5 / atol 1e-6 and parameters
after two AdamW steps to rtol 1e-5 / atol 1e-6 (0.01% of one step of lr = 1e-2). Seen: metrics within 4e-6
absolute on log-probs near -43 (under 2e-6 relative everywhere), parameters within 3e-7 absolute. Leaving out
the gradients' psum, or the denominators', changes grad_norm or the loss by 50% or more, far outside these.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_packing import _loaders, _pairs
from test_train_step import _assert_close, _batch, _config, _fresh, _model, _run

from jaxpatience import training
from jaxpatience.config import PRESETS, ConfigError, LossConfig, MeshConfig, TrainConfig
from jaxpatience.sharding import make_mesh

CASES = {  # mesh (data, fsdp, tensor), config changes, pairs in the batch
    # LoRA DPO + NLL, reference in the step (adapters off); B/N = 2 pairs per device = one per micro-batch
    "data=8, lora, micro=2": ((8, 1, 1), {"micro_batches": 2, "batch_size": 16}, 16),
    "fsdp=8, lora, micro=2": ((1, 8, 1), {"micro_batches": 2, "batch_size": 16}, 16),
    # full-parameter DPO on carried ref_logps, layers unrolled (gathered up front, embedding and lm_head trained)
    "data=2 fsdp=4, full, unrolled": ((2, 4, 1), {"lora": None, "scan_layers": False}, 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shard_map_step_equals_the_gspmd_step(case):
    shape, changes, pairs = CASES[case]
    batch = _batch(pairs=pairs)
    if changes.get("lora", ...) is None:  # any reference log-probs will do: both steps read the same ones
        batch["ref_logps"] = np.random.default_rng(1).normal(-40.0, 3.0, size=(pairs, 2)).astype(np.float32)
    gspmd = _run(_config(**changes), shape, batch)
    by_hand = _run(_config(strategy="shard_map", **changes), shape, batch)
    _assert_close(gspmd, by_hand, rtol=1e-5, atol=1e-6)
    assert by_hand[0][1]["loss"] < by_hand[0][0]["loss"]  # the first step did train


def test_packed_sft_on_a_mixed_mesh_equals_the_gspmd_step():
    """Packed rows name pairs held by other devices: per-segment sums reach them through a reduce-scatter."""
    pairs = _pairs(seed=2)
    padded_loader, packed_loader = _loaders(pairs, batch_size=16, row_multiple=16, micro_batches=2)
    bucket, indices = padded_loader.plan(0)[0]
    packed = training.device_batch(packed_loader.make_batch(bucket, indices))
    named = packed["segment_pairs"].reshape(8, -1)  # [8 devices, rows·S]: pair 2·b + side of each segment
    owner = named // 2 // 2  # device d holds pairs b = 2d, 2d + 1 (one per micro-batch)
    assert np.any((named >= 0) & (owner != np.arange(8)[:, None]))  # some segments' pairs live elsewhere
    changes = {"micro_batches": 2, "batch_size": 16, "loss": LossConfig(dpo_weight=0.0, nll_weight=1.0)}
    gspmd = _run(_config(**changes), (2, 4, 1), packed)
    by_hand = _run(_config(strategy="shard_map", **changes), (2, 4, 1), packed)
    _assert_close(gspmd, by_hand, rtol=1e-5, atol=1e-6)


def test_compiled_programs_hold_the_hand_written_collectives():
    """FSDP: weights all-gathered, gradients reduce-scattered; data parallel: gradients all-reduced, no gather."""
    texts = {}
    for name, (shape, changes, pairs) in list(CASES.items())[:2]:
        trainer = _fresh(_config(strategy="shard_map", **changes), shape)
        placed = training.place_batch(_batch(pairs=pairs), trainer.mesh, trainer.config)
        texts[name] = trainer.step_fn.lower(trainer.state, trainer.frozen, placed).compile().as_text()
    fsdp, data = texts["fsdp=8, lora, micro=2"], texts["data=8, lora, micro=2"]
    assert "all-gather" in fsdp and "reduce-scatter" in fsdp
    assert "all-reduce" in data and "all-gather" not in data


def test_tensor_parallel_meshes_are_refused_in_one_sentence():
    with pytest.raises(ConfigError, match="use gspmd for tensor parallelism"):
        TrainConfig(strategy="shard_map", mesh=MeshConfig(fsdp=4, tensor=2))
    with pytest.raises(ConfigError, match="strategy must be gspmd or shard_map"):
        TrainConfig(strategy="pmap")
    with pytest.raises(ConfigError, match=r"not tensor=2; use train.strategy=gspmd for tensor parallelism\.$"):
        training.create_trainer(_model(), _config(strategy="shard_map"), make_mesh(1, 4, 2))


def test_the_step_lowers_from_shapes_alone():
    """lower_abstract_step (the sharding lab) takes the shard_map strategy like any other config."""
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batch().items()}
    lowered = training.lower_abstract_step(PRESETS["tiny"], _config(strategy="shard_map"), make_mesh(1, 8, 1), batch)
    assert "all_gather" in lowered.as_text() and "reduce_scatter" in lowered.as_text()
