"""Can this backend run attention in these dtypes? Asked at the door of a training run, before a file is written.

A dtype the backend cannot compile for (float16 attention through `jax.nn.dot_product_attention` on the CPU:
"The precision 'F16_F16_F32' is not supported by dot_general on CPU") used to fail inside XLA at the first step,
after the run had written its config, metrics and checkpoint folders; and only for some data, since the blocked
implementation attends a row of at most one tile (128 tokens) with XLA's fused attention. Rather than a table of
what each backend supports (which goes stale with every JAX release), `check_backend_runs` compiles, forward and
backward, at toy sizes, every attention path the run's implementation can take (model/attention.py: `attend` for
unpacked rows; `attend_rows` for packed ones, at one tile and at two, so that the dense fallback and the tiled
path are both built) in the run's compute dtype, and turns XLA's refusal into one sentence naming the setting.
Attention is the one part of the model whose operations differ with the backend and the dtype (the matmuls and
norms are plain einsums, with float32 statistics). float32, which every backend runs, is not compiled; another
dtype costs a fraction of a second, once per process for each combination. Only the CPU backend is probed: it is
where the refusal was seen, and a GPU or TPU run in bfloat16 (their usual dtype) must neither pay for the probe nor
risk a toy-sized kernel refusal that its real shapes would pass.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from jaxpatience.config import ConfigError
from jaxpatience.model.attention import RowMask, attend, attend_rows
from jaxpatience.training.core import resolve_attention

_TILE = 128  # data/packing.py ATTENTION_BLOCK: the blocked implementation's tile


def check_backend_runs(param_dtype: str, compute_dtype: str | None, attention: str, *, packed: bool) -> None:
    """One sentence (ConfigError) naming `param_dtype` / `compute_dtype` and `train.attention` when JAX's default
    backend cannot compile the run's attention in them; returns None when it can.

    attention: `train.attention` as set ("auto" is resolved here as the trainer resolves it). packed: the rows
    carry segment ids (data.packing=true), which route attention through `attend_rows`."""
    compute = compute_dtype or param_dtype
    if compute not in ("bfloat16", "float16"):  # float32 runs everywhere; other names are ModelConfig's to refuse
        return
    if jax.default_backend() != "cpu":  # accelerators run both; see the module's docstring
        return
    attention = resolve_attention(attention, compute)
    problem = _compile_problem(compute, attention, packed)
    if problem is None:
        return
    key = f"param_dtype={param_dtype}" if compute == param_dtype else f"compute_dtype={compute}"
    raise ConfigError(
        f"{key} cannot run on this machine's {jax.default_backend()} backend with train.attention={attention} "
        f"(XLA: {problem}); use float32{' or bfloat16' if compute != 'bfloat16' else ''}, or another train.attention."
    )


@functools.cache
def _compile_problem(dtype: str, attention: str, packed: bool) -> str | None:
    """XLA's first line of refusal for the attention paths of these settings, or None when they all compile."""
    for length in (_TILE, 2 * _TILE) if packed else (16,):
        q = jnp.zeros((1, length, 2, 64), dtype)  # [B, T, N, H]: H as in real models (cuDNN needs one)
        kv = jnp.zeros((1, length, 1, 64), dtype)  # [B, T, K, H]
        dense = jnp.tril(jnp.ones((1, length, length), bool))  # [B, T, T]
        rows = RowMask(dense, jnp.ones((1, length), jnp.int32), 1, None)

        def loss(q, kv, rows=rows, dense=dense):
            out = attend_rows(q, kv, kv, rows, attention) if packed else attend(q, kv, kv, dense, attention)
            return out.astype(jnp.float32).sum()

        try:
            with warnings.catch_warnings():  # a kernel's fallback warning belongs to the run, not to this check
                warnings.simplefilter("ignore")
                jax.jit(jax.grad(loss, argnums=(0, 1))).lower(q, kv).compile()
        except Exception as err:  # XLA's refusals come as ValueError, XlaRuntimeError, NotImplementedError...
            return (str(err).strip().splitlines() or [type(err).__name__])[0]
    return None
