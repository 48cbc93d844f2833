"""Packed batches: the sequences of several pairs share fixed-length rows. Pure numpy.

A padded batch gives every pair two rows of its bucket's length ([B, 2, T]); with Patience-like lengths (prompt
60-250 tokens, chosen 150-700, rejected 50-300) about half of those slots are padding. A packed batch holds the
same B pairs, in the same order, as sequences (prompt + chosen, prompt + rejected) laid one after another in R
rows of L tokens:

    input_ids, attention_mask, loss_mask, segment_ids, positions   [R, L] int32
    segment_pairs                                                   [R, S] int32: 2·b + side of each segment
    pair_mask                                                       [B] int32: 1 where the batch has a pair
    pair_index                                                      [B] int64: the pairs (host only, as padded)
    attention_blocks                                                [R, P, 2] int32: tiles to attend (below)

Segment s + 1 of a row (0 marks padding) is one sequence; positions restart at each segment and the model
attends only within it (the `segment_ids` of hidden_states, model/qwen2.py), so each sequence's log-probs are
what its own padded row gives. A segment names its pair by position b in the batch (and its side).
split_micro_batches (training/batch.py) splits rows and pairs alike (item k to micro-batch k % M), so the
batch's pair b is pair b // M of micro-batch b % M, and each micro-batch's sequences are packed into rows of its
own (row k·M + m): a pair's two sequences never leave their micro-batch, though they may sit in two rows, on two
devices (pair_logps in training/core.py sums segments into pairs with an einsum over rows, a reduction of a few
floats). A batch is laid out for one M.

A loss that reads only the chosen sequences (SFT: `dpo_weight = 0`, no reference) packs only those
(`sides=(0,)`): the rejected sequences are neither laid out nor computed, and their log-probs and counts are 0.

Attention tiles: the model's "blocked" attention (model/attention.py) cuts each row into tiles of C =
ATTENTION_BLOCK tokens and computes only the (query tile, key tile) pairs that hold a query and a key of one
segment; `attention_blocks` [R, P, 2] lists them per row (key tile -1: an unused entry), made here on the host
from the layout. A row of one long sequence needs its causal triangle of tiles, a row of short ones little more
than its diagonal, so the work is about Σ len² / 2 per row instead of L². Rows whose length is not a multiple of
C (or at most C) get no map.

Static shapes: L is fixed (default: the largest bucket, i.e. max_length), S is fixed per data set (the most
sequences that could share a row), and R is M × the rows the fullest micro-batch needs (first-fit decreasing),
rounded up so that hosts and data-parallel devices split the rows evenly; P is the most tile pairs a row of the
global batch needs, rounded up to a multiple of TILE_PAIR_MULTIPLE. A run compiles once per distinct (R, P).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PACKED_KEYS = ("input_ids", "attention_mask", "loss_mask", "segment_ids", "positions", "segment_pairs", "pair_mask")
ROW_KEYS = PACKED_KEYS[:5]
ATTENTION_BLOCK = 128  # tokens per attention tile (model/attention.py attend_blocked)
TILE_PAIR_MULTIPLE = 4  # P rounds up to this: fewer distinct shapes to compile, a little more work
# Named length distributions, (prompt, chosen, rejected) token ranges: scripts/bench_packing.py's --lengths and
# `jaxpatience plan --packed` (planning/packed.py)
LENGTH_PRESETS = {
    "short": ((20, 100), (30, 200), (20, 120)),
    "patience": ((60, 250), (150, 700), (50, 300)),  # the Patience data's lengths
    "long": ((100, 400), (300, 900), (200, 600)),
}


def sequence_lengths(pair) -> tuple[int, int]:
    """Tokens of a pair's two sequences: prompt + chosen, prompt + rejected."""
    return len(pair.prompt) + len(pair.chosen), len(pair.prompt) + len(pair.rejected)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices into `lengths` grouped into bins whose lengths sum to at most `capacity` (longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        fit = next((b for b, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            bins.append([i])
            room.append(capacity - lengths[i])
        else:
            bins[fit].append(i)
            room[fit] -= lengths[i]
    return bins


def segments_per_row(pairs: Sequence, row_length: int, sides: Sequence[int] = (0, 1)) -> int:
    """S: the most sequences of this data set that could ever share a row (its shortest, one after another)."""
    fit, used = 0, 0
    for tokens in sorted(sequence_lengths(p)[side] for p in pairs for side in sides):
        if used + tokens > row_length:
            break
        fit, used = fit + 1, used + tokens
    return max(fit, 1)


def pack_plan(
    pairs: Sequence,
    indices: np.ndarray,
    row_length: int,
    micro_batches: int,
    row_multiple: int,
    sides: Sequence[int] = (0, 1),
) -> list[list[tuple[int, int]]]:
    """The global row layout of one batch: for each of the R rows, its segments as (position b in the batch,
    side 0 chosen / 1 rejected); only the `sides` given are laid out. `indices[b] < 0` marks an empty position
    (a reference batch's last, short one)."""
    per_micro = []
    for m in range(micro_batches):
        items = [(b, side) for b in range(m, len(indices), micro_batches) if indices[b] >= 0 for side in sides]
        lengths = [sequence_lengths(pairs[indices[b]])[side] for b, side in items]
        per_micro.append([[items[i] for i in members] for members in first_fit_decreasing(lengths, row_length)])
    rows = max(len(bins) for bins in per_micro) * micro_batches
    rows = -(-rows // row_multiple) * row_multiple  # a multiple of micro-batches x devices and of the hosts
    layout: list[list[tuple[int, int]]] = [[] for _ in range(rows)]
    # micro-batch m's k-th row is global row k·M + m (split_micro_batches, training/batch.py)
    for m, bins in enumerate(per_micro):
        for k, members in enumerate(bins):
            layout[k * micro_batches + m] = members
    return layout


def tiled(row_length: int, block: int = ATTENTION_BLOCK) -> bool:
    """Whether rows of this length get an attention tile map (more than one whole tile)."""
    return row_length % block == 0 and row_length > block


def tile_pairs(lengths: Sequence[int], row_length: int, block: int = ATTENTION_BLOCK) -> np.ndarray:
    """[P, 2] (query tile, key tile), sorted, of a row whose sequences of these `lengths` lie one after another
    from slot 0: the pairs with key tile <= query tile that hold some segment in both."""
    tiles = row_length // block
    ends = np.cumsum(np.asarray(lengths, np.int64))
    starts = ends - np.asarray(lengths, np.int64)
    index = np.arange(tiles)[:, None]
    present = (index >= starts // block) & (index <= (ends - 1) // block)  # [tiles, segments]
    needed = (present.astype(np.int32) @ present.T.astype(np.int32) > 0) & np.tri(tiles, dtype=bool)
    return np.argwhere(needed).astype(np.int32)


def tile_pair_count(pairs: Sequence, indices: np.ndarray, layout: list[list[tuple[int, int]]], row_length: int) -> int:
    """P: the most tile pairs a row of this (global) layout needs, rounded up to TILE_PAIR_MULTIPLE and at most
    the causal triangle. Every host computes it from the whole layout, so all agree on the shape."""
    row_lengths = [[sequence_lengths(pairs[indices[b]])[side] for b, side in members] for members in layout]
    return rounded_tile_pairs(max(len(tile_pairs(lengths, row_length)) for lengths in row_lengths), row_length)


def rounded_tile_pairs(count: int, row_length: int, block: int = ATTENTION_BLOCK) -> int:
    tiles = row_length // block
    return min(-(-max(count, 1) // TILE_PAIR_MULTIPLE) * TILE_PAIR_MULTIPLE, tiles * (tiles + 1) // 2)


def attention_blocks(row_lengths: Sequence[Sequence[int]], row_length: int, count: int) -> np.ndarray:
    """[R, count, 2] each row's tile pairs (`tile_pairs`), padded with (0, -1) entries that attend to nothing."""
    blocks = np.zeros((len(row_lengths), count, 2), np.int32)
    blocks[:, :, 1] = -1
    for row, lengths in enumerate(row_lengths):
        needed = tile_pairs(lengths, row_length)
        if len(needed) > count:  # tile_pair_count bounds this; a count that breaks it is a bug
            raise AssertionError(f"a row needs {len(needed)} tile pairs, more than {count}")
        blocks[row, : len(needed)] = needed
    return blocks


def rows_from_lengths(lengths: Sequence[int], row_length: int, row_multiple: int = 1) -> dict[str, np.ndarray]:
    """Packed rows of sequences with these lengths alone (no tokens): `segment_ids`, `positions` [R, L] and, where
    rows are tiled, `attention_blocks` [R, P, 2]; R rounded up to `row_multiple`. For planning and benchmarks
    from a length distribution (first-fit decreasing, as the loader packs one micro-batch)."""
    bins = first_fit_decreasing(lengths, row_length)
    rows = -(-len(bins) // row_multiple) * row_multiple
    row_lengths = [[lengths[i] for i in members] for members in bins] + [[] for _ in range(rows - len(bins))]
    segment_ids, positions = np.zeros((rows, row_length), np.int32), np.zeros((rows, row_length), np.int32)
    for row, members in enumerate(row_lengths):
        start = 0
        for segment, length in enumerate(members):
            segment_ids[row, start : start + length] = segment + 1
            positions[row, start : start + length] = np.arange(length)
            start += length
    out = {"segment_ids": segment_ids, "positions": positions}
    if tiled(row_length):
        count = rounded_tile_pairs(max(len(tile_pairs(r, row_length)) for r in row_lengths), row_length)
        out["attention_blocks"] = attention_blocks(row_lengths, row_length, count)
    return out


def packed_rows(
    pairs: Sequence,
    indices: np.ndarray,
    layout: list[list[tuple[int, int]]],
    row_length: int,
    segments: int,
    pad_id: int,
    tile_pairs_per_row: int | None = None,
) -> dict[str, np.ndarray]:
    """The row arrays ([len(layout), L]) and segment_pairs ([len(layout), S]) of the rows in `layout`; with
    `tile_pairs_per_row` P (`tile_pair_count` of the global layout), attention_blocks [len(layout), P, 2]."""
    shape = (len(layout), row_length)
    batch = {k: np.zeros(shape, np.int32) for k in ROW_KEYS[1:]}
    batch["input_ids"] = np.full(shape, pad_id, np.int32)
    batch["segment_pairs"] = np.full((len(layout), segments), -1, np.int32)
    for row, members in enumerate(layout):
        if len(members) > segments:  # segments_per_row bounds this; a layout that breaks it is a bug
            raise AssertionError(f"{len(members)} sequences in a row of {segments} segments")
        start = 0
        for segment, (b, side) in enumerate(members):
            pair = pairs[indices[b]]
            response = (pair.chosen, pair.rejected)[side]
            p, r = len(pair.prompt), len(response)
            span = slice(start, start + p + r)
            batch["input_ids"][row, span] = np.concatenate([pair.prompt, response])
            batch["attention_mask"][row, span] = 1
            batch["loss_mask"][row, start + p : start + p + r] = 1
            batch["segment_ids"][row, span] = segment + 1
            batch["positions"][row, span] = np.arange(p + r)
            batch["segment_pairs"][row, segment] = 2 * b + side
            start += p + r
    if tile_pairs_per_row is not None:
        row_lengths = [[sequence_lengths(pairs[indices[b]])[side] for b, side in members] for members in layout]
        batch["attention_blocks"] = attention_blocks(row_lengths, row_length, tile_pairs_per_row)
    return batch


def host_slice(total: int, process_index: int, process_count: int) -> slice:
    """Host i's share [i·N/P, (i+1)·N/P) of N rows or pairs."""
    per_host = total // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)
