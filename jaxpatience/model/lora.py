"""Hand-written LoRA: y = W x + scaling * B (A dropout(x)), with A random and B zero, so at init y = W x.

Adapters attach to the `lora` slot of qwen2.Linear, so their parameters live at `.../q_proj/lora/lora_A` and
`.../q_proj/lora/lora_B` while the base weight keeps its HF path (`.../q_proj/weight`); weights.py skips any
path containing "lora", so base loading and saving are unchanged. Adapter parameters are `LoRAParam`, a
distinct variable type: `nnx.split(model, LoRAParam, ...)` separates what is trained from the frozen base.

Layout follows PEFT exactly: lora_A [R, in], lora_B [out, R] (HF's [out, in] convention), scaling alpha / R
(rsLoRA: alpha / sqrt(R)), dropout on the adapter's input. `save_peft_adapter` writes a directory that
`peft.PeftModel.from_pretrained(transformers_base, dir)` loads.

Shape letters: R LoRA rank; `in`/`out` are the wrapped linear's feature sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxpatience.config import ConfigError, LoraConfig, read_json
from jaxpatience.model.checkpoint_files import CheckpointError
from jaxpatience.model.qwen2 import Linear
from jaxpatience.model.weights import SafetensorsReader, write_safetensors

Array = jax.Array


class LoRAParam(nnx.Param):
    """A trainable adapter parameter. A subclass of Param, so generic Param code still sees it."""


class LoRA(nnx.Module):
    """The low-rank update for one Linear: x [..., in] -> scaling * (dropout(x) @ A.T) @ B.T  [..., out]."""

    def __init__(self, base: Linear, config: LoraConfig, *, rngs: nnx.Rngs):
        out_features, in_features = base.weight.get_value().shape
        out_axis, in_axis = base.weight.get_metadata()["axes"]
        bound = 1.0 / math.sqrt(in_features)  # PEFT's kaiming_uniform_(a=sqrt(5)) bound
        a_init = jax.random.uniform(rngs.params(), (config.rank, in_features), jnp.float32, -bound, bound)
        self.lora_A = LoRAParam(a_init, axes=("lora_rank", in_axis))  # [R, in]
        self.lora_B = LoRAParam(jnp.zeros((out_features, config.rank), jnp.float32), axes=(out_axis, "lora_rank"))
        self.scaling = config.scaling
        self.dropout_rate = config.dropout
        self.enabled = True  # False = "adapters off" (the reference pass); a trace-time Python switch
        self.dropout_key: Array | None = nnx.data(None)  # set per step by set_dropout_key; None = no dropout

    def __call__(self, x: Array) -> Array:
        if not self.enabled:
            return jnp.zeros((), x.dtype)  # a scalar zero: the base output is returned unchanged
        if self.dropout_rate > 0 and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout_rate, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout_rate), 0).astype(x.dtype)
        down = jnp.einsum("...i,ri->...r", x, self.lora_A[...].astype(x.dtype))  # [..., R]
        up = jnp.einsum("...r,or->...o", down, self.lora_B[...].astype(x.dtype))  # [..., out]
        return up * jnp.asarray(self.scaling, x.dtype)

    def delta(self) -> Array:
        """The dense update scaling * B @ A, [out, in] in float32 (what `merge` adds to the weight)."""
        return self.scaling * (self.lora_B[...] @ self.lora_A[...])


def module_name(path: tuple) -> str:
    """('model', 'layers', 0, 'self_attn', 'q_proj') -> 'model.layers.0.self_attn.q_proj' (HF's name)."""
    return ".".join(str(p) for p in path)


def linear_modules(model: nnx.Module) -> Iterator[tuple[str, Linear]]:
    """(HF module name, Linear) for every linear layer of the model, lm_head included."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            yield module_name(path), module


def adapters(model: nnx.Module) -> Iterator[tuple[str, LoRA]]:
    """(HF module name of the wrapped linear, LoRA) for every adapter in the model."""
    for name, linear in linear_modules(model):
        if linear.lora is not None:
            yield name, linear.lora


def apply_lora(model: nnx.Module, config: LoraConfig, *, seed: int = 0) -> list[str]:
    """Attach a fresh adapter (A random, B zero) to every Linear whose HF name fullmatches `config.targets`.

    Changes `model` in place and returns the names of the wrapped modules. Merge an existing adapter first
    (`merge`) before attaching a new one, as Iterative RPO does between iterations.
    """
    try:
        pattern = re.compile(config.targets)
    except re.error as err:
        raise ConfigError(f"lora.targets {config.targets!r} is not a valid regular expression ({err}).") from None
    rngs = nnx.Rngs(params=seed)
    names = []
    for name, linear in list(linear_modules(model)):
        if not pattern.fullmatch(name):
            continue
        if linear.lora is not None:
            raise ConfigError(f"{name} already has a LoRA adapter; merge it (lora.merge) before adding another.")
        linear.lora = LoRA(linear, config, rngs=rngs)
        names.append(name)
    if not names:
        raise ConfigError(
            f"lora.targets {config.targets!r} matches no module; names look like 'model.layers.0.self_attn.q_proj'."
        )
    return names


def merge(model: nnx.Module) -> int:
    """Fold every adapter into its base weight (W += scaling * B @ A, in the weight's dtype) and remove it.

    Changes `model` in place (the merged model is a plain Qwen2 again, ready for weights.save_pretrained or a
    fresh `apply_lora`); returns the number of adapters merged.
    """
    count = 0
    for _, linear in list(linear_modules(model)):
        if linear.lora is None:
            continue
        weight = linear.weight[...]
        merged = (weight.astype(jnp.float32) + linear.lora.delta()).astype(weight.dtype)
        linear.weight.set_value(jax.device_put(merged, weight.sharding))  # keep the weight's sharding
        linear.lora = None
        count += 1
    return count


@contextlib.contextmanager
def adapters_off(model: nnx.Module) -> Iterator[nnx.Module]:
    """Within the block, the model computes as its base (the reference policy); used inside traced code."""
    switched = [lora for _, lora in adapters(model)]
    for lora in switched:
        lora.enabled = False
    try:
        yield model
    finally:
        for lora in switched:
            lora.enabled = True


def set_dropout_key(model: nnx.Module, key: Array | None) -> None:
    """Give every adapter its own dropout key derived from `key` (None turns dropout off); a stacked adapter
    (qwen2.LayerStack: a leading layer axis) gets one key per layer."""
    for index, (_, lora) in enumerate(adapters(model)):
        if key is None:
            lora.dropout_key = None
            continue
        own = jax.random.fold_in(key, index)
        stacked = lora.lora_A[...].ndim == 3  # [L, R, in]
        lora.dropout_key = jax.random.split(own, lora.lora_A[...].shape[0]) if stacked else own


def has_adapters(model: nnx.Module) -> bool:
    return next(adapters(model), None) is not None


# ---------------------------------------------------------------------------------------------------
# PEFT export: adapter_model.safetensors + adapter_config.json, loadable by peft on the transformers base.


def _host(value: Array) -> np.ndarray:
    if not value.is_fully_addressable:  # multi-host: gather this one tensor
        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value), dtype=np.float32)


def save_peft_adapter(
    model: nnx.Module,
    config: LoraConfig,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapters of `model` in PEFT's format (all processes call this; process 0 writes).

    Keys are PEFT's: `base_model.model.<HF module name>.lora_A.weight` [R, in] and `....lora_B.weight` [out, R].
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it.")
    found = list(adapters(model))
    if not found:
        raise CheckpointError("the model has no LoRA adapters to save (apply_lora first, and do not merge).")
    tensors: dict[str, Array] = {}
    for name, lora in found:
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora.lora_A[...]
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora.lora_B[...]
    host = {key: _host(value) for key, value in tensors.items()}  # every process takes part in the gathers
    if jax.process_index() != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = {key: (array.shape, np.dtype(np.float32)) for key, array in host.items()}
    write_safetensors(out_dir / "adapter_model.safetensors", layout, host.__getitem__)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": config.targets,  # a string: PEFT fullmatches it against module names, as we do
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out_dir


def load_adapter(model: nnx.Module, adapter_dir: str | Path) -> nnx.Module:
    """Attach the LoRA adapter of a PEFT directory (ours or PEFT's own) to `model`, unmerged; returns `model`.

    Adapters go exactly on the modules named in `adapter_model.safetensors`; rank, alpha and rsLoRA come from
    `adapter_config.json`. Everything is checked against the model before the model is touched (`_read_adapter`):
    an adapter made for another base (other layers, shapes or module names) is refused whole, never partly
    applied. Merge afterwards (`merge`) for the fastest decoding.
    """
    config, tensors = _read_adapter(model, Path(adapter_dir))
    apply_lora(model, config)
    for name, lora in adapters(model):
        for kind, variable in (("lora_A", lora.lora_A), ("lora_B", lora.lora_B)):
            variable.set_value(jax.device_put(tensors[name, kind], variable.get_value().sharding))
    return model


_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight")


def _read_adapter(model: nnx.Module, adapter_dir: Path) -> tuple[LoraConfig, dict[tuple[str, str], np.ndarray]]:
    """The adapter's LoraConfig and its tensors {(module, "lora_A" | "lora_B"): array}, each checked against
    `model`: every tensor one this code applies, every module one the model has (without an adapter already),
    both halves present, [R, in] and [out, R] with the model's in and out and the config's R. One sentence
    naming the file and tensor otherwise; nothing of `model` is changed here."""
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for file in (config_file, weights_file):
        if not file.is_file():
            raise CheckpointError(f"{file} does not exist: expected a PEFT adapter directory.")
    config = _peft_lora_config(config_file, read_json(config_file))
    reader = SafetensorsReader(weights_file)
    modules = dict(linear_modules(model))
    layers = sum(1 for name in modules if name.endswith(".self_attn.q_proj"))
    found: dict[str, dict[str, tuple[int, ...]]] = {}
    for key in reader.keys():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:  # DoRA magnitudes, biases, embeddings, modules_to_save: weights this code would drop
            raise CheckpointError(f"{weights_file} holds {key!r}, which is not a LoRA lora_A / lora_B weight.")
        name, kind = match.groups()
        if name not in modules:
            raise CheckpointError(
                f"{weights_file}: {key!r} is for module {name!r}, which the model lacks (it has {layers} layers); "
                "the adapter was made for another base model."
            )
        if modules[name].lora is not None:
            raise CheckpointError(f"{name} already has a LoRA adapter; merge it (lora.merge) before adding another.")
        found.setdefault(name, {})[kind] = reader.shape(key)
    if not found:
        raise CheckpointError(f"{weights_file} holds no '{_PEFT_PREFIX}<module>.lora_A.weight' tensors.")
    for name, shapes in sorted(found.items()):
        out_features, in_features = modules[name].weight.get_value().shape
        expected = {"lora_A": (config.rank, in_features), "lora_B": (out_features, config.rank)}
        for kind, shape in expected.items():
            key = f"{_PEFT_PREFIX}{name}.{kind}.weight"
            if kind not in shapes:
                raise CheckpointError(f"{weights_file} lacks {key!r} (it holds the other half of that adapter).")
            if shapes[kind] != shape:
                raise CheckpointError(
                    f"{weights_file}: {key!r} has shape {shapes[kind]}, the model and r={config.rank} imply {shape}; "
                    "the adapter was made for another base model."
                )
    config = dataclasses.replace(config, targets="|".join(re.escape(name) for name in sorted(found)))
    tensors = {
        (name, kind): np.asarray(reader.get(f"{_PEFT_PREFIX}{name}.{kind}.weight"), dtype=np.float32)
        for name in found
        for kind in ("lora_A", "lora_B")
    }
    return config, tensors


def _peft_lora_config(config_file: Path, peft: object) -> LoraConfig:
    """Rank, alpha and rsLoRA of a PEFT `adapter_config.json`, each checked (a setting this code cannot apply,
    such as DoRA, is refused rather than dropped)."""
    if not isinstance(peft, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object, not {type(peft).__name__}.")
    if peft.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{config_file} describes a {peft.get('peft_type')} adapter; only LORA is supported.")
    if peft.get("use_dora"):
        raise CheckpointError(f"{config_file} describes a DoRA adapter (use_dora); only plain LoRA is supported.")
    rank, alpha = peft.get("r"), peft.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise CheckpointError(f"{config_file}: r must be a positive integer, not {rank!r}.")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise CheckpointError(f"{config_file}: lora_alpha must be a finite number, not {alpha!r}.")
    try:
        return LoraConfig(rank=rank, alpha=float(alpha), rslora=bool(peft.get("use_rslora")))
    except ConfigError as err:  # LoraConfig's own ranges (alpha > 0), blamed on the file
        raise CheckpointError(f"{config_file}: {err}") from None
