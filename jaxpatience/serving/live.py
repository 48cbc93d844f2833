"""The live slot engine behind `jaxpatience serve`: requests join and leave while others decode.

    engine = LiveEngine(model, tokenizer, slots=16, max_model_len=2048)
    engine.start()
    job = Job(prompt_ids, n=2, max_tokens=64, temperature=0.7, seed=1, emit=callback)  # callback(Delta), any thread
    engine.submit(job)   # QueueFull when too many wait; engine.cancel(job) frees its slots
    engine.stop()

scheduler.py's `run_slots` decodes one known list of prompts; here a thread owns the slots for the server's life and
loops: admit waiting jobs into free slots (one prefill per prompt, its n samples copied), decode a chunk of at
most `chunk_steps` tokens, then hand each busy row its new tokens (`Delta`s: text, ids, log-probs) and free the
rows that finished or whose job was cancelled. A new request therefore waits at most one chunk for its first
token when a slot is free.

* **Per-row settings.** Every row has its own budget, stop ids, seed, temperature, top_p and top_k
  (sampling.Sampler.per_row), so a request's samples do not depend on which others share its chunk: the same
  seed gives the same text. Greedy rows take the argmax, token-exact with `generate`. (Up to float rounding: the
  slot count and attention window change reduction orders, moving a logit by ~1e-7, which flips only a near-tie.)
* **Stop strings** are matched on the decoded text (a string may span tokens): the text is cut before it and the
  row freed; while streaming, text that could be the start of a stop string is held back until it is not.
* **Slot buckets.** The state holds a power of two of slots (rounded up to the mesh's batch shards), grown when
  waiting rows need more and shrunk when the busy ones fit in half, up to `slots`: on a CPU an idle slot costs
  as much as a busy one. The cache holds `max_model_len` tokens per slot.
* **Fixed shapes** (`fixed_shapes=(rows, longest)`, for a known set of requests such as lm-eval's): every
  insert prefills exactly `rows` prompts padded to the bucket of `longest` tokens and starts `rows` rows
  (slots.insert's `shape`: one-token padding prompts and dropped rows make up the count), and the state keeps
  `slots` slots throughout, decoding over the whole cache: one compiled insert, one slot count and one attention
  window instead of the server's shapes fitted to each moment (each new one a compile, seconds on a CPU, which
  on a small model costs more than the decoding).
* **Prompt log-probs** (`score`: OpenAI's `echo` and `top_logprobs`): one forward pass without cache over whole
  token sequences, from the caller's thread beside the engine's (the weights are only read), in power-of-two shapes.
* **Failure.** If a device call raises, every job gets a Delta with `error` set and later submits raise
  EngineFailed: no request waits forever.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import deque
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpatience import sharding
from jaxpatience.generation import slots as slot_engine  # `slots` is also LiveEngine(slots=...), the slot count
from jaxpatience.generation.api import default_stop_ids
from jaxpatience.generation.sampling import ROW_FILTERED, ROW_PLAIN, Sampler
from jaxpatience.generation.shapes import MIN_LENGTH_BUCKET, bucket, round_up
from jaxpatience.model.qwen2 import Qwen2ForCausalLM

GREEDY = Sampler(greedy=True, top_k=0, use_top_p=False)
STOP_WIDTH = 32  # E: stop ids per row (the tokenizer's end tokens + up to 16 single-token stop strings)


class QueueFull(Exception):
    """Too many requests wait for a slot; the server answers 429."""


class EngineFailed(Exception):
    """The engine thread stopped on an error; the server answers 503."""


@dataclasses.dataclass(frozen=True)
class Delta:
    """What one row produced since its last Delta. The last one of a row has `finish_reason` set."""

    sample: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None  # "stop" (a stop token or string) or "length"
    error: str | None = None  # the engine failed: the job ends here


@dataclasses.dataclass(eq=False)
class Job:
    """One request: a prompt and its n samples with their settings. `emit` is called from the engine thread."""

    prompt_ids: list[int]
    emit: Callable[[Delta], None]
    n: int = 1
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    seed_index: int = 0  # sample j draws from key(seed) folded with seed_index * n + j: a request's prompts differ
    stop_ids: list[int] = dataclasses.field(default_factory=list)  # token ids that end a row (not returned)
    stop_strings: list[str] = dataclasses.field(default_factory=list)  # matched on the text, which is cut
    cancelled: bool = False  # set by cancel(); the engine frees the job's slots at its next look


@dataclasses.dataclass(eq=False)
class _Row:
    """A busy slot's host side: its job, sample index and what it has handed out so far."""

    job: Job
    sample: int
    ids: list[int] = dataclasses.field(default_factory=list)  # returned token ids (no stop token)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    read: int = 0  # tokens read back from the device (the stop token included)
    sent_text: int = 0  # characters handed out
    sent_tokens: int = 0  # ids handed out


class LiveEngine:
    """The server's slot engine: one thread, one device state, jobs in and Deltas out."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        slots: int = 16,
        max_model_len: int | None = None,
        chunk_steps: int = 8,
        max_queue: int = 256,
        mesh=None,
        fixed_shapes: tuple[int, int] | None = None,
    ):
        config = model.config
        self.max_model_len = max_model_len or config.max_position_embeddings
        self.tokenizer, self.mesh, self.chunk_steps, self.max_queue = tokenizer, mesh, chunk_steps, max_queue
        self.graphdef, self.model_state = nnx.split(model)
        if mesh is not None:
            self.model_state = jax.device_put(self.model_state, sharding.state_shardings(mesh, self.model_state))
        self.batch_shards = sharding.batch_shards(mesh)
        self.end_ids = default_stop_ids(tokenizer)  # what ends a row unless a request adds stops
        self.max_slots = round_up(bucket(slots), self.batch_shards)
        if fixed_shapes is not None:
            rows, longest = fixed_shapes
            if not 2 <= rows <= self.max_slots or not 1 <= longest <= self.max_model_len:
                raise ValueError(
                    f"fixed_shapes: rows must be 2 to {self.max_slots} and the longest prompt 1 to "
                    f"{self.max_model_len} tokens, not {fixed_shapes}."
                )
        self.fixed_shapes = fixed_shapes
        # (Bp, P) of every insert with fixed shapes: the rows, and the longest prompt's prefill bucket
        self._insert_shape = None
        if fixed_shapes is not None:
            self._insert_shape = (fixed_shapes[0], min(slot_engine.prompt_bucket(fixed_shapes[1]), self.max_model_len))
        self._shape = (
            config.num_hidden_layers,
            self.max_model_len,
            config.num_key_value_heads,
            config.resolved_head_dim,
            self.max_model_len,
            STOP_WIDTH,
            jnp.dtype(config.compute_dtype).name,
        )
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._rows: list[_Row | None] = []  # slot -> row; None = free
        self._slots = None
        self._starting: list[Job] = []  # jobs taken from the queue and not yet in slots (failed too on an error)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None
        self.on_failure: Callable[[], None] | None = None  # called (from the engine thread) after a failure
        # Totals since start (GET /health shows them): tokens = sampled tokens, stop tokens and cancelled rows' too.
        self.stats = {"prompts": 0, "rows": 0, "chunks": 0, "decode_steps": 0, "tokens": 0}

    # -- the caller's side (any thread) ---------------------------------------------------------------

    def start(self) -> LiveEngine:
        size = self.max_slots if self.fixed_shapes else round_up(1, self.batch_shards)
        self._rows = [None] * size
        self._slots = slot_engine.empty_slots(self, (size, *self._shape))
        self._thread = threading.Thread(target=self._run, name="jaxpatience-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when `max_queue` jobs already wait, EngineFailed after a failure."""
        if self.fixed_shapes and (job.n > self.fixed_shapes[0] or len(job.prompt_ids) > self.fixed_shapes[1]):
            raise ValueError(f"a job of {job.n} rows and {len(job.prompt_ids)} tokens exceeds fixed_shapes.")
        with self._lock:
            if self.error is not None:
                raise EngineFailed(self.error)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting for a slot")
            self._waiting.append(job)
            self.stats["prompts"] += 1
            self._lock.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop a job (its client left): it leaves the queue, and its rows' slots are freed at the next look."""
        with self._lock:
            job.cancelled = True
            if job in self._waiting:  # a waiting job no longer counts against max_queue
                self._waiting.remove(job)
            self._lock.notify_all()

    def score(self, sequences: list[list[int]], top: int) -> list[tuple[list[float], list[list[tuple[int, float]]]]]:
        """Per sequence of T tokens: the log-prob of each token after those before it (T - 1 values, from the
        second token on) and, for each of those positions, the `top` likeliest tokens as (id, log-prob)."""
        rows = round_up(bucket(len(sequences)), self.batch_shards)
        length = bucket(max(map(len, sequences)), MIN_LENGTH_BUCKET)
        ids, mask = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
        for row, tokens in enumerate(sequences):
            ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
        put = lambda array: sharding.put_global(array, self.mesh, ("batch", None))
        chosen, top_lps, top_ids = (
            sharding.fetch(a)
            for a in _token_logprobs(
                self.model_state, put(ids), put(mask), graphdef=self.graphdef, top=max(top, 1), mesh=self.mesh
            )
        )
        results = []
        for row, tokens in enumerate(sequences):
            ids_row, lps_row = top_ids[row, : len(tokens) - 1, :top].tolist(), top_lps[row, : len(tokens) - 1, :top]
            # position t predicts token t + 1: its alternatives as (id, log-prob), likeliest first
            alternatives = [list(zip(i, lp.tolist(), strict=True)) for i, lp in zip(ids_row, lps_row, strict=True)]
            results.append((chosen[row, : len(tokens) - 1].tolist(), alternatives))
        return results

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> int:
        return sum(row is not None for row in self._rows)

    # -- the engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._waiting and not self.busy:
                        self._lock.wait(timeout=1.0)
                    if self._stopping:
                        return
                    self._starting = self._take_jobs()
                self._drop_cancelled()
                if self._starting:
                    self._insert(self._starting)
                    self._starting = []
                if self.busy:
                    self._decode()
        except Exception as err:  # a device error: fail every job rather than leave one waiting
            self._fail(f"{type(err).__name__}: {err}")
            if self.on_failure is not None:
                self.on_failure()

    def _take_jobs(self) -> list[Job]:
        """(Lock held.) Waiting jobs that fit in the free slots, first come first served (cancel() has already
        taken cancelled ones out of the queue)."""
        free = self.max_slots - self.busy
        if self.fixed_shapes and self.busy and free < min(self.fixed_shapes[0], sum(job.n for job in self._waiting)):
            return []  # fixed shapes: wait for a whole insert's worth of free slots (padding rows cost a prefill)
        jobs = []
        while self._waiting and self._waiting[0].n <= free:
            jobs.append(self._waiting.popleft())
            free -= jobs[-1].n
        return jobs

    def _drop_cancelled(self) -> None:
        """Free the slots of cancelled jobs' rows."""
        gone = [slot for slot, row in enumerate(self._rows) if row is not None and row.job.cancelled]
        if gone:
            self._slots = slot_engine.release(self, self._slots, gone)
            for slot in gone:
                self._rows[slot] = None

    def _resize(self, size: int) -> None:
        """Move the busy rows into a state of `size` slots (grown, or shrunk to fit them)."""
        old = len(self._rows)
        busy = [slot for slot, row in enumerate(self._rows) if row is not None]
        keep = busy + [old + i for i in range(size - len(busy))]  # indices >= old: new free slots
        rows = [self._rows[slot] for slot in busy] + [None] * (size - len(busy))
        self._slots = slot_engine.resize(self, self._slots, keep)
        self._rows = rows

    def _insert(self, jobs: list[Job]) -> None:
        """Start `jobs` (whose rows fit in max_slots): grow the slots if needed, prefill in power-of-two groups."""
        needed = self.busy + sum(job.n for job in jobs)
        if needed > len(self._rows):
            self._resize(min(self.max_slots, round_up(bucket(needed), self.batch_shards)))
        while jobs:
            if self.fixed_shapes:  # as many jobs as the insert's rows hold
                group = []
                while jobs and sum(job.n for job in group) + jobs[0].n <= self.fixed_shapes[0]:
                    group.append(jobs.pop(0))
            else:
                group = jobs[: 1 << (len(jobs).bit_length() - 1)]  # a power of two: no prefill row is padding
                jobs = jobs[len(group) :]
            free = [slot for slot, row in enumerate(self._rows) if row is None]
            rows = []
            for prompt, job in enumerate(group):
                for sample in range(job.n):
                    slot = free[len(rows)]
                    row_id = job.seed_index * job.n + sample
                    rows.append(
                        slot_engine.Row(
                            slot=slot,
                            prompt=prompt,
                            row_id=row_id,
                            budget=job.max_tokens,
                            stop_ids=job.stop_ids,
                            seed=job.seed,
                            temperature=job.temperature,
                            top_p=job.top_p,
                            top_k=job.top_k,
                        )
                    )
                    self._rows[slot] = _Row(job, sample)
            sampler, prompts = _sampler(group), [job.prompt_ids for job in group]
            self.stats["rows"] += len(rows)
            self._slots = slot_engine.insert(self, self._slots, sampler, prompts, rows, shape=self._insert_shape)

    def _decode(self) -> None:
        """One chunk, then hand out each busy row's new tokens and free the finished rows."""
        with self._lock:
            waiting = self._waiting[0].n if self._waiting else 0
            if self.fixed_shapes:  # the rows of a whole insert (or all that wait)
                waiting = min(self.fixed_shapes[0], sum(job.n for job in self._waiting))
        size, busy = len(self._rows), [slot for slot, row in enumerate(self._rows) if row is not None]
        shrink = not self.fixed_shapes and not waiting and size > round_up(1, self.batch_shards)
        if shrink and len(busy) <= size // 2:
            self._resize(max(round_up(bucket(len(busy)), self.batch_shards), round_up(1, self.batch_shards)))
            size, busy = len(self._rows), list(range(len(busy)))
        # End the chunk as soon as one row finishes (its answer goes out at once), or when the first waiting
        # job's rows would fit (fixed shapes: a whole insert's).
        refill_at = min(size - len(busy) + max(1, waiting), size)
        sampler = _sampler([self._rows[slot].job for slot in busy])
        self._slots, steps = slot_engine.decode_chunk(
            self, self._slots, sampler, steps=self.chunk_steps, refill_at=refill_at, busy=busy,
            window=self.max_model_len if self.fixed_shapes else None,
        )  # fmt: skip
        self.stats["chunks"] += 1
        self.stats["decode_steps"] += steps
        done, count, stopped = (sharding.fetch(a) for a in (self._slots.done, self._slots.count, self._slots.stopped))
        tokens, logprobs = sharding.fetch(self._slots.tokens), sharding.fetch(self._slots.logprobs)
        finished = []
        for slot in busy:
            row = self._rows[slot]
            self.stats["tokens"] += int(count[slot]) - row.read  # what the device produced, cancelled rows too
            new = slice(row.read, int(count[slot]) - int(bool(stopped[slot])))  # the stop token is not returned
            row.read = int(count[slot])
            if row.job.cancelled:
                continue  # freed at the next look
            row.ids += tokens[slot, new].tolist()
            row.logprobs += logprobs[slot, new].tolist()
            reason = ("stop" if stopped[slot] else "length") if done[slot] else None
            if self._hand_out(row, reason):
                finished.append(slot)
        if finished:
            still_busy = [slot for slot in finished if not done[slot]]  # a stop string ended them: free the slots
            if still_busy:
                self._slots = slot_engine.release(self, self._slots, still_busy)
            for slot in finished:
                self._rows[slot] = None

    def _hand_out(self, row: _Row, reason: str | None) -> bool:
        """Emit the row's settled new text and the tokens behind it; returns whether the row is finished (by its
        slot or by a stop string)."""
        text = self._decode_ids(row.ids)
        cut = min((i for i in (text.find(s) for s in row.job.stop_strings if s) if i >= 0), default=-1)
        if cut >= 0:  # keep the tokens up to the one that completes the text before the stop string
            text, reason = text[:cut], "stop"
            keep = len(row.ids)
            while keep > row.sent_tokens and len(self._decode_ids(row.ids[: keep - 1])) >= cut:
                keep -= 1
            row.ids, row.logprobs = row.ids[:keep], row.logprobs[:keep]
        end = len(text) if reason else _settled(text, row.job.stop_strings)
        if end <= row.sent_text and not reason:
            return False
        tokens = len(row.ids)  # while streaming, only the tokens whose text goes out now
        while not reason and tokens > row.sent_tokens and len(self._decode_ids(row.ids[:tokens])) > end:
            tokens -= 1
        delta = Delta(
            row.sample,
            text[row.sent_text : max(end, row.sent_text)],
            row.ids[row.sent_tokens : tokens],
            row.logprobs[row.sent_tokens : tokens],
            finish_reason=reason,
        )
        row.sent_text, row.sent_tokens = max(end, row.sent_text), tokens
        row.job.emit(delta)
        return reason is not None

    def _decode_ids(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _fail(self, message: str) -> None:
        """Every job still in the engine gets an error Delta; later submits raise EngineFailed."""
        with self._lock:
            self.error = message
            jobs = list(self._waiting) + self._starting + [row.job for row in self._rows if row is not None]
            self._waiting.clear()
            self._starting, self._rows = [], []
        for job in {id(job): job for job in jobs}.values():
            for sample in range(job.n):
                job.emit(Delta(sample, "", [], [], finish_reason=None, error=message))


@functools.partial(jax.jit, static_argnames=("graphdef", "top", "mesh"))
def _token_logprobs(model_state, ids: jax.Array, mask: jax.Array, *, graphdef, top: int, mesh):
    """ids, mask [B, T] (right-padded) -> log-prob of each next token [B, T - 1], and the `top` likeliest next
    tokens' log-probs and ids [B, T - 1, top], in float32."""
    with sharding.activate_if(mesh):
        model: Qwen2ForCausalLM = nnx.merge(graphdef, model_state)
        logprobs = jax.nn.log_softmax(model(ids, attention_mask=mask)[:, :-1].astype(jnp.float32), axis=-1)
        chosen = jnp.take_along_axis(logprobs, ids[:, 1:, None], axis=-1)[..., 0]  # [B, T - 1]
        top_lps, top_ids = jax.lax.top_k(logprobs, top)  # [B, T - 1, top]
        return chosen, top_lps, top_ids


def _sampler(jobs: list[Job]) -> Sampler:
    """The static sampler for these rows: argmax when all are greedy, else per-row sampling (ranking the vocabulary
    only when some row filters by top_k / top_p)."""
    if all(job.temperature == 0 for job in jobs):
        return GREEDY
    filtered = any(job.temperature > 0 and (job.top_k > 0 or job.top_p < 1) for job in jobs)
    return ROW_FILTERED if filtered else ROW_PLAIN


def _settled(text: str, stop_strings: list[str]) -> int:
    """How much of `text` can go out: not a trailing partial character, nor a tail that may begin a stop string."""
    end = len(text)
    # A character cut between tokens decodes to U+FFFD until its last byte comes: hold back a short trailing run
    # (never a long one, which is invalid text for good and would stall the stream).
    while end and text[end - 1] == "\ufffd" and len(text) - end < 3:
        end -= 1
    for stop in stop_strings:
        for length in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:length]):
                end -= length
                break
    return end
