"""The pieces every train step is made of, whichever strategy runs it (gspmd.py, shard_map.py).

Inside a jitted step the model is merged from its state (`step_model`: attention implementation and remat set),
`model_loss` computes one micro-batch's loss normalised by the whole batch's denominators (`batch_denominators`),
`accumulate_gradients` sums M micro-batches' gradients with `lax.scan`, and `apply_update` clips and steps AdamW.
Every loss term is normalised by whole-batch denominators (losses.Denominators), so M micro-batches give the same
update as one big batch.

Reference log-probs, in order of preference: `ref_logps` [B, 2] carried in the batch (precomputed once with
step.make_logps_fn); else, with LoRA, the same base weights with adapters off (lora.adapters_off) inside the same
step under stop_gradient, no second copy of the weights; a DPO loss in full-parameter mode must carry them.

`remat` rematerialises each layer (or the scanned body of a qwen2.LayerStack): "full" saves each layer's input,
"dots" every matmul output, "lora" only the base projections' outputs (named qwen2.BASE_OUTPUT) and recomputes
the rest, the adapters' outputs included.

Packed rows: `pair_logps` sums segments into pairs, so every loss, metric and denominator is the padded batch's;
micro-batch m takes rows and pairs m, m + M, ... of both.

Shape letters: B pairs, R rows, S segments, M micro-batches, T tokens, D model dim, V vocab.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpatience.config import TrainConfig
from jaxpatience.model import lora
from jaxpatience.model.qwen2 import BASE_OUTPUT, LayerStack, set_attention
from jaxpatience.training import losses
from jaxpatience.training.batch import BATCH_KEYS, Batch, batch_sharding, split_micro_batches

Array = jax.Array


@struct.dataclass
class TrainState:
    """What changes from step to step (and what a checkpoint must hold, with the config)."""

    step: Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # the trained parameters (LoRA adapters, or every parameter)
    opt_state: optax.OptState


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


def resolve_attention(choice: str, compute_dtype: str, platform: str | None = None) -> str:
    """ "auto" -> cuDNN flash attention on an NVIDIA GPU in bf16/fp16, splash attention on a TPU, else "blocked"
    (model/attention.py: only the tiles a segment spans, on any backend); "splash" off a TPU is "blocked" (its
    kernel compiles for TPUs only); other choices as they are. `platform`: where the step will run (an abstract
    mesh's devices: the sharding lab); default JAX's backend."""
    platform = platform or jax.default_backend()
    if choice == "splash" and platform != "tpu":
        warnings.warn(f"splash attention needs a TPU, not {platform}; using blocked.", stacklevel=2)
        return "blocked"
    if choice != "auto":
        return choice
    if platform == "tpu":
        return "splash"
    on_gpu = platform == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(compute_dtype) in (jnp.bfloat16, jnp.float16) else "blocked"


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


def pair_logps(
    model: nnx.Module,
    batch: Batch,
    chunk_size: int,
    micro_batches: int = 1,
    axis_name: str | tuple[str, ...] | None = None,
) -> tuple[Array, Array]:
    """Summed response log-probs [B, R] and counted tokens [B, R] of each pair's R = 2 (chosen, rejected)
    sequences in one forward; R = 1 when only the chosen rows are given (SFT). A packed batch (data/packing.py)
    gives [B, 2] in the order of its pair_mask, 0 for positions without a pair; when it is micro-batch m of M
    (`micro_batches`), its segments name the whole batch's pair b = j·M + m, which is its pair j.

    `axis_name`: inside `jax.shard_map`, the mesh axes the batch is split over; `batch` holds this device's
    rows and pairs. A packed row's segments may name pairs of any device: each device sums its segments into
    the slots of all the micro-batch's pairs, and a reduce-scatter leaves each device the sums of its own."""
    if "segment_ids" in batch:
        ids, attention, response, segments = (batch[k] for k in (*BATCH_KEYS, "segment_ids"))
        count = batch["segment_pairs"].shape[1]  # S segments per row
        hidden, _ = model.hidden_states(
            ids, attention, positions=batch["positions"], segment_ids=segments, segments=count,
            attention_blocks=batch.get("attention_blocks"),
        )  # fmt: skip
        sums, counts = losses.sequence_logps(
            hidden, model.logits, ids, response, attention, chunk_size, segment_ids=segments, num_segments=count
        )
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
    # Each row is one segment (its real tokens; left padding too), so the attention that skips what no segment
    # spans skips the padding and the upper triangle (segment_positions count as positions_from_mask does).
    hidden, _ = model.hidden_states(ids, attention, segment_ids=(attention > 0).astype(jnp.int32), segments=1)
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


def step_model(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, config: TrainConfig) -> nnx.Module:
    """The model merged *inside a trace* from its state, with the step's attention and remat."""
    model = nnx.merge(graphdef, params, frozen)
    set_attention(model, config.attention)
    apply_remat(model, config.remat)
    return model


def model_loss(
    model: nnx.Module,
    batch: Batch,
    norm: losses.Denominators,
    key: Array,
    config: TrainConfig,
    axis_name: str | tuple[str, ...] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """(loss, metrics) of one micro-batch, normalised by the whole batch's `norm`; `key` drives LoRA dropout.

    `axis_name`: inside `jax.shard_map` (shard_map.py), the mesh axes the batch is split over; `batch` is then
    this device's rows (see `pair_logps`).
    """
    loss_config, micro, chunk = config.loss, config.micro_batches, config.logits_chunk_size
    ref_logps = batch.get("ref_logps")
    if ref_logps is None and loss_config.dpo_weight:
        if not lora.has_adapters(model):
            raise ValueError("full-parameter DPO needs ref_logps in the batch (see training.make_logps_fn).")
        with lora.adapters_off(model):  # the reference: base weights, adapters off, no gradient
            ref_logps, _ = jax.lax.stop_gradient(pair_logps(model, batch, chunk, micro, axis_name))
    lora.set_dropout_key(model, key)
    if ref_logps is None and not loss_config.dpo_weight:  # SFT: no term reads the rejected row
        if "segment_ids" in batch:  # packed rows (loop.py packs only the chosen sequences): read the chosen
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


def accumulate_gradients(
    loss_fn: Callable,
    params: nnx.State,
    frozen: nnx.State,
    batch: Batch,
    norm: losses.Denominators,
    keys: Array,
    micro_batches: int,
):
    """(gradients, metrics) of loss_fn(params, frozen, micro_batch, norm, key) summed over the M micro-batches
    with `lax.scan`, in float32, then cast to the parameters' dtypes. Every loss and metric term is normalised
    by whole-batch denominators, so the sums are the whole batch's."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(grads: nnx.State, xs: tuple[Batch, Array]):
        (_, metrics), micro_grads = grad_fn(params, frozen, xs[0], norm, xs[1])
        return jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads), metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)  # accumulate in float32
    grads, metrics = jax.lax.scan(accumulate, zeros, (split_micro_batches(batch, micro_batches), keys))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)  # the optimizer sees the params' dtypes
    return grads, {name: jnp.sum(values) for name, values in metrics.items()}  # terms add up (see losses.py)


def apply_update(
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    state: TrainState,
    grads: nnx.State,
    metrics: dict[str, Array],
) -> tuple[TrainState, dict[str, Array]]:
    """Clip and AdamW on the whole batch's gradients (sharded like the params; XLA reduces the global norm)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = metrics | {"grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
    return TrainState(state.step + 1, params, opt_state), metrics


def jit_step(step: Callable, mesh: Mesh, state_shardings: TrainState, frozen_shardings: nnx.State):
    """jax.jit of step(state, frozen, batch) with the trainer's shardings; the state is donated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, frozen_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
