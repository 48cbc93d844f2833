"""EleutherAI's lm-evaluation-harness in-process, over this project's model: `jaxpatience lm-eval`.

    jaxpatience lm-eval --model CKPT --tasks arc_easy,hellaswag --limit 200 --out runs/lm-eval
    lm = HarnessLM.from_checkpoint("CKPT"); lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

`HarnessLM` is an lm-eval `TemplateLM`: the harness tokenizes (context, continuation) pairs with the checkpoint's
tokenizer, as its own `hf` backend does, and calls

* `_loglikelihood_tokens` (loglikelihood and loglikelihood_rolling): the pairs are grouped by context, so that a
  context the harness repeats (one per choice of a multiple-choice question) is run once. Groups are sorted by
  length and cut into batches of about `batch_tokens` tokens; one jitted call (`_score`) runs a batch's contexts
  [G, P] into a KV cache, copies each context's cache to the rows of its continuations [R, C], and runs those
  on top of it. The continuation's first token is scored from the context's last logits, the others from the
  continuation rows' own. P, C, G and R are powers of two, and the batches of a shape are packed again into a
  larger planned shape when that costs at most twice their tokens (`plan_batches`): a compile costs seconds on a
  CPU, more than the padding on a small model, so a task usually compiles one or two. Result per pair: the sum of
  the continuation's log-probs (float32) and whether every token was the argmax. Long pairs are cut on the left
  to the model's context, as the `hf` backend cuts them.
* `generate_until`: the live slot engine (serving/live.py) with one job per request: its stop strings (the
  harness's `until` and the end-of-text token) cut the text and free the slot at once, `max_gen_toks` is its
  budget, greedy unless the task asks for `do_sample` / a temperature.

One process: the harness's own data parallelism (several processes, each scoring a share of the requests) is not
used; several devices of one host run a batch together through `--mesh` (weights and rows sharded). lm-eval is an
optional dependency (`pip install -e '.[lmeval]'`); only this module imports it. Shape letters: G contexts in a
batch, P context bucket, R continuation rows, C continuation bucket, S = P + C cache slots, V vocab, D model dim.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.tasks import TaskManager

from jaxpatience import sharding
from jaxpatience.config import ConfigError, EvalConfig, command_parser, config_from_args
from jaxpatience.config_io import check_output_dir
from jaxpatience.durability import outputs
from jaxpatience.durability import progress as progress_bars
from jaxpatience.evaluation.evaluate import _checkpoint_mesh
from jaxpatience.generation.shapes import bucket, round_up
from jaxpatience.model import lora
from jaxpatience.model.qwen2 import Qwen2ForCausalLM, init_kv_cache
from jaxpatience.model.weights import load_pretrained
from jaxpatience.serving.live import Delta, Job, LiveEngine

MIN_CONTEXT_BUCKET = 16  # P's smallest bucket
MIN_CONTINUATION_BUCKET = 4  # C's smallest bucket
INSERT_ROWS = 8  # generate_until: prompts per prefill (a fixed shape)


# ---------------------------------------------------------------------------------------------------
# Scoring: contexts once, continuations on top of their cache.


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def _score(
    model_state: nnx.State,
    context_ids: jax.Array,
    context_len: jax.Array,
    continuation_ids: jax.Array,
    continuation_len: jax.Array,
    group: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    mesh,
) -> tuple[jax.Array, jax.Array]:
    """Sum of log-probs [R] and is-greedy [R] of continuations [R, C] after contexts [G, P] (right-padded; row r
    continues context `group[r]`). Padding rows (length 0) score 0 and count as greedy."""
    with sharding.activate_if(mesh):
        model: Qwen2ForCausalLM = nnx.merge(graphdef, model_state)
        contexts, context_bucket = context_ids.shape
        continuation_bucket = continuation_ids.shape[1]
        slots = context_bucket + continuation_bucket  # S
        cache = init_kv_cache(model.config, contexts, slots)
        context_mask = (jnp.arange(slots) < context_len[:, None]).astype(jnp.int32)  # [G, S]
        hidden, cache = model.hidden_states(context_ids, context_mask, kv_cache=cache, cache_index=0)  # [G, P, D]
        last = jnp.take_along_axis(hidden, (context_len - 1)[:, None, None], axis=1)[:, 0]  # [G, D]
        first_logits = model.logits(last[group])  # [R, V]: predicts each continuation's first token
        row_cache = jax.tree.map(lambda buffer: buffer[group], cache)  # [R, K, S, H] per layer
        start = context_len[group]  # [R]: where each continuation's tokens go in its cache
        row_mask = (jnp.arange(slots) < (start + continuation_len)[:, None]).astype(jnp.int32)  # [R, S]
        hidden, _ = model.hidden_states(continuation_ids, row_mask, kv_cache=row_cache, cache_index=start)
        logits = jnp.concatenate([first_logits[:, None], model.logits(hidden[:, :-1])], axis=1)  # [R, C, V]
        logits = logits.astype(jnp.float32)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(logprobs, continuation_ids[..., None], axis=-1)[..., 0]  # [R, C]
        valid = jnp.arange(continuation_bucket) < continuation_len[:, None]  # [R, C]
        total = jnp.sum(jnp.where(valid, chosen, 0.0), axis=1)
        greedy = jnp.all(~valid | (jnp.argmax(logits, axis=-1) == continuation_ids), axis=1)
        return total, greedy


Shape = tuple[int, int, int, int]  # (G, P, R, C): one compiled `_score` program


@dataclasses.dataclass
class Batch:
    """One `_score` call: contexts (each once) and, per context, its continuations as (pair index, token ids);
    `shape` is the compiled shape it is padded to."""

    contexts: list[tuple[int, ...]]
    continuations: list[list[tuple[int, list[int]]]]
    shape: Shape | None = None

    @property
    def context_bucket(self) -> int:
        return bucket(max(map(len, self.contexts)), MIN_CONTEXT_BUCKET)

    @property
    def continuation_bucket(self) -> int:
        longest = max(len(ids) for rows in self.continuations for _, ids in rows)
        return bucket(longest, MIN_CONTINUATION_BUCKET)

    @property
    def rows(self) -> int:
        return sum(map(len, self.continuations))

    def own_shape(self, shards: int = 1) -> Shape:
        """The smallest shape that holds the batch: powers of two, counts a multiple of `shards`."""
        return (round_up(bucket(len(self.contexts)), shards), self.context_bucket,
                round_up(bucket(self.rows), shards), self.continuation_bucket)  # fmt: skip


def shape_cost(shape: Shape) -> int:
    """Tokens one call runs through the model: G contexts of P, R continuation rows of C."""
    contexts, context_bucket, rows, continuation_bucket = shape
    return contexts * context_bucket + rows * continuation_bucket


def _group_pairs(pairs, max_length: int) -> dict[tuple[int, ...], list[tuple[int, list[int]]]]:
    """Context -> its continuations as (pair index, ids). A pair longer than `max_length` + 1 tokens loses
    context tokens on the left, as the `hf` backend cuts it."""
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for index, (context, continuation) in enumerate(pairs):
        if not context or not continuation or len(continuation) > max_length:
            raise ValueError(
                f"request {index}: a context and a continuation of 1 to {max_length} tokens are needed, not "
                f"{len(context)} and {len(continuation)}."
            )
        kept = (list(context) + list(continuation))[-(max_length + 1) :]
        groups.setdefault(tuple(kept[: len(kept) - len(continuation)]), []).append((index, list(continuation)))
    return groups


def _fill(order: list, groups: dict, start: int, batch_tokens: int, limit: Shape | None) -> tuple[Batch | None, int]:
    """A batch of the groups order[start:], taken while it fits: within `batch_tokens` cache slots of
    continuation rows (limit None; the first group always fits), or within the shape `limit` (None if the first
    group does not fit). Returns it and the index of the first group left out."""
    batch, end = None, start
    for context in order[start:]:
        candidate = Batch((batch.contexts if batch else []) + [context],
                          (batch.continuations if batch else []) + [groups[context]], shape=limit)  # fmt: skip
        if limit is None:
            fits = batch is None or bucket(candidate.rows) * (
                candidate.context_bucket + candidate.continuation_bucket) <= batch_tokens  # fmt: skip
        else:
            longest = max(len(ids) for rows in candidate.continuations for _, ids in rows)
            fits = len(candidate.contexts) <= limit[0] and len(context) <= limit[1]
            fits = fits and candidate.rows <= limit[2] and longest <= limit[3]
        if not fits:
            break
        batch, end = candidate, end + 1
    return batch, end


def _pack(order: list, groups: dict, batch_tokens: int, shape: Shape | None, shards: int) -> list[Batch] | None:
    """The groups of `order` cut into consecutive batches: by `batch_tokens`, each in its own smallest shape
    (shape None), or all in `shape` (None if some group does not fit it)."""
    batches, start = [], 0
    while start < len(order):
        batch, start = _fill(order, groups, start, batch_tokens, shape)
        if batch is None:
            return None
        batch.shape = shape or batch.own_shape(shards)
        batches.append(batch)
    return batches


def plan_batches(
    pairs: list[tuple[list[int], list[int]]], max_length: int, batch_tokens: int, shards: int = 1, reuse: float = 2.0
) -> list[Batch]:
    """Group `pairs` (context ids, continuation ids) by context, longest first, into batches whose continuation
    rows hold at most about `batch_tokens` cache slots (one group always fits), each with its compiled shape.

    Then fewer shapes: the batches of a shape are packed again into another planned shape that holds their
    groups when that costs (shape_cost) at most `reuse` times as much as they did; on a small model a compile
    costs seconds, more than the padding. Cheapest shapes first, until no merge is left.
    """
    groups = _group_pairs(pairs, max_length)
    order = sorted(groups, key=lambda c: (len(c), max(len(ids) for _, ids in groups[c])), reverse=True)
    batches = _pack(order, groups, batch_tokens, None, shards)
    merged = True
    while merged:
        merged = False
        by_shape: dict[Shape, list[Batch]] = {}
        for batch in batches:
            by_shape.setdefault(batch.shape, []).append(batch)
        cost = {shape: shape_cost(shape) * len(members) for shape, members in by_shape.items()}
        for small in sorted(by_shape, key=cost.get):
            contexts = [context for batch in by_shape[small] for context in batch.contexts]
            for big in sorted((s for s in by_shape if s != small), key=shape_cost):
                packed = _pack(contexts, groups, batch_tokens, big, shards)
                if packed is not None and shape_cost(big) * len(packed) <= reuse * cost[small]:
                    batches = [batch for batch in batches if batch.shape != small] + packed
                    merged = True
                    break
            if merged:
                break
    return batches


def _batch_arrays(batch: Batch, shards: int) -> dict[str, np.ndarray]:
    """The call's inputs, right-padded to the batch's shape (its own smallest one if it has none)."""
    contexts, context_bucket, rows, continuation_bucket = batch.shape or batch.own_shape(shards)
    arrays = {
        "context_ids": np.zeros((contexts, context_bucket), np.int32),
        "context_len": np.ones((contexts,), np.int32),  # padding contexts: one (padding) token
        "continuation_ids": np.zeros((rows, continuation_bucket), np.int32),
        "continuation_len": np.zeros((rows,), np.int32),
        "group": np.zeros((rows,), np.int32),
    }
    row = 0
    for index, (context, continuations) in enumerate(zip(batch.contexts, batch.continuations, strict=True)):
        arrays["context_ids"][index, : len(context)] = context
        arrays["context_len"][index] = len(context)
        for _, ids in continuations:
            arrays["continuation_ids"][row, : len(ids)] = ids
            arrays["continuation_len"][row] = len(ids)
            arrays["group"][row] = index
            row += 1
    return arrays


def score_pairs(
    model: Qwen2ForCausalLM,
    pairs: list[tuple[list[int], list[int]]],
    *,
    max_length: int | None = None,
    batch_tokens: int = 8192,
    mesh=None,
    progress: bool = True,
) -> list[tuple[float, bool]]:
    """(sum of log-probs, is greedy) of each continuation after its context, for token-id pairs."""
    max_length = max_length or model.config.max_position_embeddings
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = jax.device_put(state, sharding.state_shardings(mesh, state))
    shards = sharding.batch_shards(mesh)
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    bar = progress_bars.bar(len(pairs), desc="loglikelihood", unit="request", enabled=progress)
    for batch in plan_batches(pairs, max_length, batch_tokens, shards):
        arrays = _batch_arrays(batch, shards)
        placed = {name: sharding.put_global(a, mesh, ("batch",) + (None,) * (a.ndim - 1)) for name, a in arrays.items()}
        total, greedy = _score(state, **placed, graphdef=graphdef, mesh=mesh)
        total, greedy = sharding.fetch(total), sharding.fetch(greedy)
        indices = [index for rows in batch.continuations for index, _ in rows]
        for row, index in enumerate(indices):
            results[index] = (float(total[row]), bool(greedy[row]))
        bar.update(len(indices))
    bar.close()
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# Generation: the live slot engine, one job per request.


def _stop_settings(tokenizer, until: list[str], end_ids: list[int]) -> tuple[list[str], list[int]]:
    """Stop strings matched on the text, and the ids that end a row: the end tokens and each stop string that is
    one special token (it never reaches the text, which is decoded without special tokens)."""
    vocab = tokenizer.get_vocab()
    ids = set(end_ids) | {vocab[s] for s in until if s in vocab and s in tokenizer.all_special_tokens}
    return [s for s in until if s], sorted(ids)


def generate_texts(
    model, tokenizer, prompts: list[list[int]], settings: list[dict], *, slots: int, seed: int, mesh, progress: bool
) -> list[str]:
    """Each prompt's continuation from the live engine; settings per prompt: until, max_gen_toks, temperature,
    top_p, top_k. The text stops before the first stop string, as the `hf` backend cuts it."""
    context = model.config.max_position_embeddings
    longest = max(len(ids) + s["max_gen_toks"] for ids, s in zip(prompts, settings, strict=True))
    max_model_len = min(bucket(longest, MIN_CONTEXT_BUCKET), context)  # a power of two: engines share compilations
    # One compiled insert and one slot count for the whole request set (module docstring): on a small model each
    # further shape's compile costs more than the decoding it would save.
    insert_rows = min(INSERT_ROWS, bucket(slots))
    engine = LiveEngine(
        model, tokenizer, slots=slots, max_model_len=max_model_len, chunk_steps=32, max_queue=len(prompts), mesh=mesh,
        fixed_shapes=(insert_rows, max(map(len, prompts))) if insert_rows >= 2 else None,
    )  # fmt: skip
    texts, errors, left = [""] * len(prompts), [], [len(prompts)]
    finished, lock = threading.Event(), threading.Lock()
    bar = progress_bars.bar(len(prompts), desc="generate_until", unit="request", enabled=progress)

    def collect(index: int):
        def emit(delta: Delta) -> None:  # the engine thread
            texts[index] += delta.text
            if delta.error is not None:
                errors.append(delta.error)
            if delta.finish_reason is not None or delta.error is not None:
                with lock:
                    left[0] -= 1
                    bar.update(1)
                    if left[0] == 0 or delta.error is not None:
                        finished.set()

        return emit

    engine.start()
    try:
        for index, (ids, s) in enumerate(zip(prompts, settings, strict=True)):
            stop_strings, stop_ids = _stop_settings(tokenizer, s["until"], engine.end_ids)
            engine.submit(
                Job(
                    ids,
                    collect(index),
                    max_tokens=s["max_gen_toks"],
                    temperature=s["temperature"],
                    top_p=s["top_p"],
                    top_k=s["top_k"],
                    seed=seed,
                    seed_index=index,
                    stop_ids=stop_ids,
                    stop_strings=stop_strings,
                )  # fmt: skip
            )
        finished.wait()
    finally:
        engine.stop()
        bar.close()
    if errors:
        raise RuntimeError(f"generation failed: {errors[0]}")
    return texts


# ---------------------------------------------------------------------------------------------------
# The lm-eval model.


class HarnessLM(TemplateLM):
    """An lm-eval model over a loaded jaxpatience model (see the module docstring).

    slots: rows the slot engine decodes at once (generate_until); batch_tokens: cache slots per scoring call
    (loglikelihood); max_length: the longest input (default: the model's context); seed: sampled generations'.
    """

    def __init__(
        self,
        model: Qwen2ForCausalLM,
        tokenizer,
        *,
        mesh=None,
        slots: int = 32,
        batch_tokens: int = 8192,
        max_length: int | None = None,
        seed: int = 1234,
        progress: bool = True,
        name: str = "jaxpatience",
    ):
        super().__init__()
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.slots, self.batch_tokens, self.seed, self.progress, self.name = slots, batch_tokens, seed, progress, name
        self._max_length = max_length or model.config.max_position_embeddings

    @classmethod
    def from_checkpoint(cls, path: str, adapter: str | None = None, *, param_dtype: str = "float32", mesh=None,
                        **kwargs) -> HarnessLM:  # fmt: skip
        """Load an HF directory or .gguf file (and a PEFT adapter), as `jaxpatience eval` loads it."""
        model, tokenizer = load_pretrained(path, param_dtype, mesh=mesh)
        if adapter:
            model = lora.load_adapter(model, adapter)
        return cls(model, tokenizer, mesh=mesh, name=str(path), **kwargs)

    # -- what TemplateLM asks of a model ----------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # the `hf` backend's: BOS when the tokenizer has one, else EOS
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's ids, with its special tokens unless asked otherwise (the `hf` backend's default)."""
        add = True if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_special_tokens=add)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings or None, context ids, continuation ids) -> (log-prob, greedy)."""
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = score_pairs(
            self.model,
            pairs,
            max_length=self.max_length,
            batch_tokens=self.batch_tokens,
            mesh=self.mesh,
            progress=self.progress and not disable_tqdm,
        )
        for (strings, _, _), answer in zip(requests, results, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-prob in disjoint windows of the model's context (the harness's windows), all scored in
        one `_loglikelihood_tokens` pass."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            for window in lm_utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append((None, *lm_utils.make_disjoint_window(window)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        prompts, settings = [], []
        for context, gen_kwargs in (request.args for request in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, 256)  # the `hf` backend's default budget
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            budget = kwargs.pop("max_gen_toks")
            if budget >= self.max_length:
                raise ValueError(f"max_gen_toks={budget} leaves no room for a prompt in {self.max_length} tokens.")
            sampled = kwargs.get("do_sample") and kwargs.get("temperature", 0.0) > 0
            prompts.append(self.tok_encode(context)[-(self.max_length - budget) :])  # cut on the left, as `hf` does
            settings.append(
                {
                    "until": until,
                    "max_gen_toks": budget,
                    "temperature": float(kwargs.get("temperature", 0.0)) if sampled else 0.0,
                    "top_p": float(kwargs.get("top_p") or 1.0),
                    "top_k": int(kwargs.get("top_k") or 0),
                }
            )
        texts = generate_texts(
            self.model,
            self.tokenizer,
            prompts,
            settings,
            slots=self.slots,
            seed=self.seed,
            mesh=self.mesh,
            progress=self.progress and not disable_tqdm,
        )
        for request, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


# ---------------------------------------------------------------------------------------------------
# Command line: `jaxpatience lm-eval ...` (cli.py dispatches here). The flags are aliases of EvalConfig keys.

FLAGS = {
    "--model": ("model", "HF checkpoint directory or .gguf file"),
    "--adapter": ("adapter", "a PEFT LoRA adapter directory to apply on top of --model"),
    "--limit": ("limit", "the first N documents of each task"),
    "--batch-size": ("generation_batch_size", "generate_until: rows decoded at once (default: 16)"),
    "--seed": ("sampling.seed", "sampled generations' seed (default: 0)"),
    "--dtype": ("param_dtype", "weight dtype: float32 or bfloat16 (default: float32)"),
    "--mesh": ("mesh", "e.g. data=8 or fsdp=4,tensor=2: weights and batches sharded over this host's devices"),
    "--out": ("out_dir", "write results.json (and samples_TASK.jsonl with --log-samples) here"),
}


def _parser():
    parser = command_parser(
        "jaxpatience lm-eval", "Run lm-evaluation-harness tasks on a Qwen2 checkpoint, in this process.", FLAGS
    )
    parser.add_argument("--tasks", required=True, help="comma-separated task names (lm-eval's, or from --include-path)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--include-path", help="a folder of task YAML files to add to lm-eval's own")
    parser.add_argument("--apply-chat-template", action="store_true", help="format prompts with the chat template")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="loglikelihood: cache slots per call")
    parser.add_argument("--log-samples", action="store_true", help="also write every request and answer")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(config: EvalConfig, tasks: list[str], args) -> dict:
    """Load the checkpoint, run the tasks, write the results; returns lm-eval's results dict."""
    import lm_eval  # the harness's entry point (its package was imported above, with its submodules)

    out = Path(config.out_dir) if config.out_dir else None
    if out is not None and (out / "results.json").exists():
        raise ConfigError(f"{out / 'results.json'} exists; choose another --out or move it away.")
    if sharding.initialize_distributed():
        raise ConfigError("lm-eval runs in one process; use --mesh over this host's devices instead.")
    mesh = _checkpoint_mesh(config, multihost=False)
    lm = HarnessLM.from_checkpoint(
        config.model, config.adapter, param_dtype=config.param_dtype, mesh=mesh, slots=config.generation_batch_size,
        batch_tokens=args.batch_tokens, seed=config.sampling.seed, progress=not args.no_progress,
    )  # fmt: skip
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=config.limit,
        apply_chat_template=args.apply_chat_template,
        task_manager=TaskManager(include_path=args.include_path),
        log_samples=args.log_samples,
        random_seed=config.sampling.seed,
    )
    if out is not None:
        outputs.mark(out, "lm-eval", "results")  # the folder, claimed by main() (durability/outputs.py)
        samples = results.pop("samples", {}) if args.log_samples else {}
        for task, records in samples.items():
            lines = (json.dumps(r, default=lm_utils.handle_non_serializable) for r in records)
            (out / f"samples_{task}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        text = json.dumps(results, indent=2, default=lm_utils.handle_non_serializable)
        (out / "results.json").write_text(text + "\n", encoding="utf-8")
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    config = config_from_args(EvalConfig, args)
    if not config.model:
        raise ConfigError("lm-eval: model is not set (--model CKPT).")
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise ConfigError("lm-eval: --tasks names no task.")
    if args.batch_tokens < 1:
        raise ConfigError(f"lm-eval: --batch-tokens must be >= 1, not {args.batch_tokens}.")
    if config.out_dir:
        check_output_dir(config.out_dir, "out_dir")
        outputs.claim_folder(config.out_dir, "lm-eval", "results", key="--out", inputs={"--model": config.model})
    if args.include_path and not Path(args.include_path).is_dir():
        raise ConfigError(f"lm-eval: --include-path {args.include_path} is not a folder.")
    results = run(config, tasks, args)
    print(lm_utils.make_table(results))
    if config.out_dir:
        print(f"wrote {Path(config.out_dir) / 'results.json'}")
    return 0
