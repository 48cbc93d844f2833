"""Shared fixtures: tiny random Qwen2 checkpoints made by transformers (PyTorch) with a small BPE tokenizer.

Nothing is downloaded: every checkpoint is built here, from a seed, in a temporary directory.
"""

from __future__ import annotations

import os

# Tests run on the CPU in float32; 8 fake devices let the sharding tests build real meshes.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

CORPUS = [
    "Tom has 3 apples and buys 4 bags with 5 apples each. How many apples does he have now?",
    "First, 4 bags times 5 apples is 20 apples. Then 3 + 20 = 23. The answer is 23.",
    "Let me check: 20 + 3 = 23. Yes. #### 23",
    "Sara had 120 coins, spent 45, then doubled the rest. 120 - 45 = 75. 75 * 2 = 150. The answer is 150.",
    "You are a helpful assistant. Please reason step by step, and put your final answer at the end.",
] * 4


@functools.cache
def _tokenizer():
    from jaxpatience.model.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS, vocab_size=300)


def make_tokenizer():
    """A small byte-level BPE with the ChatML special tokens and chat template (a fresh copy each call)."""
    import copy

    return copy.deepcopy(_tokenizer())


def make_hf_checkpoint(path: Path, *, tied: bool = False, seed: int = 0, dtype: str = "float32",
                       max_shard_size: str | None = None, **config_overrides) -> Path:  # fmt: skip
    """Save a random transformers Qwen2ForCausalLM (+ tokenizer) to `path` and return it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tokenizer()
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.update(config_overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**config)).eval()
    # Random biases and norm weights too, so that a loader that skipped them would be caught.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return Path(path)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: tiny_checkpoint(tied=False, seed=0, **Qwen2Config overrides) -> checkpoint directory."""
    counter = iter(range(1000))

    def make(**kwargs) -> Path:
        return make_hf_checkpoint(tmp_path / f"ckpt{next(counter)}", **kwargs)

    return make


def lora_grads(model, config, batch: dict, chunk_size: int, attention: str | None = None):
    """d loss / d adapters of `config`'s preference loss on `batch` (padded or packed), the reference in the same
    forward with the adapters off: what the packed-against-padded tests compare. `model` gets LoRA (config.lora)
    and, when given, the `attention` implementation."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpatience import training
    from jaxpatience.model import lora
    from jaxpatience.model.qwen2 import set_attention
    from jaxpatience.training import losses

    lora.apply_lora(model, config.lora, seed=config.seed)
    if attention is not None:
        set_attention(model, attention)
    graphdef, params, frozen = training.split_model(model)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss(params):
        model = nnx.merge(graphdef, params, frozen)
        with lora.adapters_off(model):
            ref = jax.lax.stop_gradient(training.pair_logps(model, batch, chunk_size)[0])
        policy, counts = training.pair_logps(model, batch, chunk_size)
        return losses.preference_loss(policy, counts, ref, config.loss)[0]

    return jax.grad(loss)(params)
