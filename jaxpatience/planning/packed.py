"""`plan --packed DIST`: the train step lowered on a packed batch drawn from a length distribution.

Without it the lab plans the padded layout at full `--seq-len`: every sequence as long as a row, the worst case.
With it, the job's B pairs are drawn from DIST and packed as the loader packs them (data/packing.py), and the
step is lowered on that batch's shapes, so the HLO FLOPs, memory and the attention `auto` picks for the target
(blocked on CPUs, cuDNN on GPUs in bf16, splash on TPUs) are those of packed rows.

DIST is a preset of data/packing.py's LENGTH_PRESETS (`short`, `patience`, `long`: scripts/bench_packing.py's
`--lengths`) or three token ranges PROMPT,CHOSEN,REJECTED, each MIN-MAX (`60-250,150-700,50-300`). The lengths
are drawn uniformly in each range with seed 0 (the same batch for every mesh and every run); a prompt is cut to
half a row and a response to the rest of it, as scripts/bench_packing.py cuts its pairs. Each micro-batch's
sequences (both sides; SFT: the chosen only) are packed first-fit decreasing into rows of L = `--seq-len`
tokens (`packing.rows_from_lengths`), and the batch is

    input_ids, attention_mask, loss_mask, segment_ids, positions   [R, L]  R: M x the fullest micro-batch's
                                                                            rows, rounded up to M x data x fsdp
    segment_pairs                                                   [R, S]  S: the most drawn sequences that
                                                                            fit one row (the loader's bound)
    pair_mask                                                       [B]
    attention_blocks                                                [R, P, 2] where rows are tiled

Real tokens (the drawn sequences' sum) are what a row's tokens/s and model FLOPs count; padding is not.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxpatience.config import ConfigError
from jaxpatience.data import packing
from jaxpatience.planning import roofline

Range = tuple[int, int]
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Lengths:
    """A length distribution: token ranges (MIN, MAX) of the prompt, the chosen and the rejected response."""

    name: str
    prompt: Range
    chosen: Range
    rejected: Range


@dataclasses.dataclass(frozen=True)
class Layout:
    """The packed batch of one mesh: rows R of L tokens, S segments and P tile pairs (0: no map) per row, and
    the sequences' lengths, whose sum is the batch's real tokens."""

    rows: int
    row_length: int
    segments: int
    tile_pairs: int
    lengths: tuple[int, ...]

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)

    def summary(self) -> dict:
        slots = self.rows * self.row_length
        return {
            "rows": self.rows,
            "row_length": self.row_length,
            "segments": self.segments,
            "tile_pairs": self.tile_pairs,
            "real_tokens": self.real_tokens,
            "tokens_per_row": round(self.real_tokens / self.rows, 1),
            "padding_share": round(1 - self.real_tokens / slots, 4),
        }


def parse_lengths(text: str) -> Lengths:
    """`short`, `patience`, `long`, or PROMPT,CHOSEN,REJECTED ranges MIN-MAX; a ConfigError in one sentence."""
    if text in packing.LENGTH_PRESETS:
        return Lengths(text, *packing.LENGTH_PRESETS[text])
    parts = [_RANGE.match(part) for part in text.split(",")]
    if len(parts) != 3 or not all(parts):
        raise ConfigError(
            f"--packed {text!r}: expected {', '.join(packing.LENGTH_PRESETS)} or three token ranges "
            "PROMPT,CHOSEN,REJECTED, each MIN-MAX (e.g. 60-250,150-700,50-300)."
        )
    ranges = [(int(m.group(1)), int(m.group(2))) for m in parts]
    for what, (low, high) in zip(("prompt", "chosen", "rejected"), ranges, strict=True):
        if not 1 <= low <= high:
            raise ConfigError(f"--packed {text!r}: the {what} range {low}-{high} needs 1 <= MIN <= MAX.")
    return Lengths(text, *ranges)


def draw(lengths: Lengths, pairs: int, row_length: int, seed: int = 0) -> list[tuple[int, int]]:
    """Each pair's two sequence lengths (prompt + chosen, prompt + rejected), drawn uniformly in the ranges; the
    prompt cut to half a row, a response to the rest (what scripts/bench_packing.py's pairs are cut to)."""
    rng = np.random.default_rng(seed)
    uniform = lambda span: int(rng.integers(span[0], span[1] + 1))
    drawn = []
    for _ in range(pairs):
        prompt, chosen, rejected = (uniform(span) for span in (lengths.prompt, lengths.chosen, lengths.rejected))
        prompt = min(prompt, row_length // 2)
        room = row_length - prompt
        drawn.append((prompt + min(chosen, room), prompt + min(rejected, room)))
    return drawn


def layout(
    lengths: Lengths, pairs: int, row_length: int, micro_batches: int, shards: int, sides: tuple[int, ...]
) -> Layout:
    """The packed batch of `pairs` drawn pairs in `micro_batches` micro-batches over `shards` data-parallel
    devices: pair b belongs to micro-batch b mod M, whose sequences (`sides`: 0 chosen, 1 rejected) are packed
    into rows of their own, as the loader lays a batch out."""
    drawn = draw(lengths, pairs, row_length)
    micro = range(micro_batches)
    sequences = [[drawn[b][side] for b in range(m, pairs, micro_batches) for side in sides] for m in micro]
    packed = [packing.rows_from_lengths(group, row_length) for group in sequences]
    multiple = micro_batches * shards
    rows = max(len(p["segment_ids"]) for p in packed) * micro_batches
    rows = -(-rows // multiple) * multiple
    tile_pairs = max((p["attention_blocks"].shape[1] for p in packed if "attention_blocks" in p), default=0)
    flat = sorted(length for group in sequences for length in group)
    segments = max(int(np.sum(np.cumsum(flat) <= row_length)), 1)  # the shortest, one after another
    return Layout(rows, row_length, segments, tile_pairs, tuple(flat))


def batch_shapes(layout: Layout, pairs: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The packed batch's global arrays as ShapeDtypeStructs (the module docstring's table)."""
    rows = (layout.rows, layout.row_length)
    batch = {key: jax.ShapeDtypeStruct(rows, jnp.int32) for key in packing.ROW_KEYS}
    batch["segment_pairs"] = jax.ShapeDtypeStruct((layout.rows, layout.segments), jnp.int32)
    batch["pair_mask"] = jax.ShapeDtypeStruct((pairs,), jnp.int32)
    if layout.tile_pairs:
        batch["attention_blocks"] = jax.ShapeDtypeStruct((layout.rows, layout.tile_pairs, 2), jnp.int32)
    return batch


def forward_flops(config, layout: Layout) -> float:
    """Forward FLOPs of the real tokens: each sequence at its own length (attention causal within it)."""
    return sum(length * roofline.forward_flops_per_token(config, length) for length in layout.lengths)
