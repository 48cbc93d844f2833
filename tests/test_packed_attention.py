"""Attention that costs Σ len² per row (model/attention.py): "blocked" on any backend, cuDNN on NVIDIA GPUs and
splash attention on TPUs against the written-out einsum; the loader's tile map against the dense mask; the packed
step with blocked attention against the padded step; and the fused kernels in the programs XLA's GPU compiler
(the CUDA plugin, abstract H100s) and libtpu (an abstract v5p slice) build, with no dense bias."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lora_grads
from test_train_step import PAIRS, _config, _fresh, _host, _model

from jaxpatience import sharding, training
from jaxpatience.config import PRESETS, LoraConfig, LossConfig, MeshConfig, ModelConfig, TrainConfig
from jaxpatience.data import packing
from jaxpatience.data.pairs import EncodedPair, PairLoader
from jaxpatience.model import attention
from jaxpatience.model.attention import RowMask, attend, attend_rows
from jaxpatience.model.qwen2 import set_attention

VOCAB = PRESETS["tiny"].vocab_size
CUDA_PLUGIN = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
LIBTPU = importlib.util.find_spec("libtpu") is not None


def _rows(lengths, row_length):
    """Packed rows of sequences with these lengths and their RowMask (the mask hidden_states builds)."""
    rows = packing.rows_from_lengths(lengths, row_length)
    segments = jnp.asarray(rows["segment_ids"])
    causal = jnp.tril(jnp.ones((row_length, row_length), bool))[None]
    dense = causal & (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] > 0)
    blocks = rows.get("attention_blocks")
    count = int(segments.max())
    return RowMask(dense, segments, count, None if blocks is None else jnp.asarray(blocks))


def _qkv(rows: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(rows, length, heads, 16)), jnp.float32) for heads in (4, 2, 2))


def _value_and_grads(implementation: str, mask: RowMask, q, k, v):
    """Sum of squares of the real queries' outputs, and its gradients with respect to q, k, v."""
    real = (mask.segment_ids > 0)[..., None, None]
    loss = lambda q, k, v: jnp.sum(jnp.where(real, attend_rows(q, k, v, mask, implementation), 0.0) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


# Sequences of 1 to 300 tokens in rows of 384 (3 tiles of 128): segments inside one tile, across tile edges, a
# row's last tile half padding; one and many segments per row.
LENGTHS = [300, 40, 1, 128, 129, 200, 60, 90, 17, 256, 3]


@pytest.mark.parametrize("map_from", ["loader", "causal"])
def test_blocked_attention_equals_the_einsum_reference(map_from):
    mask = _rows(LENGTHS, 384)
    if map_from == "causal":  # no map: every causal tile pair
        mask = mask._replace(blocks=None)
    q, k, v = _qkv(mask.segment_ids.shape[0], 384)
    want, want_grads = _value_and_grads("einsum", mask, q, k, v)
    got, got_grads = _value_and_grads("blocked", mask, q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5 * float(jnp.max(jnp.abs(w))))
    out = attend_rows(q, k, v, mask, "blocked")
    assert not np.any(np.asarray(out)[np.asarray(mask.segment_ids) == 0])  # padding queries: zeros


def test_blocked_attention_on_padded_rows_left_or_right():
    """A padded row is one segment (training.pair_logps): right and left padding, no map (causal tiles)."""
    length = 256
    real = np.array([256, 200, 130, 1, 0])
    right = (np.arange(length) < real[:, None]).astype(np.int32)
    for segments in (right, right[:, ::-1].copy()):
        segments = jnp.asarray(segments)
        dense = jnp.tril(jnp.ones((length, length), bool))[None] & (segments[:, None, :] > 0)
        mask = RowMask(dense & (segments[:, :, None] > 0), segments, 1, None)
        q, k, v = _qkv(len(real), length, seed=1)
        want, want_grads = _value_and_grads("einsum", mask, q, k, v)
        got, got_grads = _value_and_grads("blocked", mask, q, k, v)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for g, w in zip(got_grads, want_grads, strict=True):
            np.testing.assert_allclose(g, w, atol=2e-5 * float(jnp.max(jnp.abs(w))))


def test_the_tile_map_lists_exactly_the_tiles_the_mask_touches():
    rng = np.random.default_rng(3)
    for _ in range(20):
        lengths = list(rng.integers(1, 300, size=rng.integers(2, 12)))
        mask = _rows(lengths, 512)
        tiles = np.asarray(mask.dense).reshape(-1, 4, 128, 4, 128).any(axis=(2, 4))  # [R, 4, 4]
        for row in range(tiles.shape[0]):
            listed = np.asarray(mask.blocks[row])
            listed = {tuple(pair) for pair in listed if pair[1] >= 0}
            assert listed == {tuple(pair) for pair in np.argwhere(tiles[row])}
    # P: the most any row needs, rounded up to TILE_PAIR_MULTIPLE, at most the causal triangle (10 of 4 tiles)
    assert packing.rounded_tile_pairs(5, 512) == 8 and packing.rounded_tile_pairs(9, 512) == 10
    assert not packing.tiled(128) and not packing.tiled(200) and packing.tiled(256)


def _long_pairs(count: int = 24, seed: int = 0) -> list[EncodedPair]:
    """Pairs whose sequences (20 to 150 tokens) pack several to a row of 256 tokens (2 tiles)."""
    rng = np.random.default_rng(seed)
    ids = lambda low, high: rng.integers(1, VOCAB, size=int(rng.integers(low, high))).astype(np.int32)
    return [EncodedPair(ids(10, 40), ids(10, 110), ids(10, 60)) for _ in range(count)]


def test_packed_step_with_blocked_attention_equals_the_padded_step():
    """Log-probs, gradients and two train steps' metrics: packed rows with a tile map and blocked attention
    against the padded batch with the einsum reference, float32 rounding apart."""
    pairs = _long_pairs()
    common = dict(batch_size=PAIRS, buckets=(128, 256), pad_id=0, seed=1)
    padded_loader, packed_loader = PairLoader(pairs, **common), PairLoader(pairs, packing=True, **common)
    bucket, indices = padded_loader.plan(0)[0]
    padded = training.device_batch(padded_loader.make_batch(bucket, indices))
    packed = training.device_batch(packed_loader.make_batch(bucket, indices))
    assert packed["attention_blocks"].shape[0] == packed["input_ids"].shape[0]
    logps = []
    for batch, implementation in ((padded, "einsum"), (packed, "blocked")):
        model = _model()
        set_attention(model, implementation)
        logps.append(_host(training.pair_logps(model, {k: jnp.asarray(v) for k, v in batch.items()}, 64)))
    np.testing.assert_allclose(logps[1][0], logps[0][0], rtol=2e-5)  # per-pair log-probs, in the same order
    np.testing.assert_array_equal(logps[1][1], logps[0][1])  # counted tokens
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 _host(lora_grads(_model(), _config(), padded, 64, "einsum")),
                 _host(lora_grads(_model(), _config(), packed, 64, "blocked")))  # fmt: skip
    # A step through the trainer (place_batch, the jitted step): its metrics. At init the rewards are 0 up to the
    # rounding of log-prob sums of ~1e3 (seen: 4e-6), the policy and the reference pass fused differently.
    steps = [_host(_fresh(_config(attention=a)).step(b)) for b, a in ((padded, "einsum"), (packed, "blocked"))]
    for name in steps[0]:
        np.testing.assert_allclose(steps[1][name], steps[0][name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_auto_picks_the_fused_kernel_of_each_platform():
    assert training.resolve_attention("auto", "float32", "cpu") == "blocked"
    assert training.resolve_attention("auto", "bfloat16", "gpu") == "cudnn"
    assert training.resolve_attention("auto", "float32", "gpu") == "blocked"
    assert training.resolve_attention("auto", "bfloat16", "tpu") == "splash"
    with pytest.warns(UserWarning, match="splash attention needs a TPU"):
        assert training.resolve_attention("splash", "bfloat16", "cpu") == "blocked"


def test_cudnn_refused_on_a_cpu_falls_back_to_blocked():
    mask = _rows(LENGTHS, 384)
    q, k, v = _qkv(mask.segment_ids.shape[0], 384)
    with pytest.warns(UserWarning, match="cudnn attention refused"):
        got = attend_rows(q, k, v, mask, "cudnn")
    np.testing.assert_array_equal(got, attend_rows(q, k, v, mask, "blocked"))


def test_splash_attention_in_pallas_interpret_mode_equals_the_reference():
    """The TPU kernel run by Pallas' interpreter on the CPU: forward only (a few seconds)."""
    mask = _rows([100, 60, 200, 90, 30], 256)
    q, k, v = _qkv(mask.segment_ids.shape[0], 256)
    want = attend(q, k, v, mask.dense, "einsum")
    got = attention.attend_splash(q, k, v, mask, interpret=True)
    real = np.asarray(mask.segment_ids) > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)


# -- compile checks for the fused kernels ----------------------------------------------------------------------

SMALL = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, param_dtype="bfloat16",
                    compute_dtype="bfloat16")  # fmt: skip  # head dim 64: what cuDNN takes
ROWS, LENGTH, SEGMENTS = 16, 512, 4


def _step_config() -> TrainConfig:
    return TrainConfig(mesh=MeshConfig(fsdp=8), lora=LoraConfig(rank=8), loss=LossConfig(dpo_weight=1.0),
                       batch_size=16, remat="full", attention="auto")  # fmt: skip


def _abstract_batch(packed: bool) -> dict:
    if not packed:
        return {k: jax.ShapeDtypeStruct((16, 2, LENGTH), jnp.int32) for k in training.BATCH_KEYS}
    batch = {k: jax.ShapeDtypeStruct((ROWS, LENGTH), jnp.int32) for k in packing.ROW_KEYS}
    batch["segment_pairs"] = jax.ShapeDtypeStruct((ROWS, SEGMENTS), jnp.int32)
    batch["pair_mask"] = jax.ShapeDtypeStruct((16,), jnp.int32)
    batch["attention_blocks"] = jax.ShapeDtypeStruct((ROWS, 8, 2), jnp.int32)
    return batch


def on_hopper():
    """JAX asks the running backend for the GPU's compute capability before it takes packed (THD) rows; a
    deviceless compile runs on the CPU backend: answer as the abstract H100s (9.0) would (planning/gpus.py)."""
    from jaxpatience.planning import gpus

    return gpus.capability_of("h100")


@pytest.mark.skipif(not CUDA_PLUGIN, reason="JAX's CUDA plugin is not installed (make test installs it)")
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_the_step_reaches_cudnn_on_eight_h100s_without_a_dense_bias(packed):
    from jaxpatience.planning import gpus

    mesh = sharding.make_mesh(fsdp=8, devices=gpus.topology_devices("gpu:h100:8"))
    with on_hopper():
        text = training.lower_abstract_step(SMALL, _step_config(), mesh, _abstract_batch(packed)).compile().as_text()
    calls = [line for line in text.splitlines() if 'custom_call_target="__cudnn$fmha' in line]
    targets = {line.split('custom_call_target="')[1].split('"')[0] for line in calls}
    assert targets == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}  # fused, forward and backward
    assert "Bias" not in text  # no [B, 1, T, S] bias operand, no ScaleBias kernel
    # Besides q, k, v (and the backward's residuals): lengths [B] per device, or packed [R, S] lengths and
    # [R, S + 1] offsets per device.
    shapes = dict(re.findall(r"^\s*(?:ROOT )?(%[\w.-]+) = (\S+)", text, re.M))  # instruction -> its type
    for line in calls:
        operands = [shapes[name] for name in re.findall(r"%[\w.-]+", line.split("custom-call(")[1].split(")")[0])]
        ints = sorted(shape.split("{")[0] for shape in operands if shape.startswith("s32"))
        rows = ROWS // 8 if packed else 2 * 16 // 8  # per device: fsdp=8 splits the rows
        lengths_and_offsets = [f"s32[{rows},{SEGMENTS}]"] * 2 + [f"s32[{rows},{SEGMENTS + 1}]"] * 2
        assert ints == (lengths_and_offsets if packed else [f"s32[{rows}]"] * 2), (ints, line[:300])


TPU_SCRIPT = """
import dataclasses, sys
sys.path.insert(0, {tests!r})
from jax.experimental import topologies
from jaxpatience import sharding, training
import test_packed_attention as t
devices = topologies.get_topology_desc(topology_name="v5p:2x2x2", platform="tpu").devices
mesh = sharding.make_mesh(fsdp=8, devices=devices)
compiled = training.lower_abstract_step(t.SMALL, t._step_config(), mesh, t._abstract_batch(True)).compile()
text = compiled.as_text()
print("splash" if "tpu_custom_call" in text and "splash" in text else "no-splash")
"""


@pytest.mark.skipif(not LIBTPU, reason="libtpu (the [tpu] extra) is not installed")
def test_the_packed_step_reaches_splash_attention_on_an_abstract_v5p():
    env = os.environ | {"JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    script = TPU_SCRIPT.format(tests=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1:] == ["splash"], result.stdout[-2000:] + result.stderr[-2000:]
