"""The trainer: the model split once, its state placed on the mesh, and the jitted step of the chosen strategy.

    trainer = create_trainer(model, config.train, mesh)      # LoRA attached, layers stacked, state placed
    metrics = trainer.step(host_batch)                       # one optimizer step (place_batch inside)
    model = trainer.model()                                  # the trained model, for eval or export

The model is split once (`nnx.split`) into a graphdef, the trained parameters and the frozen rest:
    LoRA on:   trained = the LoRAParam adapters; frozen = every base weight (may be bf16; never updated)
    LoRA off:  trained = every Param (full-parameter training); frozen = nothing
Only the trained parameters are differentiated and live in the optimizer. Inside the jitted function the
graphdef is merged with the state at trace time only; each step runs the compiled program, no graph work.

Training scans one decoder layer over stacked weights (qwen2.LayerStack, `scan_layers`, the default): compile
time does not grow with the layer count and FSDP gathers one layer's weights at a time.

`strategy` (TrainConfig): "gspmd", the default, jits one program over global arrays and lets XLA's partitioner
place the collectives (gspmd.py); "shard_map" writes the per-device program and its collectives by hand
(shard_map.py). Both are built from core.py's `model_loss`, `accumulate_gradients` and `apply_update`; batches
reach either through batch.py's `place_batch`.

Shape letters: B pairs, M micro-batches, T tokens, D model dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpatience import sharding
from jaxpatience.config import ConfigError, MeshConfig, TrainConfig
from jaxpatience.model import lora
from jaxpatience.model.qwen2 import Qwen2ForCausalLM, set_attention, stack_layers, unstack_layers
from jaxpatience.training import gspmd, shard_map
from jaxpatience.training.batch import Batch, batch_sharding, place_batch, split_micro_batches
from jaxpatience.training.core import Array, TrainState, pair_logps, resolve_attention
from jaxpatience.training.optimizer import make_optimizer, make_schedule


@dataclasses.dataclass
class Trainer:
    """The pieces a training loop needs, built once by `create_trainer`."""

    graphdef: nnx.GraphDef
    state: TrainState
    frozen: nnx.State  # not trained: the base weights under LoRA; empty in full-parameter mode
    step_fn: Callable[[TrainState, nnx.State, Batch], tuple[TrainState, dict[str, Array]]]
    mesh: Mesh
    config: TrainConfig
    schedule: optax.Schedule
    state_shardings: TrainState  # NamedShardings of `state` (for checkpoint restore: jax.device_put(tree, these))
    frozen_shardings: nnx.State

    def step(self, batch: Batch) -> dict[str, Array]:
        """One optimizer step on this process's rows of a batch (see `place_batch`); returns the metrics (device
        scalars)."""
        self.state, metrics = self.step_fn(self.state, self.frozen, place_batch(batch, self.mesh, self.config))
        return metrics

    def model(self) -> nnx.Module:
        """The current model as an NNX module, for evaluation, export or `lora.merge` (IRPO's next iteration).

        It has its own Variables, so changing it leaves the trainer intact; with stacked layers (scan_layers) its
        per-layer weights are slices, i.e. a copy of the layers' weights, else it shares the arrays. The next
        `step` donates the trained arrays: call `model()` again after stepping.
        """
        fresh = lambda tree: jax.tree.map(lambda x: x, tree)  # new Variable objects around the same arrays
        model = nnx.merge(self.graphdef, fresh(self.state.params), fresh(self.frozen))
        unstack_layers(model)  # per-layer weights with HF names (a copy when the trainer scans stacked layers)
        return model


def make_mesh(config: MeshConfig) -> Mesh:
    try:
        return sharding.make_mesh(config.data, config.fsdp, config.tensor)
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
    """NamedSharding for every leaf: from `axes` metadata for Variables (params, Adam moments), else replicated."""

    def one(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nnx.Variable) and leaf.get_metadata().get("axes") is not None:
            return sharding.named_sharding(mesh, leaf.get_metadata()["axes"], leaf.get_value().shape)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trained, frozen): the adapters if the model has any, else every Param."""
    trained_type = lora.LoRAParam if lora.has_adapters(model) else nnx.Param
    return nnx.split(model, trained_type, ...)


def prepare_model(model: nnx.Module, config: TrainConfig) -> TrainConfig:
    """Attach LoRA (if configured) and stack the layers (if scanned), in place; returns the config with its
    attention implementation resolved. Works on real and on abstract (`nnx.eval_shape`) models."""
    config = dataclasses.replace(config, attention=resolve_attention(config.attention, model.config.compute_dtype))
    if config.lora is not None and not lora.has_adapters(model):
        lora.apply_lora(model, config.lora, seed=config.seed)
    if config.scan_layers:
        try:
            stack_layers(model)  # one scanned layer: compile time and FSDP's gathered weights independent of L
        except ValueError as err:  # layers of different structure (LoRA on some layers only) cannot be stacked
            warnings.warn(f"{err} Training with the layers unrolled.", stacklevel=2)
            config = dataclasses.replace(config, scan_layers=False)
    return config


def _master(params: nnx.State) -> nnx.State:
    """Trained weights are float32 master copies: AdamW steps on bf16 weights mostly round away (a 5e-6 update of
    a weight near 0.02 is below bf16's resolution). Linear casts to the compute dtype when it uses them."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _state_shardings(mesh: Mesh, params: nnx.State, optimizer: optax.GradientTransformation) -> TrainState:
    opt_sh = tree_shardings(mesh, jax.eval_shape(optimizer.init, params))
    return TrainState(step=NamedSharding(mesh, PartitionSpec()), params=tree_shardings(mesh, params), opt_state=opt_sh)


def create_trainer(model: nnx.Module, config: TrainConfig, mesh: Mesh | None = None) -> Trainer:
    """Attach LoRA (if configured), split the model once, place everything on the mesh, build the step.

    The model is changed in place (adapters attached) and should not be used afterwards: `Trainer.model()`
    gives the trained one.
    """
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    config = prepare_model(model, config)
    graphdef, params, frozen = split_model(model)
    params = _master(params)
    optimizer = make_optimizer(config.optimizer, config.max_steps)
    state_sh, frozen_sh = _state_shardings(mesh, params, optimizer), tree_shardings(mesh, frozen)
    params, frozen = jax.device_put(params, state_sh.params), jax.device_put(frozen, frozen_sh)
    initial_state = lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p))
    state = jax.jit(initial_state, out_shardings=state_sh)(params)
    step_fn = make_train_step(graphdef, optimizer, config, mesh, state_sh, frozen_sh)
    schedule = make_schedule(config.optimizer, config.max_steps)
    return Trainer(graphdef, state, frozen, step_fn, mesh, config, schedule, state_sh, frozen_sh)


def lower_abstract_step(model_config, config: TrainConfig, mesh: Mesh, batch: Batch) -> jax.stages.Lowered:
    """The train step lowered from shapes alone: no weight is ever materialised (a 72B plans on a laptop).

    `batch` maps names to arrays or `jax.ShapeDtypeStruct`s of the global batch. `.compile()` the result for
    compile time, `memory_analysis()` and `cost_analysis()` (the sharding lab; scripts/bench_train.py --aot).
    """

    def build() -> nnx.Module:
        model = Qwen2ForCausalLM(model_config, rngs=nnx.Rngs(config.seed))
        prepare_model(model, config)
        return model

    platform = mesh.devices.flat[0].platform  # abstract GPUs or TPUs: the step is the one they would run
    attention = resolve_attention(config.attention, model_config.compute_dtype, platform)
    config = dataclasses.replace(config, attention=attention)
    graphdef, params, frozen = split_model(nnx.eval_shape(build))
    params = jax.eval_shape(_master, params)
    optimizer = make_optimizer(config.optimizer, config.max_steps)
    state_sh, frozen_sh = _state_shardings(mesh, params, optimizer), tree_shardings(mesh, frozen)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(optimizer.init, params))
    step_fn = make_train_step(graphdef, optimizer, config, mesh, state_sh, frozen_sh)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    return step_fn.lower(state, frozen, shapes)


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    config: TrainConfig,
    mesh: Mesh,
    state_shardings: TrainState,
    frozen_shardings: nnx.State,
):
    """jit((state, frozen, batch) -> (state, metrics)) by `config.strategy`: "gspmd", one program over global
    arrays whose collectives XLA's partitioner derives (gspmd.py); "shard_map", a per-device program with the
    collectives written out (shard_map.py). Both share core.py's loss, accumulation and optimizer update."""
    build = shard_map.make_train_step if config.strategy == "shard_map" else gspmd.make_train_step
    return build(graphdef, optimizer, config, mesh, state_shardings, frozen_shardings)


def make_logps_fn(trainer: Trainer, *, adapters: bool = False) -> Callable[[Batch], Array]:
    """batch -> summed response log-probs [B, 2] float32 of the current model (adapters off by default).

    Use it once before training to precompute `ref_logps` (required for full-parameter DPO).
    """
    graphdef, mesh, chunk = trainer.graphdef, trainer.mesh, trainer.config.logits_chunk_size
    micro = trainer.config.micro_batches

    def one_micro_batch(params: nnx.State, frozen: nnx.State, batch: Batch) -> Array:
        model = nnx.merge(graphdef, params, frozen)
        set_attention(model, trainer.config.attention)
        if adapters:
            return pair_logps(model, batch, chunk, micro)[0]
        with lora.adapters_off(model):
            return pair_logps(model, batch, chunk, micro)[0]

    def logps(params: nnx.State, frozen: nnx.State, batch: Batch) -> Array:
        with sharding.activate(mesh):  # micro-batches one after the other, as in the step: the same peak memory
            parts = jax.lax.map(lambda b: one_micro_batch(params, frozen, b), split_micro_batches(batch, micro))
            # parts[m, j] is pair j * M + m of the batch (see _micro_batches): [M, B/M, 2] -> [B, 2]
            return jnp.swapaxes(parts, 0, 1).reshape(-1, 2)

    jitted = jax.jit(logps, out_shardings=batch_sharding(mesh))
    return lambda batch: jitted(trainer.state.params, trainer.frozen, place_batch(batch, mesh, trainer.config))
