"""Packed batches: the chosen and rejected sequences of several pairs share fixed-length rows. Pure numpy.

A padded batch gives every pair two rows of its bucket's length ([B, 2, T]); with Patience-like lengths (prompt
60-250 tokens, chosen 150-700, rejected 50-300) half or more of those slots are padding. A packed batch holds
the same B pairs in R rows of L tokens:

    input_ids, attention_mask, loss_mask, segment_ids, positions   [R, L] int32
    pair_slots                                                      [R, K] int32: 1 where a slot holds a pair
    pair_index                                                      [R, K] int64: the pair of each slot, -1 if none

A pair sits whole in one row: its chosen sequence (prompt + chosen) is segment 2k + 1 and its rejected sequence
(prompt + rejected) segment 2k + 2 of the row's pair slot k; 0 marks padding. Positions restart at every segment
and the model attends only within a segment (model.hidden_states' `segment_ids`), so each sequence's log-probs
are what its own padded row gives. Keeping pairs whole means any split of the rows — over hosts, devices or
micro-batches — keeps a pair's two log-probs together, and the losses stay per pair.

Static shapes: L is fixed (default: the data's longest pair rounded up to 128 tokens), K is fixed per data set (the
most pairs that could share a row), and R is the number of rows first-fit-decreasing needs, rounded up to
`row_multiple` (hosts × micro-batches × data-parallel devices divide it). A run therefore compiles once per
distinct R, a handful of values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PACKED_KEYS = ("input_ids", "attention_mask", "loss_mask", "segment_ids", "positions", "pair_slots")


def default_row_length(longest_pair: int, multiple: int = 128) -> int:
    """The data's longest pair (packed tokens) rounded up to a multiple of 128: every pair fits, and the row is
    no longer than it must be (attention costs grow with the row's length)."""
    return -(-longest_pair // multiple) * multiple


def pair_tokens(pair) -> int:
    """Tokens a pair takes in a packed row: its prompt twice (once per response) and both responses."""
    return 2 * len(pair.prompt) + len(pair.chosen) + len(pair.rejected)


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


def slots_per_row(pairs: Sequence, row_length: int, batch_size: int) -> int:
    """K: the most pairs of this data set that could ever share a row (its shortest pairs, one after another)."""
    fit, used = 0, 0
    for tokens in sorted(pair_tokens(p) for p in pairs):
        if used + tokens > row_length or fit == batch_size:
            break
        fit, used = fit + 1, used + tokens
    return max(fit, 1)


def pack_plan(pairs: Sequence, indices: np.ndarray, row_length: int, slots: int, row_multiple: int) -> np.ndarray:
    """The global layout of one batch: pair index per (row, slot), [R, K], -1 for empty slots and padding rows."""
    if len(indices) == 0:
        raise ValueError("cannot pack an empty batch.")
    bins = first_fit_decreasing([pair_tokens(pairs[i]) for i in indices], row_length)
    rows = -(-len(bins) // row_multiple) * row_multiple
    plan = np.full((rows, slots), -1, np.int64)
    for row, members in enumerate(bins):
        if len(members) > slots:  # slots_per_row bounds this; a plan that breaks it is a bug
            raise AssertionError(f"{len(members)} pairs in a row of {slots} slots")
        plan[row, : len(members)] = [indices[m] for m in members]
    return plan


def packed_arrays(pairs: Sequence, plan: np.ndarray, row_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """The arrays of the rows in `plan` ([R', K] pair indices, as pack_plan gives them)."""
    rows, slots = plan.shape
    shape = (rows, row_length)
    batch = {k: np.zeros(shape, np.int32) for k in PACKED_KEYS[1:5]}
    batch["input_ids"] = np.full(shape, pad_id, np.int32)
    for row in range(rows):
        start = 0
        for slot, index in enumerate(plan[row]):
            if index < 0:
                continue
            pair = pairs[index]
            for side, response in enumerate((pair.chosen, pair.rejected)):
                p, r = len(pair.prompt), len(response)
                span = slice(start, start + p + r)
                batch["input_ids"][row, span] = np.concatenate([pair.prompt, response])
                batch["attention_mask"][row, span] = 1
                batch["loss_mask"][row, start + p : start + p + r] = 1
                batch["segment_ids"][row, span] = 2 * slot + side + 1
                batch["positions"][row, span] = np.arange(p + r)
                start += p + r
    batch["pair_slots"] = (plan >= 0).astype(np.int32)
    batch["pair_index"] = plan.copy()
    return batch


def host_rows(plan: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This host's rows of a global plan: [i·R/P, (i+1)·R/P) on host i."""
    per_host = plan.shape[0] // process_count
    return plan[process_index * per_host : (process_index + 1) * per_host]
