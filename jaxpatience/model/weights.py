"""Checkpoints in and out: HF safetensors (one file or a sharded index), GGUF import, HF export.

Our parameter paths are HF's names (qwen2.py), so the "name table" is the identity for safetensors and one short
table for GGUF. Loading builds the model abstractly (`nnx.eval_shape`, no memory), then streams tensor by
tensor from memory-mapped files: each tensor is cast on the way and placed straight into its sharding, so a 7B
checkpoint loads in bf16 on a 24 GiB host without ever holding the model in float32. Checks are strict: every
key of the checkpoint is consumed and every parameter found, with matching shapes. Before any of that, the files
themselves are checked (checkpoint_files: headers against file sizes) and so is the tokenizer (tokenizer.py).

Also here, because they read the same files: `describe_checkpoint` (the facts `jaxpatience info` prints, read
from headers and metadata only) and `make_tiny_checkpoint` (the random tiny model of `jaxpatience tiny`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxpatience import sharding
from jaxpatience.config import ConfigError, ModelConfig, check_output_dir, preset
from jaxpatience.model.checkpoint_files import CheckpointError, open_gguf, safetensors_headers
from jaxpatience.model.qwen2 import Qwen2ForCausalLM
from jaxpatience.model.tokenizer import check_tokenizer, load_tokenizer, tokenizer_from_gguf, train_bpe_tokenizer

# ---------------------------------------------------------------------------------------------------
# safetensors, read and written directly: an 8-byte little-endian header size, a JSON header, raw data.
# (Doing it by hand gives memory-mapped, per-tensor, bf16-capable access from numpy without torch.)

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsReader:
    """name -> memory-mapped numpy array, over one `model.safetensors` or a sharded index (or one named file)."""

    def __init__(self, directory: str | Path):
        self.entries: dict[str, tuple[Path, dict, int]] = {}  # name -> (file, header entry, data start)
        for path, (header, data_start) in safetensors_headers(Path(directory)).items():  # checked: sizes agree
            for key, entry in header.items():
                if key != "__metadata__":
                    self.entries[key] = (path, entry, data_start)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name][1]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """A read-only memory map of one tensor: pages are read only when touched."""
        path, entry, data_start = self.entries[name]
        if entry["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}.")
        begin, end = entry["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[entry["dtype"]])
        count = (end - begin) // dtype.itemsize
        flat = (
            np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=(count,))
            if count
            else (np.zeros((0,), dtype))
        )
        return flat.reshape(entry["shape"])


TensorSpecs = dict[str, tuple[tuple[int, ...], np.dtype]]  # name -> (shape, dtype) of the tensors of one file


def write_safetensors(path: Path, tensors: TensorSpecs, fetch: Callable[[str], np.ndarray]) -> None:
    """Write tensors one at a time: the header is built from shapes, then `fetch(name)` is called per tensor."""
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _ST_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (shape, dtype) in tensors.items():
            array = np.ascontiguousarray(fetch(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise CheckpointError(f"tensor {name!r} has shape {array.shape}, expected {tuple(shape)}.")
            f.write(array.tobytes())


# ---------------------------------------------------------------------------------------------------
# Building a model from any source of named numpy arrays.


def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of a model whose leaves are ShapeDtypeStructs: no memory is used."""
    return nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))))


def hf_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def base_param_paths(state: nnx.State) -> Iterator[tuple[tuple, nnx.Variable]]:
    """(path, variable) of the HF weights: LoRA parameters (under `.../lora/...`) are not in HF files."""
    for path, variable in nnx.to_flat_state(state):
        if "lora" not in path:
            yield path, variable


def build_model(
    config: ModelConfig,
    names: list[str],
    shape_of: Callable[[str], tuple[int, ...]],
    get: Callable[[str], np.ndarray],
    source: str,
    mesh=None,
) -> Qwen2ForCausalLM:
    """Fill an abstract model from a source of named arrays, with strict key and shape checks."""
    return fill_model(config, plan_model(config, names, shape_of, source), get, mesh)


def plan_model(
    config: ModelConfig, names: list[str], shape_of: Callable[[str], tuple[int, ...]], source: str
) -> tuple[nnx.GraphDef, nnx.State]:
    """The abstract model, after checking the source's names and shapes against it: no weight is read yet."""
    graphdef, state = abstract_model(config)
    expected = {hf_name(p) for p, _ in base_param_paths(state)}
    available = set(names)
    if config.tie_word_embeddings:
        available.discard("lm_head.weight")  # some tied checkpoints carry a copy; the embedding is used
    available = {n for n in available if not n.endswith("rotary_emb.inv_freq")}  # old HF buffers, recomputed
    missing = sorted(expected - available)
    unexpected = sorted(available - expected)
    if missing:
        raise CheckpointError(f"{source} lacks the weight {missing[0]!r} ({len(missing)} missing in all).")
    if unexpected:
        raise CheckpointError(
            f"{source} has the weight {unexpected[0]!r}, which a Qwen2 of this config does not use "
            f"({len(unexpected)} unexpected in all; is config.json right?)."
        )
    for path, variable in nnx.to_flat_state(state):
        name, spec = hf_name(path), variable.get_value()
        if name not in expected:  # LoRA params, if any: keep their abstract init out of this function
            raise CheckpointError(f"cannot load {name!r}: build LoRA after loading the base model.")
        if tuple(shape_of(name)) != tuple(spec.shape):
            raise CheckpointError(
                f"{source}: weight {name!r} has shape {tuple(shape_of(name))}, the config implies {tuple(spec.shape)}."
            )
    return graphdef, state


def fill_model(
    config: ModelConfig, plan: tuple[nnx.GraphDef, nnx.State], get: Callable[[str], np.ndarray], mesh=None
) -> Qwen2ForCausalLM:
    """Read every weight of a planned model (plan_model) from `get`, cast to param_dtype and placed in its sharding."""
    graphdef, state = plan
    param_dtype = jnp.dtype(config.param_dtype)
    flat = []
    for path, variable in nnx.to_flat_state(state):
        spec = variable.get_value()
        value = _place(get(hf_name(path)), spec.shape, param_dtype, variable.get_metadata().get("axes"), mesh)
        flat.append((path, variable.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _place(array: np.ndarray, shape, dtype, axes, mesh) -> jax.Array:
    """Cast one host array (possibly a memory map) and put it on device(s), slice by slice when sharded."""
    if mesh is None:
        return jax.device_put(np.asarray(array).astype(dtype, copy=False))
    target = sharding.named_sharding(mesh, axes, shape) if axes else NamedSharding(mesh, PartitionSpec())
    # Each process materialises only the slices its own devices hold.
    return jax.make_array_from_callback(shape, target, lambda index: np.asarray(array[index]).astype(dtype))


# ---------------------------------------------------------------------------------------------------
# Public entry points.


def load_model(
    path: str | Path,
    param_dtype: str | None = None,
    compute_dtype: str | None = None,
    mesh=None,
    *,
    dtype: str | None = None,
) -> Qwen2ForCausalLM:
    """Load the weights of an HF directory or a .gguf file into a (possibly sharded) model (no tokenizer)."""
    return load_pretrained(
        path, param_dtype, compute_dtype=compute_dtype, mesh=mesh, with_tokenizer=False, dtype=dtype
    )[0]


def load_pretrained(
    path: str | Path,
    param_dtype: str | None = None,
    *,
    compute_dtype: str | None = None,
    mesh=None,
    with_tokenizer: bool = True,
    dtype: str | None = None,
):
    """(model, tokenizer) from an HF checkpoint directory (safetensors) or a qwen2 `.gguf` file.

    `param_dtype` (default float32) is the storage dtype of the weights; `dtype=` is its older spelling, kept as
    an alias. `compute_dtype` (default: `param_dtype`) is that of the matmuls. With `mesh`, each weight is placed
    straight into its sharding. `tokenizer` is None when `with_tokenizer=False`.
    """
    path = Path(path)
    param_dtype = _param_dtype_from(param_dtype, dtype)
    if _checkpoint_kind(path) == "gguf":
        return load_gguf(path, param_dtype, compute_dtype=compute_dtype, mesh=mesh, with_tokenizer=with_tokenizer)
    config = ModelConfig.from_hf(path, param_dtype=param_dtype, compute_dtype=compute_dtype or param_dtype)
    reader = SafetensorsReader(path)  # every file's header checked against its size
    plan = plan_model(config, reader.keys(), reader.shape, str(path))  # names and shapes, from the headers
    tokenizer = None
    if with_tokenizer:  # checked before the weights are read: a bad tokenizer fails in a second, not minutes
        tokenizer = load_tokenizer(path, config.vocab_size)
    return fill_model(config, plan, reader.get, mesh), tokenizer


def _param_dtype_from(param_dtype: str | None, dtype: str | None) -> str:
    """The storage dtype from `param_dtype=` or its alias `dtype=` (README and older callers); float32 if neither.

    Both default to None (not "float32") so that passing both, even with equal values, is caught.
    """
    if param_dtype is not None and dtype is not None:
        raise ValueError(f"pass param_dtype or its alias dtype, not both ({param_dtype!r} and {dtype!r}).")
    return param_dtype or dtype or "float32"


def _checkpoint_kind(path: Path) -> str:
    """'gguf' for a .gguf file, 'hf' for a directory; a one-sentence CheckpointError for anything else."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist.")
    if path.suffix == ".gguf":
        return "gguf"
    if not path.is_dir():
        raise CheckpointError(f"{path} is neither an HF checkpoint directory nor a .gguf file.")
    return "hf"


def save_pretrained(
    model: Qwen2ForCausalLM,
    tokenizer,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write an HF checkpoint directory (config.json, safetensors, tokenizer) that transformers loads.

    `dtype` is the dtype of the saved tensors (default: the model's param_dtype). Weights are fetched and written
    one tensor at a time (all processes must call this; process 0 writes). LoRA adapters are not base weights:
    merge them first (lora.merge) to export a merged model.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "the output folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{out_dir} exists and is not empty; choose another folder or overwrite it "
            "(`jaxpatience tiny --overwrite`, overwrite=True)."
        )
    save_dtype = jnp.dtype(dtype or model.config.param_dtype)
    params = {hf_name(p): v for p, v in base_param_paths(nnx.state(model, nnx.Param))}
    if not params:
        raise CheckpointError("the model has no parameters to save.")
    shards = _plan_shards(params, save_dtype, max_shard_bytes)

    def fetch(name: str) -> np.ndarray:
        value = params[name][...]
        if not value.is_fully_addressable:  # multi-host: gather this one tensor
            value = multihost_utils.process_allgather(value, tiled=True)
        return np.asarray(jax.device_get(value)).astype(save_dtype)

    is_writer = jax.process_index() == 0
    if is_writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, shard in zip(names, shards, strict=True):
        if is_writer:
            write_safetensors(out_dir / file, shard, fetch)
        else:  # take part in the collective gathers without writing
            for name in shard:
                fetch(name)
    if is_writer:
        _write_checkpoint_metadata(out_dir, model.config, tokenizer, save_dtype, dict(zip(names, shards, strict=True)))
    return out_dir


def _plan_shards(params: dict[str, nnx.Variable], save_dtype: np.dtype, max_shard_bytes: int) -> list[TensorSpecs]:
    """Split the parameters, in order, into files of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[TensorSpecs] = [{}]
    size = 0
    for name, variable in params.items():
        nbytes = math.prod(variable.get_value().shape) * save_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (tuple(variable.get_value().shape), save_dtype)
        size += nbytes
    return shards


def _write_checkpoint_metadata(
    out_dir: Path, config: ModelConfig, tokenizer, save_dtype: np.dtype, files: dict[str, TensorSpecs]
) -> None:
    """Everything but the tensors: the shard index (several files only), config.json, tokenizer, generation ids."""
    if len(files) > 1:
        weight_map = {n: file for file, shard in files.items() for n in shard}
        total = sum(math.prod(s) * d.itemsize for shard in files.values() for s, d in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_config = config.to_hf() | {"torch_dtype": str(save_dtype)}
    if tokenizer is not None:
        hf_config |= {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        if tokenizer.bos_token_id is not None:
            hf_config["bos_token_id"] = tokenizer.bos_token_id
        tokenizer.save_pretrained(str(out_dir))
        generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))


# ---------------------------------------------------------------------------------------------------
# GGUF (llama.cpp's format) import for the qwen2 architecture.

_GGUF_NAMES = [  # (GGUF name pattern, HF name template)
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", "model.layers.{0}.self_attn.q_proj.{1}"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", "model.layers.{0}.self_attn.k_proj.{1}"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", "model.layers.{0}.self_attn.v_proj.{1}"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{0}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{0}.mlp.down_proj.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
]


def gguf_to_hf_name(name: str) -> str | None:
    for pattern, template in _GGUF_NAMES:
        match = re.fullmatch(pattern, name)
        if match:
            return template.format(*match.groups())
    return None


def read_gguf_metadata(reader) -> dict:
    """GGUF key/value fields as plain Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def gguf_config(metadata: dict, path: Path, tied: bool, vocab_size: int, **dtypes) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch != "qwen2":
        raise CheckpointError(f"{path} holds a {arch!r} model; only the 'qwen2' architecture is supported.")
    try:
        heads = int(metadata["qwen2.attention.head_count"])
        return ModelConfig(
            vocab_size=vocab_size,
            hidden_size=int(metadata["qwen2.embedding_length"]),
            intermediate_size=int(metadata["qwen2.feed_forward_length"]),
            num_hidden_layers=int(metadata["qwen2.block_count"]),
            num_attention_heads=heads,
            num_key_value_heads=int(metadata.get("qwen2.attention.head_count_kv", heads)),
            # GGUF stores these as float32: round back to the decimal value they were written from
            rope_theta=float(f"{metadata.get('qwen2.rope.freq_base', 10000.0):.7g}"),
            rms_norm_eps=float(f"{metadata.get('qwen2.attention.layer_norm_rms_epsilon', 1e-6):.7g}"),
            max_position_embeddings=int(metadata.get("qwen2.context_length", 32768)),
            tie_word_embeddings=tied,
            **dtypes,
        )
    except KeyError as err:
        raise CheckpointError(f"{path} lacks the GGUF metadata key {err.args[0]!r}.") from None
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def load_gguf(
    path: str | Path,
    param_dtype: str | None = None,
    *,
    compute_dtype: str | None = None,
    mesh=None,
    with_tokenizer: bool = True,
    dtype: str | None = None,
):
    """(model, tokenizer) from a qwen2 GGUF file: tensors dequantised one at a time, tokenizer from metadata.

    The dtype arguments are those of `load_pretrained` (`dtype=` is the alias of `param_dtype=`).
    """
    path = Path(path)
    param_dtype = _param_dtype_from(param_dtype, dtype)
    reader = open_gguf(path)
    metadata = read_gguf_metadata(reader)
    tensors = {}
    for tensor in reader.tensors:
        hf = gguf_to_hf_name(tensor.name)
        if hf is None:
            if tensor.name.startswith("rope_freqs"):
                continue
            raise CheckpointError(f"{path} has the tensor {tensor.name!r}, which a qwen2 model does not use.")
        tensors[hf] = tensor
    if "model.embed_tokens.weight" not in tensors:
        raise CheckpointError(f"{path} lacks the tensor 'token_embd.weight'.")
    vocab_size = int(tensors["model.embed_tokens.weight"].shape[-1])  # GGUF shapes are [in, out]-reversed
    config = gguf_config(
        metadata,
        path,
        tied="lm_head.weight" not in tensors,
        vocab_size=vocab_size,
        param_dtype=param_dtype,
        compute_dtype=compute_dtype or param_dtype,
    )

    def shape_of(name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(tensors[name].shape))  # ggml lists the fastest dim first

    def get(name: str) -> np.ndarray:
        tensor = tensors[name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return np.asarray(values, dtype=np.float32).reshape(shape_of(name))

    plan = plan_model(config, list(tensors), shape_of, str(path))
    tokenizer = gguf_tokenizer(metadata, path, vocab_size) if with_tokenizer else None  # before any weight
    return fill_model(config, plan, get, mesh), tokenizer


def gguf_tokenizer(metadata: dict, path: Path, vocab_size: int):
    """The tokenizer of a GGUF file's metadata, checked (tokenizer.check_tokenizer) against the model's vocab."""
    try:
        tokenizer = tokenizer_from_gguf(metadata)
    except Exception as err:  # missing keys, bad ids, and the tokenizers library's own errors
        raise CheckpointError(f"{path}: cannot build the tokenizer from its metadata ({err}).") from None
    check_tokenizer(tokenizer, vocab_size, str(path), defined=set(metadata["tokenizer.ggml.tokens"]))
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# `jaxpatience info`: facts from headers and metadata only, so describing a 7B checkpoint takes a second.


def describe_checkpoint(path: str | Path) -> dict:
    """Facts about an HF checkpoint directory or a .gguf file (format, size, shape, tokenizer) without its weights.

    The keys are the lines of `jaxpatience info`; `parameters` counts base weights (no LoRA), `dtype` lists the
    stored tensor types.
    """
    path = Path(path)
    if _checkpoint_kind(path) == "gguf":
        return _describe_gguf(path)
    config = ModelConfig.from_hf(path)
    reader = SafetensorsReader(path)  # the checks of a load: every file's header against its size,
    plan_model(config, reader.keys(), reader.shape, str(path))  # names and shapes against the config,
    tokenizer = load_tokenizer(path, config.vocab_size)  # and the tokenizer
    return {
        "path": str(path),
        "format": "safetensors" + (" (sharded)" if (path / "model.safetensors.index.json").is_file() else ""),
        "architecture": "Qwen2ForCausalLM",
        "parameters": sum(math.prod(reader.shape(k)) for k in reader.keys()),
        "dtype": ", ".join(sorted({reader.dtype(k) for k in reader.keys()})),
        **_shape_facts(config),
        "tokenizer_size": len(tokenizer),
        "chat_template": "from checkpoint" if _has_chat_template(path) else "missing (ChatML default used)",
        "eos_token": tokenizer.eos_token,
    }


def _has_chat_template(path: Path) -> bool:
    """Whether the directory brings its own chat template (else load_tokenizer supplied ChatML)."""
    if (path / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def _describe_gguf(path: Path) -> dict:
    reader = open_gguf(path)
    metadata = read_gguf_metadata(reader)
    names = {gguf_to_hf_name(t.name) for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise CheckpointError(f"{path} lacks the tensor 'token_embd.weight'.")
    config = gguf_config(metadata, path, tied="lm_head.weight" not in names, vocab_size=int(embed.shape[-1]))
    tokenizer = gguf_tokenizer(metadata, path, config.vocab_size)  # checked as a load checks it
    return {
        "path": str(path),
        "format": "gguf",
        "architecture": "qwen2",
        "parameters": sum(int(t.n_elements) for t in reader.tensors),
        "dtype": ", ".join(sorted({t.tensor_type.name for t in reader.tensors})),
        **_shape_facts(config),
        "tokenizer_size": len(tokenizer),
        "chat_template": "from checkpoint" if metadata.get("tokenizer.chat_template") else "missing (ChatML default)",
    }


def _shape_facts(config: ModelConfig) -> dict:
    """The model-shape lines of `jaxpatience info`, the same for both formats."""
    return {
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": f"{config.num_attention_heads} query / {config.num_key_value_heads} kv x {config.resolved_head_dim}",
        "tied_embeddings": config.tie_word_embeddings,
        "vocab_size": config.vocab_size,
    }


# ---------------------------------------------------------------------------------------------------
# `jaxpatience tiny`: a checkpoint to try every command on, made here from a seed (no downloads).

TINY_CORPUS = [
    "Tom has 3 apples and buys 4 bags with 5 apples each. How many apples does he have now?",
    "4 bags times 5 apples is 20 apples. 3 + 20 = 23. Let me check: 23 - 20 = 3. The answer is 23.",
    "You are a helpful assistant. Please reason step by step. #### 42",
]  # what the tiny tokenizer's BPE merges are learnt from


def make_tiny_checkpoint(out: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """A random Qwen2 of the `tiny` preset with a small BPE tokenizer (ChatML), saved as an HF checkpoint to `out`."""
    tokenizer = train_bpe_tokenizer(TINY_CORPUS, vocab_size=320)
    config = preset("tiny").replace(vocab_size=len(tokenizer), tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))
    return save_pretrained(model, tokenizer, out, overwrite=overwrite)
