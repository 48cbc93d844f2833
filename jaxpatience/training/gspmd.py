"""The GSPMD train step (`train.strategy=gspmd`, the default): one `jax.jit` over global arrays.

XLA's partitioner (GSPMD) derives the collectives from the shardings of the state, the frozen weights and the
batch, and from the activation constraints inside the model (sharding.constrain). shard_map.py writes the same
step per device with its collectives by hand; both are built from core.py's pieces.
"""

from __future__ import annotations

import optax
from flax import nnx
from jax.sharding import Mesh

from jaxpatience import sharding
from jaxpatience.config import TrainConfig
from jaxpatience.training import losses
from jaxpatience.training.batch import Batch
from jaxpatience.training.core import (
    Array,
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


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    config: TrainConfig,
    mesh: Mesh,
    state_shardings: TrainState,
    frozen_shardings: nnx.State,
):
    """jit((state, frozen, batch) -> (state, metrics)), state donated; metrics are replicated scalars."""
    schedule = make_schedule(config.optimizer, config.max_steps)

    def micro_loss(params: nnx.State, frozen: nnx.State, batch: Batch, norm: losses.Denominators, key: Array):
        return model_loss(step_model(graphdef, params, frozen, config), batch, norm, key, config)

    def step(state: TrainState, frozen: nnx.State, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        with sharding.activate(mesh):  # constraints inside the model take effect while tracing
            norm = batch_denominators(batch)  # whole-batch normalisers
            keys = step_keys(config, state.step)
            grads, metrics = accumulate_gradients(
                micro_loss, state.params, frozen, batch, norm, keys, config.micro_batches
            )
        return apply_update(optimizer, schedule, state, grads, metrics)

    return jit_step(step, mesh, state_shardings, frozen_shardings)
