"""PairLoader: preference pairs -> fixed-shape numpy batches. Pure numpy: this file never imports JAX.

Records are `{prompt, chosen, rejected}` from JSONL, parquet or a `datasets` dataset. Accepted shapes:
  * TRL's: `prompt` a string or a list of chat messages; `chosen`/`rejected` strings or message lists
    (the assistant message's content is used).
  * `question`/`problem`/`instruction` as aliases of `prompt` (e.g. Patience-style pair files); a record holding
    two of them with different values is refused (which one is meant is not known).
Messages are checked (`check_messages`): roles system/user/assistant, a prompt ending with the user's turn, a
chosen/rejected message list ending with the assistant's.
The prompt goes through the tokenizer's chat template (with the generation prompt); each response gets EOS
appended, so the model learns to stop.

Batch layout, per pair b: `input_ids[b, 0]` = prompt + chosen, `input_ids[b, 1]` = prompt + rejected, right-padded
to the batch's bucket length T. `attention_mask` is 1 on real tokens; `loss_mask` is 1 on response tokens (at their
own positions; training/losses.py shifts). Shapes are `[B_host, 2, T]`, T one of `buckets`, so the train step
compiles once per bucket and never again.

Truncation policy (counted in `stats`): a prompt longer than `max_prompt_length` keeps its *end* (the question
sits there); then each response is cut to fit `max_length`. Responses are never dropped entirely.

Order: for epoch e, a seeded permutation (seed, e) assigns pairs to buckets and batches; every host computes the
same global plan and materialises only its own rows of each global batch (rows [i·B/P, (i+1)·B/P) on host i).
The plan is a pure function of (records, seed, epoch), so `state_dict()` — {epoch, step} — is all a checkpoint
needs for a resumed run to see exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxpatience.data import packing
from jaxpatience.data.problems import ProblemsError, read_file_records

PROMPT_KEYS = ("prompt", "question", "problem", "instruction")
CHAT_ROLES = ("system", "user", "assistant")  # the roles of chat messages, in pair records and serve's requests


class DataError(ValueError):
    """A user-facing data problem: one sentence naming the file and line or field."""


# ---------------------------------------------------------------------------------------------------
# Reading records


def read_records(source, split: str = "train") -> list[dict]:
    """Records from a .jsonl/.json path, a .parquet path, a `datasets.Dataset`, or a hub dataset id."""
    if isinstance(source, (list, tuple)):
        return [dict(r, _where=f"record {i}") for i, r in enumerate(source)]
    if not isinstance(source, (str, Path)):  # a datasets.Dataset (or anything iterable of dicts)
        return [dict(r, _where=f"row {i}") for i, r in enumerate(source)]
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet"):
        try:
            rows = read_file_records(path)
        except ProblemsError as err:
            raise DataError(str(err)) from None
        for where, record in rows:
            if not isinstance(record, dict):
                raise DataError(f"{path}, {where}: expected a JSON object, got {type(record).__name__}.")
        return [dict(record, _where=f"{path}, {where}") for where, record in rows]
    if path.is_dir():
        raise DataError(f"pairs file {path} is a folder; give a .jsonl, .json or .parquet file.")
    if path.exists():
        raise DataError(f"{path}: unsupported pairs file (use .jsonl, .json or .parquet).")
    try:  # not a local file: a hub dataset id
        import datasets  # here, not at the top: 2 s to import, for the hub path only

        dataset = datasets.load_dataset(str(source), split=split)
    except Exception as err:  # offline, unknown id, ...: one sentence with the way out
        raise DataError(
            f"cannot load dataset {source!r} ({type(err).__name__}); download it where there is network and "
            "pass the local .jsonl or .parquet file instead."
        ) from None
    return [dict(r, _where=f"{source} row {i}") for i, r in enumerate(dataset)]


def check_messages(value, key: str, where: str, last_role: str) -> list[dict]:
    """A list of chat messages, checked: each a `{role, content}` object, its role one of CHAT_ROLES, its content a
    string, and the last turn `last_role` (a prompt ends with the user's turn, a response is the assistant's).
    The one check of message roles: pair records here, and serve's `messages` (serving/wire.py) use its table."""
    if not (isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                       for m in value)):  # fmt: skip
        raise DataError(f"{where}: field {key!r} must be a non-empty string or a list of {{role, content}} messages.")
    for i, message in enumerate(value):
        if message["role"] not in CHAT_ROLES:
            raise DataError(
                f"{where}: {key}[{i}] has role {message['role']!r:.40}; a role is one of {', '.join(CHAT_ROLES)}."
            )
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: {key}[{i}].content must be a string.")
    if value[-1]["role"] != last_role:
        raise DataError(
            f"{where}: the last message of {key!r} has role {value[-1]['role']!r}; it must be {last_role!r}."
        )
    return value


def _text_of(value, key: str, where: str) -> str:
    """A response as text: a string, or the (last, assistant's) message of a TRL conversational list."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list):
        return check_messages(value, key, where, last_role="assistant")[-1]["content"]
    raise DataError(f"{where}: field {key!r} must be a non-empty string or a list of chat messages.")


def _prompt_key(record: dict, where: str) -> str:
    """The record's one prompt field. Two of PROMPT_KEYS with different values (a `prompt` and a `question`) are
    ambiguous: refused, naming both, rather than one silently used."""
    keys = [k for k in PROMPT_KEYS if k in record]
    if not keys:
        raise DataError(f"{where}: the record has no prompt (one of {', '.join(PROMPT_KEYS)}).")
    differing = [k for k in keys[1:] if record[k] != record[keys[0]]]
    if differing:
        raise DataError(
            f"{where}: the record has both {keys[0]!r} and {differing[0]!r} with different values; keep one of them."
        )
    return keys[0]


def prompt_messages(record: dict) -> list[dict]:
    """The prompt of a record as chat messages (a bare string becomes one user message)."""
    where = record.get("_where", "record")
    key = _prompt_key(record, where)
    value = record[key]
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return check_messages(value, key, where, last_role="user")
    raise DataError(f"{where}: field {key!r} must be a non-empty string or a list of {{role, content}} messages.")


# ---------------------------------------------------------------------------------------------------
# Tokenising


@dataclass
class EncodedPair:
    prompt: np.ndarray  # [P] int32
    chosen: np.ndarray  # [C] int32, EOS included
    rejected: np.ndarray  # [R] int32, EOS included

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class TruncationStats:
    pairs: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    tokens_cut: int = 0
    identical: int = 0  # pairs left out: chosen and rejected the same tokens (a DPO term of log 2, no gradient)

    def summary(self) -> str:
        dropped = f"; {self.identical} pairs with identical chosen and rejected left out" if self.identical else ""
        return (
            f"{self.pairs} pairs; {self.prompts_cut} prompts cut at the front, {self.responses_cut} responses "
            f"cut at the end, {self.tokens_cut} tokens dropped in all{dropped}"
        )


def encode_pair(
    record: dict, tokenizer, max_length: int, max_prompt_length: int, stats: TruncationStats, chat_template: bool = True
) -> EncodedPair:
    """Tokenise one record under the truncation policy (module docstring)."""
    where = record.get("_where", "record")
    messages = prompt_messages(record)
    if chat_template:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        prompt = messages[-1]["content"]
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; responses could never end.")
    responses = []
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(f"{where}: the record has no {key!r} field.")
        responses.append(tokenizer.encode(_text_of(record[key], key, where), add_special_tokens=False) + [eos])
    stats.pairs += 1
    if len(prompt_ids) > max_prompt_length:  # keep the end of the prompt: the question and generation prompt
        stats.prompts_cut += 1
        stats.tokens_cut += len(prompt_ids) - max_prompt_length
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    for i, response in enumerate(responses):
        if len(response) > room:
            stats.responses_cut += 1
            stats.tokens_cut += len(response) - room
            responses[i] = response[:room]
    as_array = lambda ids: np.asarray(ids, np.int32)
    return EncodedPair(as_array(prompt_ids), as_array(responses[0]), as_array(responses[1]))


# ---------------------------------------------------------------------------------------------------
# The loader


def _without_identical(
    pairs: list[EncodedPair], records: list[dict], stats: TruncationStats, source, warn: bool
) -> list[EncodedPair]:
    """The pairs whose chosen and rejected tokens differ; the others are counted and named in a warning, or
    refused when no pair is left (DPO on them is log 2 with no gradient: a run that would silently learn nothing)."""
    same = [i for i, pair in enumerate(pairs) if np.array_equal(pair.chosen, pair.rejected)]
    if not same:
        return pairs
    first = records[same[0]].get("_where", f"record {same[0]}")
    if len(same) == len(pairs):
        raise DataError(
            f"every pair of {source} has the same chosen and rejected text (after truncation; first: "
            f"{first}); DPO cannot learn from them: check the data."
        )
    stats.identical, stats.pairs = len(same), stats.pairs - len(same)
    if warn:
        print(
            f"jaxpatience: warning: {len(same)} of {len(pairs)} pairs have the same chosen and rejected text (after "
            f"truncation; first: {first}); they are left out.",
            file=sys.stderr,
        )
    dropped = set(same)
    return [pair for i, pair in enumerate(pairs) if i not in dropped]


def records_fingerprint(records: list[dict]) -> str:
    """A digest of the records' content (not of where they were read from): equal for the same data."""
    digest = hashlib.sha256()
    for record in records:
        content = {key: value for key, value in record.items() if key != "_where"}
        digest.update(json.dumps(content, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


def default_buckets(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `max_length` (always included)."""
    buckets, size = [], smallest
    while size < max_length:
        buckets.append(size)
        size *= 2
    return (*buckets, max_length)


@dataclass
class PairLoader:
    """Seeded, resumable, host-sharded batches of preference pairs. See the module docstring."""

    pairs: list[EncodedPair]
    batch_size: int  # global number of pairs per step (all hosts together)
    buckets: tuple[int, ...]
    pad_id: int
    seed: int = 0
    shuffle: bool = True
    process_index: int = 0
    process_count: int = 1
    stats: TruncationStats = field(default_factory=TruncationStats)
    epoch: int = 0
    step: int = 0  # batches already yielded in `epoch`
    packing: bool = False  # packed rows (data/packing.py) instead of one padded row per sequence
    pack_length: int | None = None  # tokens per packed row; default: the largest bucket
    micro_batches: int = 1  # packed: each micro-batch's sequences get rows of their own
    row_multiple: int = 1  # packed rows per batch are a multiple of this (hosts x micro-batches x devices)
    chosen_only: bool = False  # the loss reads only the chosen sequences (SFT): packed rows hold only those
    fingerprint: str = ""  # of the records read (records_fingerprint): a resume checks the data is the same

    def __post_init__(self):
        if self.batch_size % self.process_count:
            raise DataError(f"batch_size {self.batch_size} is not divisible by the {self.process_count} hosts.")
        if not self.pairs:
            raise DataError("there are no pairs to train on.")
        self.buckets = tuple(sorted(self.buckets))
        too_long = max(p.length for p in self.pairs)
        if too_long > self.buckets[-1]:
            raise DataError(f"a pair has {too_long} tokens, more than the largest bucket ({self.buckets[-1]}).")
        if self.packing:
            self._check_packing()
        self._steps_per_epoch = len(self.plan(0))  # the same every epoch: bucket counts don't depend on order
        if self._steps_per_epoch == 0:
            raise DataError(f"{len(self.pairs)} pairs cannot fill one batch of {self.batch_size}.")

    def _check_packing(self) -> None:
        if self.row_multiple <= 0 or self.row_multiple % self.process_count or self.row_multiple % self.micro_batches:
            raise DataError(
                f"row_multiple ({self.row_multiple}) must be a positive multiple of the "
                f"{self.process_count} hosts and {self.micro_batches} micro-batches."
            )
        if self.batch_size % self.micro_batches:
            raise DataError(f"batch_size {self.batch_size} is not divisible by {self.micro_batches} micro-batches.")
        self.pack_length = self.pack_length or self.buckets[-1]
        longest = max(packing.sequence_lengths(p)[side] for p in self.pairs for side in self.sides)
        if longest > self.pack_length:
            raise DataError(f"a sequence has {longest} tokens, more than pack_length={self.pack_length}.")
        self.segments = packing.segments_per_row(self.pairs, self.pack_length, self.sides)

    @property
    def sides(self) -> tuple[int, ...]:
        """The sequences of each pair the loss reads: (0,) chosen only, or (0, 1) both."""
        return (0,) if self.chosen_only else (0, 1)

    @classmethod
    def from_source(
        cls,
        source,
        tokenizer,
        *,
        batch_size: int,
        max_length: int = 1024,
        max_prompt_length: int | None = None,
        buckets: Sequence[int] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        chat_template: bool = True,
        packing: bool = False,
        pack_length: int | None = None,
        micro_batches: int = 1,
        row_multiple: int = 1,
        chosen_only: bool = False,
    ) -> PairLoader:
        """Read and tokenise every record (each host builds the same global plan), then batch."""
        max_prompt_length = max_prompt_length or max_length // 2
        if not 0 < max_prompt_length < max_length:
            raise DataError(f"max_prompt_length ({max_prompt_length}) must be in (0, max_length={max_length}).")
        stats = TruncationStats()
        records = read_records(source)
        pairs = [encode_pair(r, tokenizer, max_length, max_prompt_length, stats, chat_template) for r in records]
        if not chosen_only:  # SFT reads the chosen side only: a pair's rejected side does not matter there
            pairs = _without_identical(pairs, records, stats, source, warn=process_index == 0)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(
            pairs,
            batch_size,
            tuple(buckets or default_buckets(max_length)),
            pad_id,
            seed,
            shuffle,
            process_index,
            process_count,
            stats,
            packing=packing,
            pack_length=pack_length,
            micro_batches=micro_batches,
            row_multiple=row_multiple,
            chosen_only=chosen_only,
            fingerprint=records_fingerprint(records),
        )

    # -- the plan ---------------------------------------------------------------------------------
    def _bucket_of(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The global batches of an epoch: (bucket length, pair indices [batch_size]), in training order.

        Pairs left over in a bucket (fewer than a batch) move up to the next bucket, where they still fit;
        only the largest bucket's remainder is dropped (a different one each epoch when shuffling).
        """
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.pairs)) if self.shuffle else np.arange(len(self.pairs))
        by_bucket: dict[int, list[int]] = {b: [] for b in self.buckets}
        for index in order:
            by_bucket[self._bucket_of(self.pairs[index].length)].append(int(index))
        batches, carry = [], []
        for bucket in self.buckets:
            pool = carry + by_bucket[bucket]
            full = len(pool) // self.batch_size * self.batch_size
            batches += [(bucket, np.asarray(pool[i : i + self.batch_size])) for i in range(0, full, self.batch_size)]
            carry = pool[full:]
        if self.shuffle:  # interleave buckets instead of going short -> long
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    @property
    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    @property
    def dropped_per_epoch(self) -> int:
        return len(self.pairs) - self.steps_per_epoch * self.batch_size

    # -- batches ----------------------------------------------------------------------------------
    def make_batch(self, bucket: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        """This host's rows of a global batch: arrays [batch_size / process_count, 2, bucket]; packed, its rows
        of the packed layout (data/packing.py; `bucket` is then unused)."""
        if self.packing:
            return self._packed(indices)
        mine = indices[packing.host_slice(len(indices), self.process_index, self.process_count)]
        per_host = len(mine)
        input_ids = np.full((per_host, 2, bucket), self.pad_id, np.int32)
        attention_mask = np.zeros((per_host, 2, bucket), np.int32)
        loss_mask = np.zeros((per_host, 2, bucket), np.int32)
        for row, index in enumerate(mine):
            pair = self.pairs[index]
            for side, response in enumerate((pair.chosen, pair.rejected)):
                p, r = len(pair.prompt), len(response)
                input_ids[row, side, :p] = pair.prompt
                input_ids[row, side, p : p + r] = response
                attention_mask[row, side, : p + r] = 1
                loss_mask[row, side, p : p + r] = 1
        slots = self.batch_size * len(self.sides) * bucket
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
            "pair_index": mine.astype(np.int64),
        } | self._counts(indices, slots)

    def _counts(self, indices: np.ndarray, slots: int) -> dict[str, np.ndarray]:
        """The *global* batch's real tokens and token slots (padding included) of the sequences the loss reads
        (a padded SFT batch computes only its chosen rows), the same on every host."""
        pairs = [self.pairs[i] for i in indices if i >= 0]
        real = sum(packing.sequence_lengths(p)[side] for p in pairs for side in self.sides)
        return {"real_tokens": np.int64(real), "token_slots": np.int64(slots)}

    def _packed(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """This host's rows and pairs of a packed global batch (data/packing.py); -1 in `indices`: no pair."""
        layout = packing.pack_plan(
            self.pairs, indices, self.pack_length, self.micro_batches, self.row_multiple, self.sides
        )
        rows = packing.host_slice(len(layout), self.process_index, self.process_count)
        tiled = packing.tiled(self.pack_length)  # attention tile pairs per row, of the global layout
        tiles = packing.tile_pair_count(self.pairs, indices, layout, self.pack_length) if tiled else None
        batch = packing.packed_rows(
            self.pairs, indices, layout[rows], self.pack_length, self.segments, self.pad_id, tiles
        )
        mine = indices[packing.host_slice(len(indices), self.process_index, self.process_count)]
        return (
            batch
            | {"pair_mask": (mine >= 0).astype(np.int32), "pair_index": mine.astype(np.int64)}
            | self._counts(indices, len(layout) * self.pack_length)
        )

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Endless: epoch after epoch, resuming at (epoch, step)."""
        while True:
            plan = self.plan(self.epoch)
            while self.step < len(plan):
                bucket, indices = plan[self.step]
                self.step += 1
                yield self.make_batch(bucket, indices)
            self.epoch, self.step = self.epoch + 1, 0

    def reference_batches(self) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Every pair exactly once, for a pass that does not train (reference log-probs before training).

        Yields (pair_index, batch): `batch` is this host's rows of a global batch in the loader's fixed shapes
        (as `make_batch`); `pair_index` [batch_size] says which pair each of the *global* batch's outputs
        belongs to, -1 for outputs to ignore (only a bucket's last batch is short; padded, its extra rows repeat
        pairs; packed, they are empty).
        Pairs go to the smallest bucket they fit, in index order; nothing is shuffled, dropped or carried up.
        """
        if self.chosen_only:  # a reference table holds both sides of every pair
            raise DataError("reference log-probs need both sequences of each pair; this loader packs the chosen only.")
        by_bucket: dict[int, list[int]] = {b: [] for b in self.buckets}
        for index, pair in enumerate(self.pairs):
            by_bucket[self._bucket_of(pair.length)].append(index)
        for bucket, indices in by_bucket.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = np.asarray(indices[start : start + self.batch_size], np.int64)
                pair_index = np.full(self.batch_size, -1, np.int64)
                pair_index[: len(chunk)] = chunk
                if self.packing:
                    yield pair_index, self._packed(pair_index)
                    continue
                yield pair_index, self.make_batch(bucket, np.resize(chunk, self.batch_size))  # repeat to full

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "num_pairs": len(self.pairs)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_pairs", len(self.pairs)) != len(self.pairs) or state.get("seed", self.seed) != self.seed:
            raise DataError(
                f"the checkpoint's loader state ({state.get('num_pairs')} pairs, seed {state.get('seed')}) does not "
                f"match this data ({len(self.pairs)} pairs, seed {self.seed}); resuming would change the batches."
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
