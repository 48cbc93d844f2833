"""The train step written per device with `jax.shard_map` (`train.strategy=shard_map`), beside GSPMD's.

The default step (gspmd.py) is one program over global arrays: XLA's partitioner (GSPMD) reads the shardings and
decides where the collectives go. This one writes them by hand, so a researcher can compare what the compiler
chose with the textbook scheme (`step.lower(...).compile().as_text()` of either). It takes the same inputs
with the same shardings (state, frozen weights, batch), gives the same outputs, and shares the loss, the
micro-batch accumulation and the optimizer update with gspmd.py (core.py). Meshes: any data × fsdp, tensor = 1.

The per-device program (N = data·fsdp devices, each holding B/N pairs of the batch, rows split over both axes):

    1. denominators  local pair and token counts -> psum over (data, fsdp)      the whole batch's, exactly
    2. frozen        non-layer weights (embedding, final norm, lm_head): all_gather their fsdp dim, once a step
    3. per micro-batch m (batch.split_micro_batches of the local rows; with B/N a multiple of M, local micro-batch m
       holds exactly this device's pairs of global micro-batch m):
         trained non-layer weights: all_gather           transpose in the backward pass: reduce-scatter
         each decoder layer, inside the scanned body:     all_gather that layer's weights only, then run it
                                                          (backward: gathered again; a trained weight's
                                                          gradient is reduce-scattered, the gather's transpose)
         packed rows: per-segment sums -> the micro-batch's pair slots -> psum_scatter: this device's pairs
    4. gradients     every leaf: psum over each batch axis it is not split over (the reduce-scatter covered
                     the axis it is split over): data always; fsdp for replicated leaves (norms, biases, lora_B)
    5. metrics       psum over (data, fsdp): every term is a sum over pairs / a whole-batch denominator

Outside the shard_map, in the same jit: clipping by global norm and AdamW on the sharded gradients
(apply_update; GSPMD reduces the norm over the shards), exactly as the GSPMD step does.

`check_vma=False`: JAX does not track which values vary over which devices, and inserts no collective of its
own; every one above is written here. (With check_vma=True a replicated weight used on varying rows gets an
implicit psum of its gradient, which step 4 would count twice; the scans' carries would also need `pvary`
annotations: as written, losses.sequence_logps' chunk scan does not trace under it.) Transposes used:
all_gather -> psum_scatter, psum_scatter -> all_gather; psum is never differentiated (the denominators come
from the batch; the metrics are summed after the gradient).

Unstacked layers (`scan_layers=False`) are gathered whole, up front, like the non-layer weights: simpler, but
the full model is then resident on every device during the step. The mesh is never activated inside (the
model's `sharding.constrain` calls are no-ops on per-device arrays). LoRA dropout masks are drawn per device
(the step key folded with the device index), so with dropout > 0 they differ from the GSPMD step's.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jaxpatience.config import ConfigError, TrainConfig
from jaxpatience.model.qwen2 import LayerStack
from jaxpatience.training import losses
from jaxpatience.training.batch import Batch, batch_sharding
from jaxpatience.training.core import (
    TrainState,
    accumulate_gradients,
    apply_update,
    batch_denominators,
    jit_step,
    model_loss,
    step_keys,
    step_model,
)
from jaxpatience.training.optimizer import make_schedule

Array = jax.Array
SpecTable = dict[tuple, PartitionSpec]  # a State's key path ('model', 'norm', 'weight') -> its PartitionSpec
STACK = ("model", "layers", "layer")  # where a LayerStack keeps its stacked weights (qwen2.stack_layers)
GATHERED = "fsdp_gathered"  # checkpoint name of gathered layer weights: recomputed in the backward, never saved


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over (RULES' "batch"), in the batch sharding's order."""
    spec = batch_sharding(mesh).spec[0]
    return (spec,) if isinstance(spec, str) else tuple(spec or ())


def check_mesh(mesh: Mesh) -> None:
    """Raise a one-sentence ConfigError unless every mesh axis of size > 1 splits the batch (tensor = 1)."""
    others = [f"{name}={size}" for name, size in mesh.shape.items() if size > 1 and name not in batch_axes(mesh)]
    if others:
        raise ConfigError(
            f"train.strategy=shard_map supports data and fsdp axes only, not {', '.join(others)}; use "
            "train.strategy=gspmd for tensor parallelism."
        )


def _names(path: tuple) -> tuple:
    """A pytree key path into an nnx.State -> the State's own keys (without a Variable's `.value`)."""
    return tuple(
        getattr(k, "key", getattr(k, "idx", None)) for k in path if not isinstance(k, jax.tree_util.GetAttrKey)
    )


def spec_table(*shardings: nnx.State) -> SpecTable:
    """Key path -> PartitionSpec of every leaf of trees of NamedShardings (step.tree_shardings)."""
    table = {}
    for tree in shardings:
        for path, named in jax.tree_util.tree_flatten_with_path(tree)[0]:
            table[_names(path)] = named.spec
    return table


def _split_by(entry: str | tuple[str, ...] | None, mesh: Mesh) -> tuple[str, ...]:
    """One PartitionSpec entry -> the mesh axes (of size > 1) that split that dim."""
    return tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if mesh.shape[a] > 1)


def gather_leaf(x: Array, spec: PartitionSpec, mesh: Mesh) -> Array:
    """This device's shard -> the whole array: a tiled all_gather along every dim the spec splits."""
    for dim, entry in enumerate(spec):
        axes = _split_by(entry, mesh)
        if axes:
            x = jax.lax.all_gather(x, axes, axis=dim, tiled=True)
    return x


def gather_unstacked(tree: nnx.State, table: SpecTable, mesh: Mesh) -> nnx.State:
    """Gather every leaf of a model state except the LayerStack's (those are gathered per layer in the scan)."""

    def one(path: tuple, x: Array) -> Array:
        names = _names(path)
        return x if names[: len(STACK)] == STACK else gather_leaf(x, table[names], mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def layer_gather(table: SpecTable, mesh: Mesh) -> Callable[[nnx.State], nnx.State]:
    """LayerStack.gather: one layer's weights (a slice of the stack: the leading [L] dim and its spec entry
    gone) -> the whole weights, named GATHERED so that the scanned body recomputes rather than saves them."""

    def one(path: tuple, x: Array) -> Array:
        spec = table.get(STACK + _names(path))
        if spec is None:  # not a weight: LoRA's per-layer dropout keys (lora.set_dropout_key)
            return x
        return jax.ad_checkpoint.checkpoint_name(gather_leaf(x, PartitionSpec(*spec[1:]), mesh), GATHERED)

    return lambda layer_state: jax.tree_util.tree_map_with_path(one, layer_state)


def reduce_gradients(grads: nnx.State, table: SpecTable, mesh: Mesh) -> nnx.State:
    """psum each gradient over every batch axis its parameter is not split over. (Over the axis it is split
    over, the all_gather's transpose has already summed it: a reduce-scatter.)"""

    def one(path: tuple, g: Array) -> Array:
        split = {axis for entry in table[_names(path)] for axis in _split_by(entry, mesh)}
        missing = tuple(a for a in batch_axes(mesh) if a not in split and mesh.shape[a] > 1)
        return jax.lax.psum(g, missing) if missing else g

    return jax.tree_util.tree_map_with_path(one, grads)


def _attach_layer_gather(model: nnx.Module, table: SpecTable, mesh: Mesh) -> None:
    """Gather stacked layers one at a time inside the scan; without remat, recompute only the gathers in the
    backward pass (saving them would keep every layer's whole weights, which FSDP exists to avoid)."""
    layers = model.model.layers
    if isinstance(layers, LayerStack):
        layers.gather = layer_gather(table, mesh)
        if layers.remat is False:
            layers.remat = jax.checkpoint_policies.save_anything_except_these_names(GATHERED)


def make_local_gradients(graphdef: nnx.GraphDef, config: TrainConfig, mesh: Mesh, table: SpecTable) -> Callable:
    """The per-device program: (params, frozen, batch, keys) shards -> (whole-batch gradients as shards of the
    params, whole-batch metrics). See the module docstring for the collectives, steps 1 to 5."""
    axes = batch_axes(mesh)

    def micro_loss(params: nnx.State, frozen: nnx.State, batch: Batch, norm: losses.Denominators, key):
        params = gather_unstacked(params, table, mesh)  # differentiated: its transpose reduce-scatters
        model = step_model(graphdef, params, frozen, config)
        _attach_layer_gather(model, table, mesh)
        key = jax.random.fold_in(key, jax.lax.axis_index(axes))  # LoRA dropout: other rows, other masks
        return model_loss(model, batch, norm, key, config, axis_name=axes)

    def local_gradients(params: nnx.State, frozen: nnx.State, batch: Batch, keys: Array):
        norm = batch_denominators(batch, axis_name=axes)  # 1. psum'ed counts
        frozen = gather_unstacked(frozen, table, mesh)  # 2. not differentiated: gathered once for all micro-batches
        # 3. local micro-batch m = this device's pairs of global micro-batch m (validate_batch: B/N = k·M)
        grads, metrics = accumulate_gradients(micro_loss, params, frozen, batch, norm, keys, config.micro_batches)
        return reduce_gradients(grads, table, mesh), jax.lax.psum(metrics, axes)  # 4., 5.

    return local_gradients


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    config: TrainConfig,
    mesh: Mesh,
    state_shardings: TrainState,
    frozen_shardings: nnx.State,
):
    """jit((state, frozen, batch) -> (state, metrics)) like gspmd.make_train_step's, the gradients computed by
    the hand-written per-device program (`make_local_gradients`) under `jax.shard_map`."""
    check_mesh(mesh)
    table = spec_table(state_shardings.params, frozen_shardings)
    specs = lambda shardings: jax.tree.map(lambda named: named.spec, shardings)
    replicated = PartitionSpec()
    local_gradients = jax.shard_map(
        make_local_gradients(graphdef, config, mesh, table),
        mesh=mesh,
        in_specs=(specs(state_shardings.params), specs(frozen_shardings), batch_sharding(mesh).spec, replicated),
        out_specs=(specs(state_shardings.params), replicated),
        check_vma=False,  # every collective is written out (module docstring)
    )
    schedule = make_schedule(config.optimizer, config.max_steps)

    def step(state: TrainState, frozen: nnx.State, batch: Batch):
        grads, metrics = local_gradients(state.params, frozen, batch, step_keys(config, state.step))
        return apply_update(optimizer, schedule, state, grads, metrics)

    return jit_step(step, mesh, state_shardings, frozen_shardings)
