"""The model: Qwen2 in Flax NNX with HF names (qwen2.py), hand-written LoRA (lora.py), HF safetensors and GGUF
weights in and out (weights.py), tokenizers (tokenizer.py), and the checks a checkpoint's files pass before a
weight is read (checkpoint_files.py)."""

from jaxpatience.model.checkpoint_files import CheckpointError
from jaxpatience.model.lora import LoRAParam, apply_lora, load_adapter, merge, save_peft_adapter
from jaxpatience.model.qwen2 import KVCache, LayerStack, Qwen2ForCausalLM, init_kv_cache
from jaxpatience.model.tokenizer import load_tokenizer
from jaxpatience.model.weights import describe_checkpoint, load_pretrained, make_tiny_checkpoint, save_pretrained
