"""The optimizer: AdamW on a warmup + decay schedule, after global-norm clipping."""

from __future__ import annotations

import jax
import optax

from jaxpatience.config import OptimizerConfig

Array = jax.Array


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
    """Weight decay goes to matrices only; a stacked layer's leading axis (qwen2.LayerStack) does not count."""
    keys = [getattr(k, "key", None) for k in path]
    stacked = any(a == "layers" and b == "layer" for a, b in zip(keys, keys[1:], strict=False))
    return leaf.ndim - stacked >= 2


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on the schedule, after global-norm clipping; weight decay only on matrices (ndim >= 2)."""
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(_is_matrix, params)
    adamw = optax.adamw(
        make_schedule(config, total_steps),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


# ---------------------------------------------------------------------------------------------------
# Shardings.
