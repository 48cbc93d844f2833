"""Rung 3: hand-written LoRA: identity at init, merge, adapters off, dropout, PEFT export loaded by peft."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpatience.config import PRESETS, ConfigError, LoraConfig
from jaxpatience.model import lora
from jaxpatience.model.qwen2 import Qwen2ForCausalLM


@functools.cache
def _tiny_parts(seed: int):
    return nnx.split(Qwen2ForCausalLM(PRESETS["tiny"], rngs=nnx.Rngs(seed)))


def _tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    """A fresh module (new Variables, shared immutable arrays) of a tiny random model built once per seed."""
    graphdef, state = _tiny_parts(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def _ids(vocab: int, shape=(2, 12), seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def _logits(model, ids) -> np.ndarray:
    """Jitted forward (one compilation per graph structure; much faster than op-by-op on a tiny model)."""
    return np.asarray(_forward(*nnx.split(model), ids))


def _randomise_b(model, seed: int = 1, scale: float = 0.05) -> None:
    """Training moves B away from zero; emulate it so that adapters actually change the output."""
    key = jax.random.key(seed)
    for index, (_, adapter) in enumerate(lora.adapters(model)):
        shape = adapter.lora_B.get_value().shape
        adapter.lora_B.set_value(scale * jax.random.normal(jax.random.fold_in(key, index), shape))


def test_adapters_at_init_leave_the_model_unchanged():
    model = _tiny_model()
    ids = _ids(model.config.vocab_size)
    base_logits = _logits(model, ids)
    names = lora.apply_lora(model, LoraConfig(rank=4, alpha=8))
    assert len(names) == 7 * model.config.num_hidden_layers  # q k v o gate up down in every layer, no lm_head
    assert "lm_head" not in names and "model.layers.1.mlp.down_proj" in names
    np.testing.assert_array_equal(_logits(model, ids), base_logits)  # B = 0: exactly the base
    a = model.model.layers[0].self_attn.q_proj.lora.lora_A
    assert isinstance(a, lora.LoRAParam) and float(jnp.abs(a[...]).max()) > 0  # A is random
    assert a.get_metadata()["axes"] == ("lora_rank", "embed")


def test_target_regex_and_bad_targets():
    model = _tiny_model()
    names = lora.apply_lora(model, LoraConfig(rank=2, targets=r"model\.layers\.0\.self_attn\.(q|v)_proj"))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(ConfigError, match="matches no module"):
        lora.apply_lora(_tiny_model(), LoraConfig(targets=r"attn\.q_proj"))  # fullmatch, not search
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        lora.apply_lora(_tiny_model(), LoraConfig(targets="(q_proj"))
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        lora.apply_lora(model, LoraConfig(rank=2, targets=r".*q_proj"))


def test_scaling_and_rslora():
    assert LoraConfig(rank=16, alpha=32).scaling == 2.0
    assert LoraConfig(rank=16, alpha=32, rslora=True).scaling == 8.0


def test_merge_equals_unmerged_and_adapters_off_equals_base():
    model = _tiny_model(seed=3)
    ids = _ids(model.config.vocab_size)
    base_logits = _logits(model, ids)
    lora.apply_lora(model, LoraConfig(rank=4, alpha=8, rslora=True))
    _randomise_b(model)
    adapted = _logits(model, ids)
    assert np.abs(adapted - base_logits).max() > 1e-3  # the adapters do something
    with lora.adapters_off(model):
        np.testing.assert_array_equal(_logits(model, ids), base_logits)
    np.testing.assert_array_equal(_logits(model, ids), adapted)  # switched back on after the block
    assert lora.merge(model) == 14 and not lora.has_adapters(model)
    np.testing.assert_allclose(_logits(model, ids), adapted, atol=2e-5)


def test_dropout_only_with_a_key():
    model = _tiny_model()
    ids = _ids(model.config.vocab_size)
    lora.apply_lora(model, LoraConfig(rank=4, dropout=0.5))
    _randomise_b(model)
    clean = _logits(model, ids)
    lora.set_dropout_key(model, jax.random.key(0))
    dropped = _logits(model, ids)
    assert np.abs(dropped - clean).max() > 1e-4
    lora.set_dropout_key(model, None)
    np.testing.assert_array_equal(_logits(model, ids), clean)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_export_loads_in_peft_with_the_same_logits(tiny_checkpoint, tmp_path, rslora):
    """Our adapter, saved in PEFT's format and loaded by peft on the transformers base, gives our logits."""
    import torch
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM as TorchQwen2

    from jaxpatience import load_pretrained, save_pretrained

    base_dir = tiny_checkpoint(tied=rslora)
    model, tokenizer = load_pretrained(base_dir)
    config = LoraConfig(rank=4, alpha=16, rslora=rslora, targets=r".*\.(q_proj|v_proj|down_proj|gate_proj)")
    lora.apply_lora(model, config, seed=5)
    _randomise_b(model, scale=0.1)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(2, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

    adapter_dir = lora.save_peft_adapter(model, config, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["use_rslora"] is rslora
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    torch_base = TorchQwen2.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = torch_base(**inputs).logits.numpy()
    torch_model = PeftModel.from_pretrained(torch_base, adapter_dir).eval()
    wrapped = [n for n, m in torch_model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")]
    assert len(wrapped) == model.config.num_hidden_layers  # peft found and wrapped our targets
    with torch.no_grad():
        theirs = torch_model(**inputs).logits.numpy()
    real = mask.astype(bool)
    assert (
        np.abs(ours[real] - base_logits[real]).max() > 1e-2
    )  # the adapter matters, so the match below means something
    assert np.abs(ours[real] - theirs[real]).max() <= 1e-4

    # The merged export: lora.merge then save_pretrained gives a plain HF checkpoint with the same logits.
    lora.merge(model)
    merged_dir = save_pretrained(model, tokenizer, tmp_path / "merged")
    with torch.no_grad():
        merged = TorchQwen2.from_pretrained(merged_dir, dtype=torch.float32).eval()
        merged_logits = merged(**inputs).logits.numpy()
    assert np.abs(merged_logits[real] - theirs[real]).max() <= 1e-4

    # Loading back: our adapter directory, and the one peft itself writes, onto a fresh base give our logits.
    torch_model.save_pretrained(tmp_path / "peft_saved")
    for directory in (adapter_dir, tmp_path / "peft_saved"):
        fresh, _ = load_pretrained(base_dir)
        lora.load_adapter(fresh, directory)
        assert len(list(lora.adapters(fresh))) == 4 * model.config.num_hidden_layers
        loaded = np.asarray(fresh(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        assert np.abs(loaded[real] - theirs[real]).max() <= 1e-4, directory


def test_load_adapter_errors(tiny_checkpoint, tmp_path):
    from jaxpatience import load_pretrained
    from jaxpatience.model.weights import CheckpointError

    model, _ = load_pretrained(tiny_checkpoint())
    with pytest.raises(CheckpointError, match="adapter_config.json does not exist"):
        lora.load_adapter(model, tmp_path)
