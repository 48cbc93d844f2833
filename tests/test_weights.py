"""Rung 2: checkpoints. Round trips through transformers, sharded files, streaming, sharded placement, bad input."""

from __future__ import annotations

import gc
import json
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2ForCausalLM as TorchQwen2

from jaxpatience import load_pretrained, save_pretrained
from jaxpatience.config import ConfigError
from jaxpatience.model.weights import CheckpointError, SafetensorsReader, load_model, write_safetensors
from jaxpatience.sharding import make_mesh

IDS = np.array([[5, 9, 33, 120, 7, 64, 200, 3]])


def _logits(model, ids=IDS):
    return np.asarray(model(jnp.asarray(ids)))


def _torch_logits(path, ids=IDS):
    with torch.no_grad():
        return TorchQwen2.from_pretrained(path).eval()(torch.tensor(ids)).logits.numpy()


def _flat_params(model) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_round_trip_through_transformers(tiny_checkpoint, tmp_path, tied):
    model, tokenizer = load_pretrained(tiny_checkpoint(tied=tied))
    out = save_pretrained(model, tokenizer, tmp_path / "saved")
    # transformers loads what we wrote and computes the same logits as our model
    np.testing.assert_allclose(_torch_logits(out), _logits(model), atol=1e-4)
    # and reading it back gives bit-identical parameters and the same tokenizer
    again, tokenizer_again = load_pretrained(out)
    before, after = _flat_params(model), _flat_params(again)
    assert before.keys() == after.keys()
    for path in before:
        np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))
    assert tokenizer_again.encode("Tom has 3 apples") == tokenizer.encode("Tom has 3 apples")
    assert tokenizer_again.chat_template == tokenizer.chat_template


def test_sharded_index_checkpoint_loads_and_saves(tiny_checkpoint, tmp_path):
    single = tiny_checkpoint(seed=3)
    sharded = tiny_checkpoint(seed=3, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    model, tokenizer = load_pretrained(sharded)
    np.testing.assert_array_equal(_logits(model), _logits(load_pretrained(single)[0]))
    out = save_pretrained(model, tokenizer, tmp_path / "resharded", max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    np.testing.assert_allclose(_torch_logits(out), _logits(model), atol=1e-4)


def test_bfloat16_checkpoint_loads_exactly(tiny_checkpoint):
    path = tiny_checkpoint(dtype="bfloat16")
    torch_model = TorchQwen2.from_pretrained(path, dtype=torch.bfloat16)
    expected = torch_model.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
    model16, _ = load_pretrained(path, dtype="bfloat16")
    model32, _ = load_pretrained(path, dtype="float32")
    got16 = model16.model.layers[1].mlp.down_proj.weight[...]
    assert got16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got16.astype(jnp.float32)), expected)
    np.testing.assert_array_equal(np.asarray(model32.model.layers[1].mlp.down_proj.weight[...]), expected)
    # `dtype=` is the older name of `param_dtype=`: the same storage dtype, and naming both is refused.
    by_new_name = load_model(path, param_dtype="bfloat16").model.layers[1].mlp.down_proj.weight[...]
    assert by_new_name.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(by_new_name), np.asarray(got16))
    with pytest.raises(ValueError, match="not both"):
        load_pretrained(path, param_dtype="bfloat16", dtype="bfloat16")


def test_loading_streams_tensor_by_tensor(tiny_checkpoint):
    """Host memory while loading into bf16 stays below what any whole copy of the model would take.

    A loader that held the model in float32 would peak at >= 1.0x its float32 size, one that built every bf16
    array on the host first at >= 0.5x. Streaming peaks at about one tensor plus fixed Python allocations
    (seen: 0.12x to 0.25x; the fixed part varies from run to run with garbage collection), so the bound is 0.5x.
    """
    # ~24 MB in float32, 1 MB at most per tensor.
    path = tiny_checkpoint(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                           num_key_value_heads=4)  # fmt: skip
    reader = SafetensorsReader(path)
    total = sum(np.prod(reader.shape(k)) * 4 for k in reader.keys())
    largest = max(np.prod(reader.shape(k)) * 4 for k in reader.keys())
    assert total > 10 * largest  # the bound below is meaningful only then
    load_pretrained(path, dtype="bfloat16", with_tokenizer=False)  # warm up imports and jit caches
    gc.collect()
    tracemalloc.start()
    load_pretrained(path, dtype="bfloat16", with_tokenizer=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.5 * total, f"peak host allocation {peak} bytes vs model size {total} bytes"


def test_load_into_mesh_places_each_weight_in_its_sharding(tiny_checkpoint):
    path = tiny_checkpoint()
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded, _ = load_pretrained(path, mesh=mesh)
    q = sharded.model.layers[0].self_attn.q_proj.weight[...]  # [N*H, D] = ("heads", "embed")
    assert q.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 32)
    np.testing.assert_allclose(_logits(sharded), _logits(load_pretrained(path)[0]), atol=1e-5)


# ----------------------------------------------------------------------------------------------- bad input


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        load_pretrained(tmp_path / "empty")


def test_wrong_architecture(tiny_checkpoint):
    path = tiny_checkpoint()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        load_pretrained(path)


def test_malformed_config(tiny_checkpoint):
    path = tiny_checkpoint()
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_pretrained(path)


def _rewrite_without(path, drop: str):
    reader = SafetensorsReader(path)
    arrays = {k: np.array(reader.get(k)) for k in reader.keys() if k != drop}
    del reader
    write_safetensors(path / "model.safetensors", {k: (a.shape, a.dtype) for k, a in arrays.items()}, arrays.get)


def test_missing_key_is_named(tiny_checkpoint):
    path = tiny_checkpoint()
    _rewrite_without(path, "model.layers.1.self_attn.k_proj.bias")
    with pytest.raises(CheckpointError, match=r"lacks the weight 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        load_pretrained(path)


def test_unexpected_key_is_named(tiny_checkpoint):
    path = tiny_checkpoint(num_hidden_layers=3)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match=r"has the weight 'model\.layers\.2\."):
        load_pretrained(path)


def test_shape_mismatch_is_named(tiny_checkpoint):
    path = tiny_checkpoint()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"intermediate_size": 100}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(64, 112\)"):
        load_pretrained(path)


def test_save_refuses_to_overwrite(tiny_checkpoint, tmp_path):
    model, tokenizer = load_pretrained(tiny_checkpoint())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        save_pretrained(model, tokenizer, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------- damaged files, refused before loading


def test_truncated_checkpoint_is_refused_before_any_weight_is_read(tiny_checkpoint):
    """A cut download used to fail halfway through the load with numpy's "mmap length is greater than file size"."""
    path = tiny_checkpoint()
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: tensor '.+' ends at data byte"):
        load_pretrained(path)


def test_sharded_checkpoint_with_a_missing_or_cut_shard_is_named(tiny_checkpoint):
    path = tiny_checkpoint(max_shard_size="40KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].write_bytes(shards[1].read_bytes() + b"\0" * 8)
    with pytest.raises(CheckpointError, match=rf"{shards[1].name} has 8 bytes after its last tensor"):
        load_pretrained(path)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json names {shards[1].name}, which does not exist"):
        load_pretrained(path)


def test_tokenizer_is_checked_against_the_model_vocab(tiny_checkpoint):
    """Qwen2 pads its embedding past the tokenizer's last id (fine); a tokenizer past the embedding is refused."""
    model, tokenizer = load_pretrained(tiny_checkpoint(vocab_size=320))  # the tokenizer has 300 tokens
    assert model.config.vocab_size == 320 and len(tokenizer) == 300
    with pytest.raises(CheckpointError, match="token ids up to 299, past the model's vocab_size 290"):
        load_pretrained(tiny_checkpoint(vocab_size=290))
