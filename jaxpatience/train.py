"""The train step: one `jax.jit` over (TrainState, frozen weights, batch) with explicit shardings and donation.

The model is split once (`nnx.split`) into a graphdef, the trained parameters and the frozen rest:
    LoRA on:   trained = the LoRAParam adapters; frozen = every base weight (may be bf16; never updated)
    LoRA off:  trained = every Param (full-parameter training); frozen = nothing
Only the trained parameters are differentiated and live in the optimizer. Inside the jitted function the
graphdef is merged with the state at trace time only; each step runs the compiled program, no graph work.

Reference log-probs, in order of preference: `ref_logps` [B, 2] carried in the batch (precomputed once with
`make_logps_fn`); else, with LoRA, the same base weights with adapters off (lora.adapters_off) inside the same
step under stop_gradient, no second copy of the weights; a DPO loss in full-parameter mode must carry them.

Training scans one decoder layer over stacked weights (model.LayerStack, `scan_layers`, the default): compile
time does not grow with the layer count and FSDP gathers one layer's weights at a time. `remat` rematerialises
the scanned body: "full" saves each layer's input, "dots" every matmul output, "lora" only the base
projections' outputs (named model.BASE_OUTPUT) and recomputes the rest, the adapters' outputs included.

Batches are dicts of [B, 2, T] int arrays (index 1: 0 = chosen, 1 = rejected): `input_ids`, `attention_mask`
(1 = real token) and `loss_mask` (1 = response token), plus optionally `ref_logps` [B, 2] float32 (summed
log-probs of the response tokens under the reference). The batch is split into M micro-batches whose
gradients are summed by `lax.scan`; every loss term is normalised by whole-batch denominators
(losses.Denominators), so M micro-batches give the same update as one big batch. `place_batch` is the one way
a batch reaches the devices, on one process or many (each passes its rows; they become one global array).
A packed batch (data/packing.py) holds the same pairs as sequences in [R, L] rows with `segment_ids`,
`positions`, `segment_pairs` [R, S] and `pair_mask` [B]; `pair_logps` sums segments into pairs, so every loss,
metric and denominator is the padded batch's; micro-batch m takes rows and pairs m, m + M, ... of both.

`strategy` (TrainConfig): "gspmd", the default, jits one program over global arrays and lets XLA's partitioner
place the collectives; "shard_map" writes the per-device program and its collectives by hand (shardmap.py).
Both share `model_loss`, `accumulate_gradients` and `apply_update`.

Shape letters: B pairs, M micro-batches, T tokens, D model dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpatience import lora, losses, sharding
from jaxpatience.config import ConfigError, MeshConfig, OptimizerConfig, TrainConfig
from jaxpatience.data import packing
from jaxpatience.model import BASE_OUTPUT, LayerStack, set_attention, stack_layers, unstack_layers

Array = jax.Array
Batch = dict[str, Any]
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")
PACKED_KEYS = packing.PACKED_KEYS  # BATCH_KEYS + segment_ids, positions, segment_pairs, pair_mask (data/packing.py)


@struct.dataclass
class TrainState:
    """What changes from step to step (and what a checkpoint must hold, with the config)."""

    step: Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # the trained parameters (LoRA adapters, or every parameter)
    opt_state: optax.OptState


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


# ---------------------------------------------------------------------------------------------------
# Optimizer.


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over warmup_steps, then cosine / linear decay to min_lr_ratio, or constant."""
    peak, floor = config.learning_rate, config.learning_rate * config.min_lr_ratio
    decay_steps = max(total_steps - config.warmup_steps, 1)
    if config.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    elif config.decay == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if config.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def _is_matrix(path: tuple, leaf: Array) -> bool:
    """Weight decay goes to matrices only; a stacked layer's leading axis (model.LayerStack) does not count."""
    keys = [getattr(k, "key", None) for k in path]
    stacked = any(a == "layers" and b == "layer" for a, b in zip(keys, keys[1:], strict=False))
    return leaf.ndim - stacked >= 2


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on the schedule, after global-norm clipping; weight decay only on matrices (ndim >= 2)."""
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(_is_matrix, params)
    adamw = optax.adamw(make_schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=decay_mask)  # fmt: skip
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


# ---------------------------------------------------------------------------------------------------
# Shardings.


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Every batch array is split along its first (pair) dim over the data-like mesh axes."""
    return sharding.named_sharding(mesh, ("batch",))


def validate_batch(batch: Batch, config: TrainConfig, mesh: Mesh) -> None:
    """Raise a one-sentence ValueError for a global batch the step cannot take.

    `batch` maps names to anything with a `.shape` (arrays, or `jax.ShapeDtypeStruct`s of the global arrays).
    """
    packed = "segment_ids" in batch
    keys = PACKED_KEYS if packed else BATCH_KEYS
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"the batch lacks {missing[0]!r}; it needs {', '.join(keys)} (optionally ref_logps).")
    shape = tuple(batch["input_ids"].shape)
    if packed and len(shape) != 2:
        raise ValueError(f"input_ids of a packed batch has shape {shape}; expected [R, L] (rows, tokens).")
    if not packed and (len(shape) != 3 or shape[1] != 2):
        raise ValueError(f"input_ids has shape {shape}; expected [B, 2, T] (chosen, rejected).")
    for key in keys[1:5]:
        if tuple(batch[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(batch[key].shape)}; expected {shape} like input_ids.")
    pairs = batch["pair_mask"].shape[0] if packed else shape[0]
    if packed and (len(batch["segment_pairs"].shape) != 2 or batch["segment_pairs"].shape[0] != shape[0]):
        raise ValueError(f"segment_pairs has shape {tuple(batch['segment_pairs'].shape)}; expected [{shape[0]}, S].")
    if "ref_logps" in batch and tuple(batch["ref_logps"].shape) != (pairs, 2):
        raise ValueError(f"ref_logps has shape {tuple(batch['ref_logps'].shape)}; expected {(pairs, 2)}.")
    shards = sharding.batch_shards(mesh)
    for count, what in ((shape[0], "rows" if packed else "pairs"), (pairs, "pairs")):
        if count % config.micro_batches or count // config.micro_batches % shards:
            raise ValueError(
                f"a batch of {count} {what} cannot be cut into {config.micro_batches} micro-batches that split "
                f"evenly over {shards} data-parallel devices."
            )


def place_batch(batch: Batch, mesh: Mesh, config: TrainConfig) -> Batch:
    """Validate a batch and place it on the mesh as global arrays split along pairs (`batch_sharding`).

    The one way a batch reaches the devices (Trainer.step, make_logps_fn, run.py). Each process passes its own
    rows, as PairLoader.make_batch gives them: [B / P, ...] on process i are global rows [i·B/P, (i+1)·B/P) of
    the [B, ...] batch (P = 1: the whole batch; `make_array_from_process_local_data` is then a `device_put`).
    Arrays already placed with the batch sharding (global [B, ...]) pass through.
    """
    target, processes = batch_sharding(mesh), jax.process_count()
    placed = {k: v for k, v in batch.items() if isinstance(v, jax.Array) and v.sharding == target}
    local = {k: np.asarray(v) for k, v in batch.items() if k not in placed}
    # The global arrays: the P processes' rows one after the other.
    shapes = {k: jax.ShapeDtypeStruct((v.shape[0] * processes, *v.shape[1:]) if v.ndim else v.shape, v.dtype)
              for k, v in local.items()}  # fmt: skip
    validate_batch(shapes | placed, config, mesh)
    if "segment_pairs" in local:
        _check_packed_layout(local["segment_pairs"], config.micro_batches)
    if processes > 1 and local:
        global_rows = (shapes | placed)["input_ids"].shape[0]
        # e.g. every process passing the whole batch (train.py before 0.2); packed rows are not pairs
        if global_rows != config.batch_size and "segment_ids" not in batch:
            raise ValueError(
                f"{processes} processes' rows make a batch of {global_rows} pairs, not batch_size={config.batch_size}: "
                "each process passes only its own rows (PairLoader.make_batch gives them)."
            )
        _check_process_rows(target, (shapes | placed)["input_ids"].shape)
    place = lambda k: jax.make_array_from_process_local_data(target, local[k], shapes[k].shape)
    return {k: placed[k] if k in placed else place(k) for k in batch}


def packed_row_multiple(micro_batches: int, mesh: Mesh) -> int:
    """What a packed batch's row count must be a multiple of: each micro-batch's rows split evenly over the
    data-parallel devices, and all rows over the processes (PairLoader's `row_multiple`)."""
    return math.lcm(micro_batches * sharding.batch_shards(mesh), jax.process_count())


def _check_packed_layout(named: np.ndarray, micro_batches: int) -> None:
    """Raise unless every segment of this process's rows names a pair of the row's own micro-batch (row k·M + m
    and pair b belong to micro-batch m = k mod M, b mod M): a packed batch is laid out for one micro-batch count."""
    rows = (jax.process_index() * named.shape[0] + np.arange(named.shape[0]))[:, None]
    if np.any((named >= 0) & (named // 2 % micro_batches != rows % micro_batches)):
        raise ValueError(
            f"this packed batch was laid out for another number of micro-batches than {micro_batches}; build it "
            f"with PairLoader(..., micro_batches={micro_batches})."
        )


def _check_process_rows(target: NamedSharding, global_shape: tuple[int, ...]) -> None:
    """Raise unless this process's devices hold exactly global rows [i·B/P, (i+1)·B/P), the rows the loader gives
    it (`make_array_from_process_local_data` fills the rows the devices hold in order, whichever they are)."""
    rows_per_process = global_shape[0] // jax.process_count()
    first = jax.process_index() * rows_per_process
    held = set()
    for index in target.addressable_devices_indices_map(global_shape).values():
        held.update(range(*index[0].indices(global_shape[0])))
    if held != set(range(first, first + rows_per_process)):
        raise ValueError(
            f"process {jax.process_index()}'s devices hold {len(held)} batch rows (from {min(held)}), not rows "
            f"[{first}, {first + rows_per_process}) that its loader reads; use a mesh whose data axes follow the "
            "processes."
        )


# ---------------------------------------------------------------------------------------------------
# Forward pieces used inside the jitted functions.


class _RematLayer(nnx.Module):
    """Wraps a DecoderLayer (inside a trace only) so its activations are recomputed in the backward pass."""

    def __init__(self, layer: nnx.Module, policy: Callable | None):
        self.layer, self.policy = layer, policy

    def __call__(self, x, positions, mask, kv, cache_index):
        graphdef, state = nnx.split(self.layer)

        def run(state: nnx.State, x: Array) -> Array:
            return nnx.merge(graphdef, state)(x, positions, mask, None, cache_index)[0]

        return jax.checkpoint(run, policy=self.policy)(state, x), kv


REMAT_POLICIES = {
    "full": None,  # save each layer's input only
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # every matmul output, adapters' included
    "lora": jax.checkpoint_policies.save_only_these_names(BASE_OUTPUT),  # the base projections' outputs only
}


def resolve_attention(choice: str, compute_dtype: str) -> str:
    """ "auto" -> cuDNN flash attention on an NVIDIA GPU in bf16/fp16, else XLA's; other choices as they are."""
    if choice != "auto":
        return choice
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(compute_dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def apply_remat(model: nnx.Module, remat: str) -> None:
    """Wrap each decoder layer of a model *merged inside a trace* (never call this on a long-lived model); a
    LayerStack rematerialises its scanned body instead."""
    if remat == "none":
        return
    layers = model.model.layers
    if isinstance(layers, LayerStack):
        layers.remat = REMAT_POLICIES[remat]
        return
    for i in range(len(layers)):
        layers[i] = _RematLayer(layers[i], REMAT_POLICIES[remat])


def pair_logps(model: nnx.Module, batch: Batch, chunk_size: int, micro_batches: int = 1,
               axis_name: str | tuple[str, ...] | None = None) -> tuple[Array, Array]:  # fmt: skip
    """Summed response log-probs [B, R] and counted tokens [B, R] of each pair's R = 2 (chosen, rejected)
    sequences in one forward; R = 1 when only the chosen rows are given (SFT). A packed batch (data/packing.py)
    gives [B, 2] in the order of its pair_mask, 0 for positions without a pair; when it is micro-batch m of M
    (`micro_batches`), its segments name the whole batch's pair b = j·M + m, which is its pair j.

    `axis_name`: inside `jax.shard_map`, the mesh axes the batch is split over; `batch` holds this device's
    rows and pairs. A packed row's segments may name pairs of any device: each device sums its segments into
    the slots of all the micro-batch's pairs, and a reduce-scatter leaves each device the sums of its own."""
    if "segment_ids" in batch:
        ids, attention, response, segments = (batch[k] for k in (*BATCH_KEYS, "segment_ids"))
        hidden, _ = model.hidden_states(ids, attention, positions=batch["positions"], segment_ids=segments)
        count = batch["segment_pairs"].shape[1]  # S segments per row
        sums, counts = losses.sequence_logps(hidden, model.logits, ids, response, attention, chunk_size,
                                             segment_ids=segments, num_segments=count)  # fmt: skip
        # Segments -> pairs: 2·b + side (-1: none) -> 2·j + side; a sum over rows, which may be on any device.
        named = batch["segment_pairs"]
        slot = jnp.where(named >= 0, named // 2 // micro_batches * 2 + named % 2, -1)
        shards = 1 if axis_name is None else jax.lax.axis_size(axis_name)
        to_pairs = jax.nn.one_hot(slot, 2 * batch["pair_mask"].shape[0] * shards, dtype=jnp.float32)
        per_pair = lambda x: jnp.einsum("rs,rsq->q", x, to_pairs).reshape(-1, 2)  # [P, 2]
        if axis_name is not None:  # [shards·P, 2] partial sums -> this device's P pairs, summed over devices
            per_pair = lambda x, f=per_pair: jax.lax.psum_scatter(f(x), axis_name, scatter_dimension=0, tiled=True)
        return per_pair(sums), per_pair(counts)
    pairs, rows, length = batch["input_ids"].shape
    ids, attention, response = (batch[k].reshape(pairs * rows, length) for k in BATCH_KEYS)  # [B*R, T]
    hidden, _ = model.hidden_states(ids, attention)  # [B*R, T, D]
    sums, counts = losses.sequence_logps(hidden, model.logits, ids, response, attention, chunk_size)
    return sums.reshape(pairs, rows), counts.reshape(pairs, rows)


def batch_denominators(batch: Batch, axis_name: str | tuple[str, ...] | None = None) -> losses.Denominators:
    """The whole batch's loss denominators (pairs with a chosen response, chosen tokens), either layout; inside
    `jax.shard_map`, from this device's rows summed over `axis_name` (losses.denominators)."""
    _, weights = losses.shift_targets(batch["input_ids"], batch["loss_mask"], batch["attention_mask"])
    if "segment_ids" not in batch:
        return losses.denominators(jnp.sum(weights, axis=-1), axis_name)  # counts [B, 2]
    segment_pairs = batch["segment_pairs"]  # [R, S]; a pair's chosen sequence is exactly one segment
    counts = jnp.sum(losses.segment_weights(weights, batch["segment_ids"], segment_pairs.shape[1]), axis=1)  # [R, S]
    chosen = jnp.where((segment_pairs >= 0) & (segment_pairs % 2 == 0), counts, 0.0)
    flat = chosen.reshape(-1)
    return losses.denominators(jnp.stack([flat, jnp.zeros_like(flat)], axis=-1), axis_name)


def device_batch(host: Batch) -> Batch:
    """The arrays of a loader batch that the step takes (the loader's pair_index stays on the host)."""
    return {k: host[k] for k in (PACKED_KEYS if "segment_ids" in host else BATCH_KEYS) + ("ref_logps",) if k in host}


def _micro_batches(batch: Batch, count: int) -> Batch:
    """[B, ...] -> [M, B/M, ...]; micro-batch m takes rows m, m + M, ... so each stays spread over devices."""

    def split(x: Array) -> Array:
        x = jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
        return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return {k: split(v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------
# Building the state and the step.


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
    state = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), out_shardings=state_sh)(
        params
    )
    step_fn = make_train_step(graphdef, optimizer, config, mesh, state_sh, frozen_sh)
    schedule = make_schedule(config.optimizer, config.max_steps)
    return Trainer(graphdef, state, frozen, step_fn, mesh, config, schedule, state_sh, frozen_sh)


def lower_abstract_step(model_config, config: TrainConfig, mesh: Mesh, batch: Batch) -> jax.stages.Lowered:
    """The train step lowered from shapes alone: no weight is ever materialised (a 72B plans on a laptop).

    `batch` maps names to arrays or `jax.ShapeDtypeStruct`s of the global batch. `.compile()` the result for
    compile time, `memory_analysis()` and `cost_analysis()` (the sharding lab; bench_train.py --aot).
    """
    from jaxpatience.model import Qwen2ForCausalLM

    def build() -> nnx.Module:
        model = Qwen2ForCausalLM(model_config, rngs=nnx.Rngs(config.seed))
        prepare_model(model, config)
        return model

    config = dataclasses.replace(config, attention=resolve_attention(config.attention, model_config.compute_dtype))
    graphdef, params, frozen = split_model(nnx.eval_shape(build))
    params = jax.eval_shape(_master, params)
    optimizer = make_optimizer(config.optimizer, config.max_steps)
    state_sh, frozen_sh = _state_shardings(mesh, params, optimizer), tree_shardings(mesh, frozen)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(optimizer.init, params))
    step_fn = make_train_step(graphdef, optimizer, config, mesh, state_sh, frozen_sh)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    return step_fn.lower(state, frozen, shapes)


def step_model(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, config: TrainConfig) -> nnx.Module:
    """The model merged *inside a trace* from its state, with the step's attention and remat."""
    model = nnx.merge(graphdef, params, frozen)
    set_attention(model, config.attention)
    apply_remat(model, config.remat)
    return model


def model_loss(model: nnx.Module, batch: Batch, norm: losses.Denominators, key: Array, config: TrainConfig,
               axis_name: str | tuple[str, ...] | None = None) -> tuple[Array, dict[str, Array]]:  # fmt: skip
    """(loss, metrics) of one micro-batch, normalised by the whole batch's `norm`; `key` drives LoRA dropout.

    `axis_name`: inside `jax.shard_map` (shardmap.py), the mesh axes the batch is split over; `batch` is then
    this device's rows (see `pair_logps`).
    """
    loss_config, micro, chunk = config.loss, config.micro_batches, config.logits_chunk_size
    ref_logps = batch.get("ref_logps")
    if ref_logps is None and loss_config.dpo_weight:
        if not lora.has_adapters(model):
            raise ValueError("full-parameter DPO needs ref_logps in the batch (see train.make_logps_fn).")
        with lora.adapters_off(model):  # the reference: base weights, adapters off, no gradient
            ref_logps, _ = jax.lax.stop_gradient(pair_logps(model, batch, chunk, micro, axis_name))
    lora.set_dropout_key(model, key)
    if ref_logps is None and not loss_config.dpo_weight:  # SFT: no term reads the rejected row
        if "segment_ids" in batch:  # packed rows: their segments (run.py packs only the chosen ones), read the chosen
            both = pair_logps(model, batch, chunk, micro, axis_name)
            chosen_logps, chosen_counts = (x[:, :1] for x in both)
        else:  # skip the rejected row's forward
            chosen = {k: batch[k][:, :1] for k in BATCH_KEYS}  # [B, 1, T]
            chosen_logps, chosen_counts = pair_logps(model, chosen, chunk)  # [B, 1] each
        pad = lambda x: jnp.pad(x, ((0, 0), (0, 1)))  # [B, 1] -> [B, 2]
        loss, metrics = losses.preference_loss(pad(chosen_logps), pad(chosen_counts), None, loss_config, norm)
        return loss, {k: v for k, v in metrics.items() if k != "logps/rejected"}  # not computed
    policy_logps, counts = pair_logps(model, batch, chunk, micro, axis_name)
    return losses.preference_loss(policy_logps, counts, ref_logps, loss_config, norm)


def step_keys(config: TrainConfig, step: Array) -> Array:
    """One LoRA-dropout key per micro-batch [M], new every optimizer step."""
    return jax.random.split(jax.random.fold_in(jax.random.key(config.seed), step), config.micro_batches)


def accumulate_gradients(loss_fn: Callable, params: nnx.State, frozen: nnx.State, batch: Batch,
                         norm: losses.Denominators, keys: Array, micro_batches: int):  # fmt: skip
    """(gradients, metrics) of loss_fn(params, frozen, micro_batch, norm, key) summed over the M micro-batches
    with `lax.scan`, in float32, then cast to the parameters' dtypes. Every loss and metric term is normalised
    by whole-batch denominators, so the sums are the whole batch's."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(grads: nnx.State, xs: tuple[Batch, Array]):
        (_, metrics), micro_grads = grad_fn(params, frozen, xs[0], norm, xs[1])
        return jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads), metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)  # accumulate in float32
    grads, metrics = jax.lax.scan(accumulate, zeros, (_micro_batches(batch, micro_batches), keys))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)  # the optimizer sees the params' dtypes
    return grads, {name: jnp.sum(values) for name, values in metrics.items()}  # terms add up (see losses.py)


def apply_update(optimizer: optax.GradientTransformation, schedule: optax.Schedule, state: TrainState,
                 grads: nnx.State, metrics: dict[str, Array]) -> tuple[TrainState, dict[str, Array]]:  # fmt: skip
    """Clip and AdamW on the whole batch's gradients (sharded like the params; XLA reduces the global norm)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = metrics | {"grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
    return TrainState(state.step + 1, params, opt_state), metrics


def jit_step(step: Callable, mesh: Mesh, state_shardings: TrainState, frozen_shardings: nnx.State):
    """jax.jit of step(state, frozen, batch) with the trainer's shardings; the state is donated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))  # fmt: skip


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, config: TrainConfig,
                    mesh: Mesh, state_shardings: TrainState, frozen_shardings: nnx.State):  # fmt: skip
    """jit((state, frozen, batch) -> (state, metrics)), state donated; metrics are replicated scalars.

    config.strategy "gspmd": one program over global arrays; XLA's partitioner (GSPMD) derives the collectives
    from the shardings and the activation constraints. "shard_map": a per-device program with the collectives
    written out (shardmap.py); both share the loss, the accumulation and the optimizer update.
    """
    if config.strategy == "shard_map":
        from jaxpatience import shardmap

        return shardmap.make_train_step(graphdef, optimizer, config, mesh, state_shardings, frozen_shardings)
    schedule = make_schedule(config.optimizer, config.max_steps)

    def micro_loss(params: nnx.State, frozen: nnx.State, batch: Batch, norm: losses.Denominators, key: Array):
        return model_loss(step_model(graphdef, params, frozen, config), batch, norm, key, config)

    def step(state: TrainState, frozen: nnx.State, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        with sharding.activate(mesh):  # constraints inside the model take effect while tracing
            norm = batch_denominators(batch)  # whole-batch normalisers
            keys = step_keys(config, state.step)
            grads, metrics = accumulate_gradients(micro_loss, state.params, frozen, batch, norm, keys,
                                                  config.micro_batches)  # fmt: skip
        return apply_update(optimizer, schedule, state, grads, metrics)

    return jit_step(step, mesh, state_shardings, frozen_shardings)


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
            parts = jax.lax.map(lambda b: one_micro_batch(params, frozen, b), _micro_batches(batch, micro))
            # parts[m, j] is pair j * M + m of the batch (see _micro_batches): [M, B/M, 2] -> [B, 2]
            return jnp.swapaxes(parts, 0, 1).reshape(-1, 2)

    jitted = jax.jit(logps, out_shardings=batch_sharding(mesh))
    return lambda batch: jitted(trainer.state.params, trainer.frozen, place_batch(batch, mesh, trainer.config))
