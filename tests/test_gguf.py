"""GGUF import: a qwen2 GGUF written here with gguf.GGUFWriter (F32, and Q8_0 where rows allow), imported and
compared with the same weights loaded from safetensors; the tokenizer is rebuilt from GGUF metadata."""

from __future__ import annotations

import json

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpatience import load_pretrained
from jaxpatience.config import ModelConfig
from jaxpatience.model.weights import CheckpointError, SafetensorsReader

# HF name -> GGUF name (the inverse of weights._GGUF_NAMES, as llama.cpp's converter writes them)
_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf: str) -> str:
    if hf in _TO_GGUF:
        return _TO_GGUF[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_TO_GGUF[module]}.{kind}"


def write_gguf(checkpoint, out, quantize: bool, architecture: str = "qwen2"):
    """Convert an HF checkpoint dir (safetensors + tokenizer.json) to a GGUF file, as llama.cpp would."""
    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer_json = json.loads((checkpoint / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(out), architecture)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(ModelConfig.from_hf(config).rope_theta)  # transformers 5 nests it in rope_parameters
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    vocab = tokenizer_json["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    tokens = [None] * (max((vocab | added).values()) + 1)
    for token, index in (vocab | added).items():
        tokens[index] = token
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in added else 1 for t in tokens])
    merges = tokenizer_json["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_eos_token_id(added["<|im_end|>"])
    writer.add_pad_token_id(added["<|endoftext|>"])
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    template = tokenizer_config.get("chat_template")
    if template is None and (checkpoint / "chat_template.jinja").is_file():
        template = (checkpoint / "chat_template.jinja").read_text()
    writer.add_chat_template(template)
    reader = SafetensorsReader(checkpoint)
    for name in reader.keys():
        array = np.asarray(reader.get(name), dtype=np.float32)
        if quantize and array.ndim == 2 and array.shape[1] % 32 == 0:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(_gguf_name(name), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(_gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_f32_gguf_matches_safetensors(tiny_checkpoint, tmp_path, tied):
    path = tiny_checkpoint(tied=tied)
    model_st, tokenizer_st = load_pretrained(path)
    model_gg, tokenizer_gg = load_pretrained(write_gguf(path, tmp_path / "model.gguf", quantize=False))
    assert model_gg.config.tie_word_embeddings == tied
    assert model_gg.config.replace(max_position_embeddings=0) == model_st.config.replace(max_position_embeddings=0)
    ids = jnp.asarray([[3, 17, 99, 150, 8, 41]])
    np.testing.assert_array_equal(np.asarray(model_gg(ids)), np.asarray(model_st(ids)))
    # the tokenizer rebuilt from metadata encodes, decodes and templates like the original
    text = "Sara had 120 coins, spent 45. <|im_end|>\nThe answer is 75."
    assert tokenizer_gg.encode(text) == tokenizer_st.encode(text)
    assert tokenizer_gg.decode(tokenizer_st.encode(text)) == text
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    render = dict(tokenize=False, add_generation_prompt=True)
    assert tokenizer_gg.apply_chat_template(messages, **render) == tokenizer_st.apply_chat_template(messages, **render)
    assert tokenizer_gg.eos_token == "<|im_end|>" and tokenizer_gg.pad_token == "<|endoftext|>"


def test_q8_0_gguf_is_dequantised_close_to_safetensors(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint(intermediate_size=128)
    model_st, _ = load_pretrained(path)
    model_q8, _ = load_pretrained(write_gguf(path, tmp_path / "q8.gguf", quantize=True))
    # The quantised weight is not the original but its 8-bit rounding: close, not equal.
    w_st = np.asarray(model_st.model.layers[0].mlp.up_proj.weight[...])
    w_q8 = np.asarray(model_q8.model.layers[0].mlp.up_proj.weight[...])
    assert not np.array_equal(w_st, w_q8)
    assert np.abs(w_q8 - w_st).max() <= np.abs(w_st).max() / 127 + 1e-6  # one Q8_0 step at most
    ids = jnp.asarray([[3, 17, 99, 150, 8, 41]])
    logits_st, logits_q8 = np.asarray(model_st(ids)), np.asarray(model_q8(ids))
    assert np.linalg.norm(logits_q8 - logits_st) / np.linalg.norm(logits_st) < 0.02


def test_gguf_of_another_architecture_is_refused(tiny_checkpoint, tmp_path):
    path = write_gguf(tiny_checkpoint(), tmp_path / "llama.gguf", quantize=False, architecture="llama")
    with pytest.raises(CheckpointError, match="'llama' model; only the 'qwen2'"):
        load_pretrained(path)


def test_garbage_gguf_is_refused(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_pretrained(tmp_path / "bad.gguf")
