"""Qwen2 (and Qwen2.5) decoder in Flax NNX.

Parameter paths are HF's names with "/" for ".": `model.layers.3.self_attn.q_proj.weight` in a safetensors
file is `model/layers/3/self_attn/q_proj/weight` here, and weights keep HF's [out, in] layout, so loading and
saving is a name-for-name copy (see weights.py). Every weight carries logical axis names in its `axes`
metadata; sharding.py maps them to mesh axes. No mesh names appear in this file.

Shape letters: B batch, T query length, S key/cache length, D model dim, F MLP dim, N query heads,
K kv heads, G = N // K query heads per kv head, H head dim, V vocab, L layers.

Attention masks: `attention_mask` [B, S] marks real tokens (1) and padding (0), left or right. Positions come
from the mask (the count of real tokens before a slot), so a left-padded prompt gets positions 0, 1, ... from
its first real token, exactly as HF's `generate` computes them.

Packed rows (training, data/packing.py): `segment_ids` [B, T] give each sequence of a row its own number (0 =
padding); a token attends only to earlier tokens of its own segment and positions restart at every segment.
Attention (model/attention.py) is written out (`attend(..., "einsum")`, scores in float32: the reference, and
what decoding uses) or goes through `jax.nn.dot_product_attention` ("xla"); `set_attention` picks it for a whole
model. Training rows (no cache, `segment_ids` given: packed rows, or padded rows as one segment each) reach the
layers as a `RowMask`, which the implementations that cost Σ len² per row rather than T² read (`attend_rows`):
"blocked" (any backend: only the tiles that hold a query and a key of one segment, listed by the loader),
"cudnn" (cuDNN's fused flash attention: padded rows as sequence lengths, packed rows as segment offsets, no dense
bias) and "splash" (TPU: Pallas splash attention with segment ids).
Training stacks the decoder layers into a `LayerStack` (one layer scanned over weights with a leading [L] axis);
everything else sees the per-layer list with HF names (`stack_layers` / `unstack_layers`).

KV cache (decoding: generation/static.py and slots.py): a `KVCache` of keys and values, each a tuple of L
per-layer [B, K, S, H] buffers. Separate buffers let XLA update each in place (one stacked array was copied
several times per step); kv heads before slots is the layout the GPU compiler gives attention's matmuls (a
[B, S, K, H] cache was transposed into it and back around every decode loop: docs/SHARDING.md). A call with
`kv_cache=` writes the new keys/values at slots [cache_index, cache_index + T) and attends over all S slots;
`attention_mask` is then [B, S] and describes the whole cache (the new tokens included). `cache_index` is one
slot for every row, or one per row [B] (generation/slots.py holds rows at different points of their answers).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxpatience import sharding
from jaxpatience.config import ModelConfig
from jaxpatience.model.attention import ATTENTION_IMPLEMENTATIONS, RowMask, attend, attend_rows

Array = jax.Array


class KVCache(NamedTuple):
    k: tuple[Array, ...]  # L x [B, K, S, H]
    v: tuple[Array, ...]  # L x [B, K, S, H]


def init_kv_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens (prompt + generation)."""
    shape = (batch_size, config.num_key_value_heads, max_len, config.resolved_head_dim)  # [B, K, S, H]
    dtype = dtype or jnp.dtype(config.compute_dtype)
    layers = range(config.num_hidden_layers)
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers))


def positions_from_mask(attention_mask: Array) -> Array:
    """[B, S] 0/1 mask -> [B, S] int positions: 0 at the first real token, counting real tokens only."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def segment_positions(segment_ids: Array) -> Array:
    """[B, T] segment ids of packed rows -> [B, T] positions: 0 at each segment's first token, then counting."""
    length = segment_ids.shape[-1]
    index = jnp.arange(length)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)  # [B, T] the slot where each token's segment starts
    return index - first


BASE_OUTPUT = "base_projection"  # the name every Linear gives its base matmul's output (jax.checkpoint policies)


class Linear(nnx.Module):
    """y = x @ weight.T (+ bias), with `weight` stored as HF stores it: [out, in].

    `lora` is an optional sub-module (set by lora.py) whose output is added to y; its parameters live under
    `.../lora/...` so that the base weights keep their HF names.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        use_bias: bool,
        config: ModelConfig,
        rngs: nnx.Rngs,
    ):
        param_dtype = jnp.dtype(config.param_dtype)
        init = jax.nn.initializers.normal(stddev=0.02)
        self.weight = nnx.Param(init(rngs.params(), (out_features, in_features), param_dtype), axes=axes)
        self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), param_dtype), axes=axes[:1]) if use_bias else None)
        self.lora: nnx.Module | None = nnx.data(None)  # nnx.data: a sub-module may be assigned here later
        self.dtype = jnp.dtype(config.compute_dtype)

    def __call__(self, x: Array) -> Array:
        y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), self.weight[...].astype(self.dtype))
        y = checkpoint_name(y, BASE_OUTPUT)  # what training's remat="lora" keeps (not the adapters' outputs)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x).astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """HF's Qwen2RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, *, config: ModelConfig):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.dtype(config.param_dtype)), axes=("norm",))
        self.eps = config.rms_norm_eps
        self.dtype = jnp.dtype(config.compute_dtype)

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * self.weight[...].astype(self.dtype)


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding, HF's "rotate half" layout. x [B, T, heads, H], positions [B, T]."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.resolved_head_dim,
        )
        bias = config.qkv_bias
        self.q_proj = Linear(d, n * h, axes=("heads", "embed"), use_bias=bias, config=config, rngs=rngs)
        self.k_proj = Linear(d, k * h, axes=("kv_heads", "embed"), use_bias=bias, config=config, rngs=rngs)
        self.v_proj = Linear(d, k * h, axes=("kv_heads", "embed"), use_bias=bias, config=config, rngs=rngs)
        self.o_proj = Linear(n * h, d, axes=("embed", "heads"), use_bias=False, config=config, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.rope_theta = config.rope_theta
        self.implementation = "einsum"  # see `attend`; training sets its own (set_attention)

    def __call__(self, x: Array, positions: Array, mask, kv: tuple[Array, Array] | None, cache_index):
        """x [B, T, D]; positions [B, T]; mask [B, T, S] bool, or a RowMask (training rows); kv: this layer's
        ([B, K, S, H], [B, K, S, H])."""
        batch, length, _ = x.shape
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).reshape(batch, length, n, h), positions, self.rope_theta)  # [B, T, N, H]
        key = apply_rope(self.k_proj(x).reshape(batch, length, k, h), positions, self.rope_theta)  # [B, T, K, H]
        value = self.v_proj(x).reshape(batch, length, k, h)  # [B, T, K, H]
        if kv is not None:  # write this call's keys/values into the cache, then attend over the whole cache
            kv = (_write_cache(kv[0], key, cache_index), _write_cache(kv[1], value, cache_index))  # [B, K, S, H]
            window = lambda buffer: jnp.swapaxes(buffer[:, :, : mask.shape[-1]], 1, 2)  # the mask's slots: [B, W, K, H]
            key, value = window(kv[0]), window(kv[1])
        if isinstance(mask, RowMask):
            out = attend_rows(q, key, value, mask, self.implementation)  # [B, T, N, H]
        else:
            out = attend(q, key.astype(q.dtype), value.astype(q.dtype), mask, self.implementation)  # [B, T, N, H]
        out = out.reshape(batch, length, n * h)
        return self.o_proj(out), kv


def set_attention(model: nnx.Module, implementation: str) -> None:
    """Choose every layer's attention implementation (see `attend`); changes the module in place."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, not {implementation!r}.")
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Attention):
            module.implementation = implementation


def _write_cache(buffer: Array, new: Array, cache_index) -> Array:
    """Write new [B, T, K, H] into buffer [B, K, S, H] at slots [cache_index, cache_index + T): one index for every
    row (a scalar), or one per row ([B]: the slot engine's rows are at different points of their answers)."""
    new = jnp.swapaxes(new.astype(buffer.dtype), 1, 2)  # [B, K, T, H]
    if jnp.ndim(cache_index) == 0:
        return jax.lax.dynamic_update_slice(buffer, new, (0, 0, cache_index, 0))
    write_row = lambda row, values, start: jax.lax.dynamic_update_slice(row, values, (0, start, 0))
    return jax.vmap(write_row)(buffer, new, cache_index)  # a scatter, in place when the cache is donated


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(d, f, axes=("mlp", "embed"), use_bias=False, config=config, rngs=rngs)
        self.up_proj = Linear(d, f, axes=("mlp", "embed"), use_bias=False, config=config, rngs=rngs)
        self.down_proj = Linear(f, d, axes=("embed", "mlp"), use_bias=False, config=config, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)  # [B, T, F] SwiGLU
        hidden = sharding.constrain(hidden, ("batch", "length", "mlp"))
        return self.down_proj(hidden)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config=config)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config=config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, mask, kv, cache_index):
        attn_out, kv = self.self_attn(self.input_layernorm(x), positions, mask, kv, cache_index)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return sharding.constrain(x, ("batch", "length", "embed")), kv


class LayerStack(nnx.Module):
    """L decoder layers of one structure as a single layer whose every weight has a leading [L] axis.

    `hidden_states` runs it with `lax.scan`: one layer's program, compiled once whatever L is (28 layers of a 7B
    or 80 of a 72B), and under FSDP each iteration gathers only its own layer's weights. Training uses it
    (training/step.py); loading, saving, LoRA merging and decoding use the per-layer list with HF names, so
    `stack_layers` / `unstack_layers` convert between the two. Weights' logical axes gain "layers" in front.
    `remat` is the jax.checkpoint policy of the scanned body (training/core.py's apply_remat sets it; False = no
    remat). `gather`, None by default, is applied to each layer's weights (a State without the leading [L] axis)
    inside the scanned body before they are used: the hand-written FSDP step (training/shard_map.py) all-gathers
    them there.
    """

    def __init__(self, layers: list[DecoderLayer]):
        graphdef, first = nnx.split(layers[0])
        for i, layer in enumerate(layers[1:], 1):
            if nnx.split(layer)[0] != graphdef:
                raise ValueError(f"layer {i} differs in structure from layer 0 (LoRA on some layers only?).")
        states = [nnx.state(layer) for layer in layers]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        for _, variable in nnx.to_flat_state(stacked):  # the new leading axis has a logical name too
            if variable.get_metadata().get("axes") is not None:
                variable.set_metadata("axes", ("layers", *variable.get_metadata()["axes"]))
        self.layer = nnx.merge(graphdef, stacked)
        self.count = len(layers)
        self.remat = False  # False, or a jax.checkpoint policy (None = save nothing but the layer's input)
        self.gather = None  # None, or a callable: this layer's weights as stored -> as used (inside a trace only)

    def __call__(self, x: Array, positions: Array, mask: Array) -> Array:
        graphdef, state = nnx.split(self.layer)
        gather = self.gather

        def body(x: Array, layer_state) -> tuple[Array, None]:
            if gather is not None:  # e.g. all-gather this layer's FSDP shards, one layer at a time
                layer_state = gather(layer_state)
            return nnx.merge(graphdef, layer_state)(x, positions, mask, None, 0)[0], None

        if self.remat is not False:
            body = jax.checkpoint(body, policy=self.remat)
        return jax.lax.scan(body, x, state)[0]

    def unstack(self) -> list[DecoderLayer]:
        graphdef, state = nnx.split(self.layer)
        layers = []
        for i in range(self.count):
            layer_state = jax.tree.map(lambda x, i=i: x[i], state)
            for _, variable in nnx.to_flat_state(layer_state):
                if variable.get_metadata().get("axes") is not None:
                    variable.set_metadata("axes", variable.get_metadata()["axes"][1:])
            layers.append(nnx.merge(graphdef, layer_state))
        return layers


def stack_layers(model: Qwen2ForCausalLM) -> None:
    """Replace the model's per-layer list with a LayerStack (in place; copies the layers' weights once)."""
    if not isinstance(model.model.layers, LayerStack):
        model.model.layers = LayerStack(list(model.model.layers))


def unstack_layers(model: Qwen2ForCausalLM) -> None:
    """Back to the per-layer list with HF names (in place; slices the stacked weights into L copies)."""
    if isinstance(model.model.layers, LayerStack):
        model.model.layers = nnx.List(model.model.layers.unstack())


class Embedding(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev=0.02)
        shape = (config.vocab_size, config.hidden_size)
        self.weight = nnx.Param(init(rngs.params(), shape, jnp.dtype(config.param_dtype)), axes=("vocab", "embed"))
        self.dtype = jnp.dtype(config.compute_dtype)

    def __call__(self, input_ids: Array) -> Array:
        return jnp.take(self.weight[...], input_ids, axis=0).astype(self.dtype)  # [B, T, D]


class Qwen2Model(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(config, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config=config)


def _positions_and_mask(
    shape: tuple[int, int],
    attention_mask: Array | None,
    kv_cache: KVCache | None,
    cache_index: int | Array,
    positions: Array | None,
    attend_len: int | None,
    segment_ids: Array | None,
    segments: int | None = None,
    attention_blocks: Array | None = None,
) -> tuple[Array, Array | RowMask, Array]:
    """Where each query sits and which keys it sees, from `hidden_states`' arguments: (RoPE positions [B, T],
    attention mask [B, T, W] bool, cache_index as an array). W is the cache length S, or `attend_len`. With
    `segment_ids` the mask is a RowMask (the dense mask and what the segment-aware implementations read)."""
    batch, length = shape
    key_len = length if kv_cache is None else kv_cache.k[0].shape[2]  # k[0]: layer 0's [B, K, S, H]
    if attention_mask is None:
        attention_mask = jnp.ones((batch, key_len), jnp.int32)
    if attention_mask.shape != (batch, key_len):
        raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(batch, key_len)}.")
    # Query t sits at slot cache_index + t; it sees real keys at slots <= its own. cache_index is a scalar, or
    # one slot per row [B] (the slot engine).
    if segment_ids is not None:
        if kv_cache is not None:
            raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache.")
        attention_mask = attention_mask * (segment_ids > 0)
        if positions is None:
            positions = segment_positions(segment_ids)
    cache_index = jnp.asarray(cache_index)
    query_slots = cache_index[..., None] + jnp.arange(length)  # [T] or [B, T]
    if positions is None and cache_index.ndim == 0:
        positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(attention_mask), cache_index, length, axis=1)
    elif positions is None:
        positions = jnp.take_along_axis(positions_from_mask(attention_mask), query_slots, axis=1)  # [B, T]
    # attend_len W < S: attention reads only the first W slots of the cache (the slot engine's filled part).
    key_len = key_len if attend_len is None else attend_len
    causal = jnp.arange(key_len) <= query_slots[..., None]  # [T, W] or [B, T, W]
    mask = causal & (attention_mask[:, None, :key_len] > 0)  # [B, T, W]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [B, T, T]: within a segment only
        count = segments if segments is not None else length  # at most one segment per token
        return positions, RowMask(mask, segment_ids, count, attention_blocks), cache_index
    return positions, mask, cache_index


class Qwen2ForCausalLM(nnx.Module):
    """The whole model. `model(ids, attention_mask=mask)` -> logits [B, T, V] in the compute dtype."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = Qwen2Model(config, rngs=rngs)
        self.lm_head = nnx.data(None)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(
                config.hidden_size, config.vocab_size, axes=("vocab", "embed"), use_bias=False, config=config, rngs=rngs
            )

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        kv_cache: KVCache | None = None,
        cache_index: int | Array = 0,
    ):
        """Logits [B, T, V]; with `kv_cache=`, returns (logits, updated kv_cache)."""
        hidden, kv_cache = self.hidden_states(input_ids, attention_mask, kv_cache=kv_cache, cache_index=cache_index)
        logits = self.logits(hidden)
        return logits if kv_cache is None else (logits, kv_cache)

    def hidden_states(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        kv_cache: KVCache | None = None,
        cache_index: int | Array = 0,
        positions: Array | None = None,
        attend_len: int | None = None,
        segment_ids: Array | None = None,
        segments: int | None = None,
        attention_blocks: Array | None = None,
    ):
        """Final normed hidden states [B, T, D] and the updated cache (None without one).

        cache_index: the cache slot of the first input token, the same for every row or one per row [B].
        positions: RoPE positions [B, T]; None counts the real tokens of `attention_mask` before each slot.
        attend_len: attend over the first `attend_len` cache slots only (static; every query must sit below it).
        segment_ids: packed rows (no cache): [B, T] ints, 0 at padding, one value per sequence. A token attends
            only to earlier tokens of its own segment, and positions (when not given) restart at each segment.
            Ids count 1, 2, ... in a row's order (a padded row: its attention mask, one segment).
        segments: with segment_ids, the most segments a row holds (static; default T); cuDNN's packed path reads it.
        attention_blocks: with segment_ids, [B, P, 2] the tile pairs "blocked" attention visits (RowMask).

        Losses call this and project chunks with `logits()` so a [B, T, V] float32 tensor never exists.
        """
        positions, mask, cache_index = _positions_and_mask(
            input_ids.shape,
            attention_mask,
            kv_cache,
            cache_index,
            positions,
            attend_len,
            segment_ids,
            segments,
            attention_blocks,
        )
        x = sharding.constrain(self.model.embed_tokens(input_ids), ("batch", "length", "embed"))
        if isinstance(self.model.layers, LayerStack):  # training: one layer's program, scanned over the stack
            if kv_cache is not None:
                raise ValueError("stacked layers take no KV cache; call unstack_layers(model) before decoding.")
            return self.model.norm(self.model.layers(x, positions, mask)), None
        for i, layer in enumerate(self.model.layers):
            kv = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i])
            x, kv = layer(x, positions, mask, kv, cache_index)
            if kv is not None:  # replace layer i's buffers (updated in place when the caller donates the cache)
                kv_cache = KVCache(
                    kv_cache.k[:i] + (kv[0],) + kv_cache.k[i + 1 :], kv_cache.v[:i] + (kv[1],) + kv_cache.v[i + 1 :]
                )
        return self.model.norm(x), kv_cache

    def logits(self, hidden: Array) -> Array:
        """Project hidden states [..., D] to logits [..., V] (tied: with the embedding matrix)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        weight = self.model.embed_tokens.weight[...].astype(hidden.dtype)  # [V, D]
        return jnp.einsum("...d,vd->...v", hidden, weight)
