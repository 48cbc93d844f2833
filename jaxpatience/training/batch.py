"""Batches, from the loader's host rows to global arrays on the mesh.

A batch is a dict of [B, 2, T] int arrays (index 1: 0 = chosen, 1 = rejected): `input_ids`, `attention_mask`
(1 = real token) and `loss_mask` (1 = response token), plus optionally `ref_logps` [B, 2] float32 (summed
log-probs of the response tokens under the reference). A packed batch (data/packing.py) holds the same pairs as
sequences in [R, L] rows with `segment_ids`, `positions`, `segment_pairs` [R, S] and `pair_mask` [B], and where
rows are tiled `attention_blocks` [R, P, 2] (the tiles "blocked" attention visits; split with the rows).

It travels one way: PairLoader (host rows, numpy) -> `device_batch` (drops the host-only `pair_index`) ->
`place_batch` (the one place a host batch becomes a global array on the mesh, single- or multi-host) -> the
jitted step, which cuts it into M micro-batches (`split_micro_batches`).

Shape letters: B pairs, R rows, M micro-batches, T tokens.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxpatience import sharding
from jaxpatience.config import TrainConfig
from jaxpatience.data import packing

Array = jax.Array
Batch = dict[str, Any]
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")
PACKED_KEYS = packing.PACKED_KEYS  # BATCH_KEYS + segment_ids, positions, segment_pairs, pair_mask (data/packing.py)
OPTIONAL_KEYS = ("ref_logps", "attention_blocks")  # attention_blocks: packed rows only


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
    blocks = tuple(batch["attention_blocks"].shape) if "attention_blocks" in batch else None
    if blocks is not None and (not packed or len(blocks) != 3 or blocks[0] != shape[0] or blocks[2] != 2):
        raise ValueError(f"attention_blocks has shape {blocks}; expected [{shape[0]}, P, 2] beside packed rows.")
    shards = sharding.batch_shards(mesh)
    for count, what in ((shape[0], "rows" if packed else "pairs"), (pairs, "pairs")):
        if count % config.micro_batches or count // config.micro_batches % shards:
            raise ValueError(
                f"a batch of {count} {what} cannot be cut into {config.micro_batches} micro-batches that split "
                f"evenly over {shards} data-parallel devices."
            )


def place_batch(batch: Batch, mesh: Mesh, config: TrainConfig) -> Batch:
    """Validate a batch and place it on the mesh as global arrays split along pairs (`batch_sharding`).

    The one way a batch reaches the devices (Trainer.step, make_logps_fn, training/loop.py). Each process passes its own
    rows, as PairLoader.make_batch gives them: [B / P, ...] on process i are global rows [i·B/P, (i+1)·B/P) of
    the [B, ...] batch (P = 1: the whole batch; `make_array_from_process_local_data` is then a `device_put`).
    Arrays already placed with the batch sharding (global [B, ...]) pass through.
    """
    target, processes = batch_sharding(mesh), jax.process_count()
    placed = {k: v for k, v in batch.items() if isinstance(v, jax.Array) and v.sharding == target}
    local = {k: np.asarray(v) for k, v in batch.items() if k not in placed}
    # The global arrays: the P processes' rows one after the other.
    shapes = {
        k: jax.ShapeDtypeStruct((v.shape[0] * processes, *v.shape[1:]) if v.ndim else v.shape, v.dtype)
        for k, v in local.items()
    }
    validate_batch(shapes | placed, config, mesh)
    if "segment_pairs" in local:
        _check_packed_layout(local["segment_pairs"], config.micro_batches)
    if processes > 1 and local:
        global_rows = (shapes | placed)["input_ids"].shape[0]
        # e.g. every process passing the whole batch (the train step before 0.2); packed rows are not pairs
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


def device_batch(host: Batch) -> Batch:
    """The arrays of a loader batch that the step takes (the loader's pair_index stays on the host)."""
    return {k: host[k] for k in (PACKED_KEYS if "segment_ids" in host else BATCH_KEYS) + OPTIONAL_KEYS if k in host}


def split_micro_batches(batch: Batch, count: int) -> Batch:
    """[B, ...] -> [M, B/M, ...]; micro-batch m takes rows m, m + M, ... so each stays spread over devices."""

    def split(x: Array) -> Array:
        x = jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
        return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return {k: split(v) for k, v in batch.items()}
