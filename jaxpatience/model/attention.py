"""Attention: the written-out reference, and the implementations training rows use (`set_attention` in qwen2.py
picks one per model).

Shape letters: B rows, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim, P tile pairs, C the
tile (ATTENTION_BLOCK tokens).

`attend` takes a dense mask [B, T, S] (decoding with a KV cache, and the reference). `attend_rows` takes a
`RowMask`: training rows without a cache whose sequences are segments (packed rows; a padded row is one segment),
so an implementation can skip what no segment spans instead of computing the whole [T, T] square:

    einsum   written out, scores in float32: the reference (T² per row)
    xla      jax.nn.dot_product_attention with the dense mask (T² per row)
    blocked  any backend: only the [C, C] tiles that hold a query and a key of one segment (the loader lists them
             per row, data/packing.py attention_blocks), combined as flash attention combines blocks
    cudnn    cuDNN's fused flash attention, causal, no dense bias: padded rows as sequence lengths, packed rows
             as segment offsets and lengths (JAX's THD layout; Hopper or later); bf16/fp16, head dim % 8 == 0
    splash   Pallas splash attention (TPU) with segment ids, causal

"cudnn" and "splash" fall back to "blocked" with a warning where their kernel refuses the call.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn  # its THD (segment offsets) API is not public yet
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_masks

from jaxpatience import sharding
from jaxpatience.data.packing import ATTENTION_BLOCK

Array = jax.Array
ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "blocked", "cudnn", "splash")


class RowMask(NamedTuple):
    """Which keys each query of a training row sees (no cache), in every form an implementation takes.

    `segment_ids` [B, T]: 0 at padding, 1..S one value per sequence, sequences laid one after another from slot 0
    (data/packing.py; a padded row is segment 1 followed by padding). `segments`: S, static. `blocks` [B, P, 2]:
    the (query tile, key tile) pairs of ATTENTION_BLOCK tokens that hold a query and a key of one segment, -1 in
    the key column for unused entries (data/packing.py attention_blocks); None: every causal tile.
    """

    dense: Array  # [B, T, T] bool: the einsum / xla mask (XLA drops it where no implementation reads it)
    segment_ids: Array  # [B, T] int
    segments: int
    blocks: Array | None  # [B, P, 2] int


def attend(q: Array, key: Array, value: Array, mask: Array, implementation: str = "einsum") -> Array:
    """Softmax attention with GQA: q [B, T, N, H], key/value [B, S, K, H], mask [B, T, S] bool -> [B, T, N, H].

    "einsum": written out here, scores in float32 (the reference, and what decoding uses). "xla" / "cudnn":
    `jax.nn.dot_product_attention` (cuDNN's fused flash attention on NVIDIA GPUs, bf16/fp16 only, the mask as a
    dense bias; XLA's fused attention elsewhere). "blocked" and "splash" need segment ids (`attend_rows`): with a
    mask alone they are "xla". A query row whose mask is all False (padding) gets an undefined output; its logits
    are never read.
    """
    batch, length, n, h = q.shape
    k = key.shape[2]
    if implementation == "cudnn":  # cuDNN skips the masked-out upper triangle; the mask still applies
        try:
            return jax.nn.dot_product_attention(
                q, key, value, mask=mask[:, None], is_causal=True, implementation="cudnn"
            )
        except (ValueError, NotImplementedError, RuntimeError) as err:  # shape, dtype or cuDNN version it refuses
            warnings.warn(f"cuDNN attention refused this call ({err}); using XLA's.", stacklevel=2)
            implementation = "xla"
    if implementation in ("xla", "blocked", "splash"):
        return jax.nn.dot_product_attention(q, key, value, mask=mask[:, None], implementation="xla")
    q = q.reshape(batch, length, k, n // k, h)  # [B, T, K, G, H]: each kv head serves G query heads
    scores = jnp.einsum("btkgh,bskh->bkgts", q, key, preferred_element_type=jnp.float32) * (h**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [B, K, G, T, S]
    return jnp.einsum("bkgts,bskh->btkgh", probs, value).reshape(batch, length, n, h)


def attend_rows(q: Array, key: Array, value: Array, rows: RowMask, implementation: str) -> Array:
    """Attention over training rows (no cache): q [B, T, N, H], key/value [B, T, K, H] -> [B, T, N, H].

    "einsum" / "xla": `attend` with the dense mask (T² per row). "blocked": `attend_blocked` (Σ len² per row, any
    backend). "cudnn": `attend_cudnn`; "splash": `attend_splash`; each falls back to "blocked" with a warning
    where its kernel refuses the call (dtype, head dim, no such device). These three give padding queries zeros.
    """
    if implementation in ("cudnn", "splash"):
        kernel = attend_cudnn if implementation == "cudnn" else attend_splash
        try:
            out = kernel(q, key.astype(q.dtype), value.astype(q.dtype), rows)
            return jnp.where(rows.segment_ids[:, :, None, None] > 0, out, 0).astype(q.dtype)
        except (ValueError, NotImplementedError, RuntimeError) as err:  # what the kernel refuses
            warnings.warn(f"{implementation} attention refused this call ({err}); using blocked.", stacklevel=2)
            implementation = "blocked"
    if implementation == "blocked":
        return attend_blocked(q, key.astype(q.dtype), value.astype(q.dtype), rows)
    return attend(q, key.astype(q.dtype), value.astype(q.dtype), rows.dense, implementation)


def attend_blocked(q: Array, key: Array, value: Array, rows: RowMask) -> Array:
    """Attention computed only on the tiles that hold a query and a key of one segment, on any backend.

    The T tokens of a row are C = ATTENTION_BLOCK-token tiles; `rows.blocks` [B, P, 2] lists the P (query tile,
    key tile) pairs that matter (the loader makes it from the packed layout; None: all causal pairs). Each pair
    is picked ([B, P, ..., C, H]), scored in float32 and masked within the tile (same segment, causal); the P
    partial softmaxes of a query tile are combined as flash attention combines its blocks: a max per query
    over its pairs, exp-sums and weighted values summed into the query tile. The work is
    P·C² per row instead of T², which for short sequences in a long packed row is Σ len² up to tile edges.
    Rows whose length is not a multiple of C (or at most C) are attended densely.
    """
    batch, length, n, h = q.shape
    k, c = key.shape[2], ATTENTION_BLOCK
    if length % c or length <= c:
        return attend(q, key, value, rows.dense, "xla")
    tiles = length // c
    blocks = rows.blocks
    if blocks is None:  # every causal (query tile, key tile) pair, the same for every row
        pairs = jnp.asarray([(i, j) for i in range(tiles) for j in range(i + 1)], jnp.int32)
        blocks = jnp.broadcast_to(pairs, (batch, *pairs.shape))
    q_tile, k_tile = blocks[..., 0], blocks[..., 1]  # [B, P]; k_tile -1: unused
    # Tiles are picked and summed back with one-hot matmuls: their gradients are matmuls too, where a gather's
    # is a scatter-add (slow on CPUs); an unused entry's key row is all zeros.
    q_pick = jax.nn.one_hot(q_tile, tiles, dtype=q.dtype) * (k_tile >= 0)[..., None]  # [B, P, tiles]
    k_pick = jax.nn.one_hot(k_tile, tiles, dtype=q.dtype)  # [B, P, tiles]
    qs = jnp.einsum("bpt,btckgh->bpkgch", q_pick, q.reshape(batch, tiles, c, k, n // k, h))  # [B, P, K, G, C, H]
    ks = jnp.einsum("bpt,btckh->bpkch", k_pick, key.reshape(batch, tiles, c, k, h))  # [B, P, K, C, H]
    vs = jnp.einsum("bpt,btckh->bpkch", k_pick, value.reshape(batch, tiles, c, k, h))  # [B, P, K, C, H]
    take = jax.vmap(lambda x, index: x[index])  # per row: [tiles, ...] at [P] -> [P, ...] (no gradient here)
    segments = rows.segment_ids.reshape(batch, tiles, c)
    q_seg, k_seg = take(segments, q_tile), take(segments, jnp.maximum(k_tile, 0))  # [B, P, C]
    q_pos = q_tile[..., None] * c + jnp.arange(c)  # [B, P, C] slots in the row
    k_pos = k_tile[..., None] * c + jnp.arange(c)
    visible = (q_seg[..., :, None] == k_seg[..., None, :]) & (q_pos[..., :, None] >= k_pos[..., None, :])
    visible = visible & (q_seg[..., :, None] > 0) & (k_tile >= 0)[..., None, None]  # [B, P, C, C]
    visible = visible[:, :, None, None]  # [B, P, 1, 1, C, C] over K, G
    scores = jnp.einsum("bpkgqh,bpksh->bpkgqs", qs, ks, preferred_element_type=jnp.float32) * (h**-0.5)
    scores = jnp.where(visible, scores, -jnp.inf)
    # Per query, the max over all its tiles (stop_gradient: softmax does not depend on it).
    tile_max = jnp.max(scores, axis=-1)  # [B, P, K, G, C]
    spread = jnp.where(q_pick[..., None, None, None] > 0, tile_max[:, :, None], -jnp.inf)  # [B, P, tiles, K, G, C]
    row_max = jax.lax.stop_gradient(jnp.maximum(jnp.max(spread, axis=1), jnp.finfo(jnp.float32).min))
    probs = jnp.where(visible, jnp.exp(scores - take(row_max, q_tile)[..., None]), 0.0)  # [B, P, K, G, C, C]
    denominator = jnp.einsum("bpt,bpkgq->btkgq", q_pick.astype(jnp.float32), jnp.sum(probs, axis=-1))
    partial = jnp.einsum("bpkgqs,bpksh->bpkgqh", probs.astype(value.dtype), vs, preferred_element_type=jnp.float32)
    numerator = jnp.einsum("bpt,bpkgqh->btkgqh", q_pick.astype(jnp.float32), partial)  # [B, tiles, K, G, C, H]
    safe = jnp.where(denominator > 0, denominator, 1.0)[..., None]  # padding queries: no visible key
    out = jnp.where(denominator[..., None] > 0, numerator / safe, 0.0)  # [B, tiles, K, G, C, H]
    return jnp.moveaxis(out, 4, 2).reshape(batch, length, n, h).astype(q.dtype)


def segment_spans(segment_ids: Array, segments: int) -> tuple[Array, Array]:
    """Each segment's first slot and length, [B, S] int32 each, -1 where a row has fewer than S segments."""
    ids = jnp.arange(1, segments + 1, dtype=segment_ids.dtype)  # [S]
    member = segment_ids[:, None, :] == ids[None, :, None]  # [B, S, T]
    lengths = jnp.sum(member, axis=-1, dtype=jnp.int32)
    starts = jnp.argmax(member, axis=-1).astype(jnp.int32)
    return jnp.where(lengths > 0, starts, -1), jnp.where(lengths > 0, lengths, -1)


def attend_cudnn(q: Array, key: Array, value: Array, rows: RowMask) -> Array:
    """cuDNN's fused flash attention (bf16/fp16, NVIDIA GPUs), causal, with no dense bias: padded rows (one
    segment each) as sequence lengths; packed rows as each segment's offset and length (the THD layout of JAX's
    cuDNN attention, Hopper or later). Raises what cuDNN refuses."""
    if rows.segments == 1:
        real = rows.segment_ids > 0  # [B, T]
        lengths = jnp.sum(real, axis=-1, dtype=jnp.int32)  # [B]
        # cuDNN's lengths count from slot 0: a left-padded row is rolled to its first real token and back (the
        # loader right-pads, so this is the identity there; a gather XLA cannot skip, cheap beside attention).
        first = jnp.argmax(real, axis=-1)[:, None]  # [B, 1]
        slots = jnp.arange(q.shape[1])[None, :]
        roll = lambda x, shift: jnp.take_along_axis(x, ((slots + shift) % q.shape[1])[:, :, None, None], axis=1)
        out = jax.nn.dot_product_attention(
            roll(q, first), roll(key, first), roll(value, first), is_causal=True, query_seq_lengths=lengths,
            key_value_seq_lengths=lengths, implementation="cudnn",
        )  # fmt: skip
        return roll(out, -first)
    starts, lengths = segment_spans(rows.segment_ids, rows.segments)  # [B, S]
    offsets = jnp.concatenate([starts, jnp.full_like(starts[:, :1], -1)], axis=1)  # [B, S + 1]
    groups = q.shape[2] // key.shape[2]
    # JAX strides the kv offsets by the query heads, so kv heads are repeated to N (GQA as MHA).
    key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
    return cudnn.dot_product_attention(
        q, key, value, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
        scale=q.shape[-1] ** -0.5, mask_type=cudnn.MaskType.PADDING_CAUSAL,
    )  # fmt: skip


def attend_splash(q: Array, key: Array, value: Array, rows: RowMask, interpret: bool = False) -> Array:
    """Pallas splash attention (TPU), causal within each segment (`segment_ids`), tiles that no segment spans
    skipped. Only a step compiled for TPUs calls it (training.resolve_attention); `interpret`: run the kernel in
    Pallas' interpreter instead (a check on the CPU). Raises what it refuses at trace time."""
    batch, length, n, h = q.shape
    groups = n // key.shape[2]
    block = min(length, 512)
    sizes = splash.BlockSizes(
        block_q=block, block_kv_compute=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    causal = splash_masks.MultiHeadMask([splash_masks.CausalMask((length, length)) for _ in range(n)])
    kernel = splash.make_splash_mha(causal, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    q_heads = jnp.swapaxes(q * (h**-0.5), 1, 2)  # [B, N, T, H]: the kernel does not scale
    kv_heads = lambda x: jnp.swapaxes(jnp.repeat(x, groups, axis=2), 1, 2)  # [B, N, T, H]

    def run(q, key, value, segment_ids):
        ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
        return jax.vmap(kernel)(q, key, value, segment_ids=ids)  # [B, N, T, H]

    mesh = sharding.active_mesh()
    if mesh is not None and mesh.size > 1:  # XLA cannot partition a Mosaic kernel: run it on each device's rows
        rows_spec = sharding.logical_to_spec(("batch",), (batch,), mesh)
        run = jax.shard_map(run, mesh=mesh, in_specs=rows_spec, out_specs=rows_spec, check_vma=False)
    return jnp.swapaxes(run(q_heads, kv_heads(key), kv_heads(value), rows.segment_ids), 1, 2)
