"""Packed rows against padded buckets: real tokens per second of the train step, in one process, per attention.

    python scripts/bench_packing.py --lengths patience --steps 4
    python scripts/bench_packing.py --lengths short,patience,long --runs padded:auto,packed:auto --steps 3
    python scripts/bench_packing.py --attention-only --runs padded:xla,packed:xla,padded:blocked,packed:blocked

Random pairs with ragged lengths (uniform in each range; `LENGTHS`) go through the PairLoader twice: padded into
`--buckets` (one [B, 2, T] batch per bucket) and packed into rows of the largest bucket. Each run (`LAYOUT:ATTENTION`,
attention as train.attention takes it) trains a fresh LoRA DPO trainer of the same random model on the same
pairs: every batch shape (rows, tile pairs) is compiled first, untimed, then `--steps` batches are timed, the
runs' steps interleaved so that a shared machine's changing load reaches them alike. Real
tokens/s counts the sequences' tokens, not padding. The attention share is attention alone (forward and backward
of one layer's attention on each batch's shapes, jitted and timed apart, times the layers) over the step time: an
estimate, the step also fuses and schedules around it.

The last line printed is one JSON object: per length distribution, per run, tokens/s, padding share, step s,
compile s and attention share, and the ratios of each run's tokens/s to the first run's (`--attention-only`: each
run's attention seconds per step, and the first run's over each).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpatience import training
from jaxpatience.config import LoraConfig, LossConfig, MeshConfig, OptimizerConfig, TrainConfig, preset
from jaxpatience.data import packing
from jaxpatience.data.pairs import EncodedPair, PairLoader
from jaxpatience.model import attention
from jaxpatience.model.qwen2 import Qwen2ForCausalLM

LENGTHS = packing.LENGTH_PRESETS  # (prompt, chosen, rejected) token ranges, shared with `jaxpatience plan --packed`
SHAPE = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
             num_key_value_heads=2, vocab_size=4096)  # fmt: skip


def ragged_pairs(name: str, count: int, max_length: int, vocab: int, seed: int = 0) -> list[EncodedPair]:
    """`count` random pairs with `LENGTHS[name]`; responses cut so that a sequence fits max_length."""
    rng = np.random.default_rng(seed)
    ids = lambda span: rng.integers(1, vocab, size=int(rng.integers(span[0], span[1] + 1))).astype(np.int32)
    (prompt, chosen, rejected), pairs = LENGTHS[name], []
    for _ in range(count):
        p = ids(prompt)[: max_length // 2]
        room = max_length - len(p)
        pairs.append(EncodedPair(p, ids(chosen)[:room], ids(rejected)[:room]))
    return pairs


def shapes_of(batch: dict) -> tuple:
    return tuple(sorted((k, np.shape(v)) for k, v in batch.items()))


def attention_seconds(batch: dict, model_config, implementation: str) -> float:
    """One layer's attention, forward and backward, on this batch's row layout (random q, k, v)."""
    packed = "segment_ids" in batch
    mask = batch["attention_mask"]
    segments = jnp.asarray(batch["segment_ids"] if packed else mask.reshape(-1, mask.shape[-1]))
    count = batch["segment_pairs"].shape[1] if packed else 1
    rows, length = segments.shape
    heads, kv, dim = model_config.num_attention_heads, model_config.num_key_value_heads, model_config.resolved_head_dim
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(rows, length, h, dim)), jnp.float32) for h in (heads, kv, kv))
    dense = jnp.tril(jnp.ones((length, length), bool))[None] & (segments[:, :, None] == segments[:, None, :])
    mask = attention.RowMask(dense & (segments[:, :, None] > 0), segments, count, batch.get("attention_blocks"))
    loss = lambda q, k, v: jnp.sum(attention.attend_rows(q, k, v, mask, implementation) ** 2)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v))
    start = time.perf_counter()
    jax.block_until_ready(step(q, k, v))
    return time.perf_counter() - start


def prepare(layout: str, choice: str, pairs, args, model):
    """A fresh trainer for one layout and attention choice, its batches, and its compile time (every shape)."""
    config = TrainConfig(mesh=MeshConfig(), lora=LoraConfig(rank=16), loss=LossConfig(dpo_weight=1.0),
                         optimizer=OptimizerConfig(learning_rate=1e-5), batch_size=args.batch_size,
                         attention=choice)  # fmt: skip
    loader = PairLoader(pairs, args.batch_size, tuple(args.buckets), pad_id=0, seed=0, packing=layout == "packed")
    hosts = [loader.make_batch(bucket, indices) for bucket, indices in loader.plan(0)[: args.steps]]
    batches = [training.device_batch(b) for b in hosts]
    trainer = training.create_trainer(nnx.merge(*nnx.split(model)), config, training.make_mesh(config.mesh))
    start, seen = time.perf_counter(), set()
    for batch in batches:
        if shapes_of(batch) not in seen:
            seen.add(shapes_of(batch))
            jax.block_until_ready(trainer.step(batch))
    return trainer, hosts, batches, {"compile_s": round(time.perf_counter() - start, 1), "shapes": len(seen)}


def attention_only(name: str, pairs, args, model) -> list[dict]:
    """`--attention-only`: each run's attention alone (forward and backward, all layers) per step, no trainer."""
    results = []
    for layout, choice in args.runs:
        loader = PairLoader(pairs, args.batch_size, tuple(args.buckets), pad_id=0, seed=0, packing=layout == "packed")
        hosts = [loader.make_batch(bucket, indices) for bucket, indices in loader.plan(0)[: args.steps]]
        implementation = training.resolve_attention(choice, model.config.compute_dtype)
        layers = model.config.num_hidden_layers
        seconds = sum(attention_seconds(b, model.config, implementation) for b in hosts) * layers / len(hosts)
        result = {"layout": layout, "attention": implementation, "attention_s_per_step": round(seconds, 3)}
        print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
        results.append(result)
    return results


def run_all(name: str, pairs, args, model) -> list[dict]:
    """Every run's steps interleaved (batch i of each run, then batch i + 1): a shared machine's load changes
    reach every run alike."""
    prepared = [prepare(layout, choice, pairs, args, model) for layout, choice in args.runs]
    times = [[] for _ in prepared]
    for i in range(args.steps):
        for run, (trainer, _, batches, _) in enumerate(prepared):
            start = time.perf_counter()
            jax.block_until_ready(trainer.step(batches[i]))
            times[run].append(time.perf_counter() - start)
    results = []
    for (layout, _), (trainer, hosts, batches, compiled), took in zip(args.runs, prepared, times, strict=True):
        real = sum(int(b["attention_mask"].sum()) for b in hosts)
        slots = sum(b["attention_mask"].size for b in hosts)
        implementation = trainer.config.attention
        layers = model.config.num_hidden_layers
        attention_s = sum(attention_seconds(b, model.config, implementation) for b in batches) * layers
        result = {"layout": layout, "attention": implementation, "tokens_per_s": round(real / sum(took), 1),
                  "padding_share": round(1 - real / slots, 4), "step_s": round(sum(took) / len(took), 3),
                  **compiled, "attention_share": round(attention_s / sum(took), 3)}  # fmt: skip
        print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
        results.append(result)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="patience", help=f"comma-separated, of {', '.join(LENGTHS)}")
    parser.add_argument(
        "--runs",
        default="padded:xla,padded:auto,packed:xla,packed:auto",
        help="comma-separated LAYOUT:ATTENTION (padded or packed; auto, xla, blocked, einsum)",
    )
    parser.add_argument("--buckets", default="256,512,1024", help="padded buckets; packed rows are the largest")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed batches per run")
    parser.add_argument("--attention-only", action="store_true", help="time each run's attention alone, no step")
    parser.add_argument("--shape", default=",".join(f"{k}={v}" for k, v in SHAPE.items()),
                        help="fields of the tiny preset to override")  # fmt: skip
    args = parser.parse_args(argv)
    args.buckets = [int(b) for b in args.buckets.split(",")]
    args.lengths = args.lengths.split(",")
    args.runs = [tuple(r.split(":")) for r in args.runs.split(",")]
    unknown = [n for n in args.lengths if n not in LENGTHS] + [r for r in args.runs if len(r) != 2]
    if unknown:
        parser.error(f"unknown lengths or runs: {unknown}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fields = dict(item.split("=") for item in args.shape.split(",") if item)
    model_config = preset("tiny").replace(**{k: int(v) for k, v in fields.items()})
    model = Qwen2ForCausalLM(model_config, rngs=nnx.Rngs(0))
    print(f"model {model_config.hidden_size}d x {model_config.num_hidden_layers} layers, devices {jax.devices()}",
          file=sys.stderr)  # fmt: skip
    report = {}
    for name in args.lengths:
        pairs = ragged_pairs(name, args.batch_size * (args.steps + 4), args.buckets[-1], model_config.vocab_size)
        if args.attention_only:
            results = attention_only(name, pairs, args, model)
            first = results[0]["attention_s_per_step"]
            for result in results:
                result["first_over_this"] = round(first / result["attention_s_per_step"], 2)
        else:
            results = run_all(name, pairs, args, model)
            first = results[0]["tokens_per_s"]
            for result in results:
                result["vs_first"] = round(result["tokens_per_s"] / first, 2)
        report[name] = results
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
