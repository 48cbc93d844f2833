"""Benchmark the train step: prints, last, one JSON line with tokens_per_s, padding_share, step_s, compile_s, mfu.

    python scripts/bench_train.py --model tiny --batch-size 2 --seq-len 128 --steps 3
    python scripts/bench_train.py --model qwen2-7b --batch-size 8 --seq-len 1024 --mesh fsdp=8 \
        --dtype bfloat16 --remat lora --peak-flops 989e12
    python scripts/bench_train.py --model tiny --batch-size 8 --seq-len 1024 --lengths patience --packing
    python scripts/bench_train.py --model qwen2-7b --batch-size 8 --seq-len 1024 --dtype bfloat16 --aot

`--model` is a preset of jaxpatience.config.PRESETS (random weights) or an HF checkpoint directory.
B counts pairs; T is the length of each of chosen and rejected, so a step processes 2·B·T token slots. With
`--lengths patience` the pairs are ragged (the Patience data's lengths) and go through the PairLoader, padded
into buckets or `--packing` packed rows; tokens_per_s then counts real tokens only and padding_share the rest.
Each batch shape compiles once first (compile_s, untimed). `--lora-rank 0` trains every parameter (DPO then
uses reference log-probs precomputed once, outside the timing). `--aot` only lowers and compiles the step from
abstract shapes (training.lower_abstract_step): compile time, memory and FLOPs of any preset on any machine.

MFU = model FLOPs per step / step time / (peak FLOP/s per device × devices). Model FLOPs per token count the
matmuls (2 per weight: every linear layer and the LM head) plus attention scores and values counted causally
(4·(T/2)·N·H per layer: a query sees T/2 keys on average; before 0.3 this counted the full square): F forward;
the step is F (policy) + F (input gradients) + F (weight gradients, full-parameter only) + F (in-step
reference, LoRA DPO only) — 6N per token for LoRA DPO. Recomputation under remat is not counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxpatience import sharding, training
from jaxpatience.config import (
    PRESETS,
    ConfigError,
    LoraConfig,
    LossConfig,
    MeshConfig,
    OptimizerConfig,
    TrainConfig,
    preset,
)
from jaxpatience.data.pairs import EncodedPair, PairLoader, default_buckets
from jaxpatience.model.qwen2 import Qwen2ForCausalLM
from jaxpatience.planning import roofline

LOSSES = {"dpo": LossConfig(), "irpo": LossConfig(nll_weight=1.0), "sft": LossConfig(dpo_weight=0.0, nll_weight=1.0)}


def random_model(config, mesh, seed: int = 0) -> Qwen2ForCausalLM:
    """Random weights created directly in their shardings (never whole on one device)."""
    make = lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.state(make()), out_shardings=sharding.state_shardings(mesh, abstract))()
    return nnx.merge(graphdef, state)


model_flops_per_token = roofline.forward_flops_per_token  # the convention of the module docstring


def peak_memory_gb() -> tuple[float, str]:
    """Peak device memory over the local devices, or the process's peak RSS where devices do not report it."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        return max(s["peak_bytes_in_use"] for s in stats) / 2**30, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host_rss"  # ru_maxrss is in KiB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"preset ({', '.join(sorted(PRESETS))}) or HF directory")
    parser.add_argument("--batch-size", type=int, required=True, help="pairs per step (B)")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens of each of chosen and rejected (T)")
    parser.add_argument("--mesh", default="data=-1", help="e.g. data=2,fsdp=2,tensor=2 (default: all data)")
    parser.add_argument("--lora-rank", type=int, default=16, help="0 = full-parameter training")
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after one compilation step")
    parser.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of one device, for MFU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and matmuls")
    parser.add_argument("--loss", default="dpo", choices=sorted(LOSSES))
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots", "lora"])
    parser.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "einsum"])
    parser.add_argument("--unrolled", action="store_true", help="L unrolled layers instead of one scanned layer")
    parser.add_argument("--lengths", default="full", choices=["full", "patience"],
                        help="full: every sequence T tokens; patience: ragged pairs (prompt 60-250, chosen 150-700, "
                        "rejected 50-300 tokens, cut to T) through the PairLoader")  # fmt: skip
    parser.add_argument("--packing", action="store_true", help="with --lengths patience: packed rows")
    parser.add_argument("--shape", default="", help="preset fields to override, e.g. hidden_size=512,vocab_size=8192")
    parser.add_argument(
        "--aot",
        action="store_true",
        help="only compile, from abstract shapes (nothing materialised): compile time, memory, FLOPs",
    )
    parser.add_argument(
        "--topology",
        default=None,
        help="with --aot: compile for abstract TPU devices, e.g. v5p:4x4x4 (needs jax[tpu]'s libtpu)",
    )
    return parser.parse_args(argv)  # fmt: skip


def setup(args: argparse.Namespace) -> tuple[TrainConfig, Mesh, Qwen2ForCausalLM]:
    """The train config, its mesh and the model (loaded, or random in its shardings); ValueError on bad flags."""
    config = TrainConfig(
        mesh=MeshConfig(**sharding.parse_mesh(args.mesh)),
        lora=LoraConfig(rank=args.lora_rank) if args.lora_rank > 0 else None,
        loss=LOSSES[args.loss],
        optimizer=OptimizerConfig(learning_rate=1e-5),
        batch_size=args.batch_size,
        micro_batches=args.micro_batches,
        remat=args.remat,
        attention=args.attention,
        scan_layers=not args.unrolled,
    )
    if args.aot and args.topology:  # abstract TPU devices: nothing runs, XLA's TPU compiler only compiles
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
        return config, sharding.make_mesh(**sharding.parse_mesh(args.mesh), devices=devices), None
    mesh = training.make_mesh(config.mesh)
    if args.aot:
        return config, mesh, None
    if Path(args.model).is_dir():
        from jaxpatience.model.weights import load_model

        return config, mesh, load_model(args.model, args.dtype, mesh=mesh)
    return config, mesh, random_model(model_shape(args), mesh)


def model_shape(args: argparse.Namespace):
    """The preset in the benchmark's dtype, with `--shape` overrides (integers)."""
    fields = dict(item.split("=", 1) for item in args.shape.split(",") if item)
    overrides = {key: int(value) for key, value in fields.items()}
    return preset(args.model).replace(param_dtype=args.dtype, compute_dtype=args.dtype, **overrides)


def random_batch(batch_size: int, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Random pairs [B, 2, T], every token real; the loss counts the second half of each sequence (the response)."""
    rng = np.random.default_rng(0)
    shape = (batch_size, 2, seq_len)
    return {
        "input_ids": rng.integers(0, vocab_size, size=shape).astype(np.int32),
        "attention_mask": np.ones(shape, np.int32),
        "loss_mask": np.broadcast_to(np.arange(seq_len) >= seq_len // 2, shape).astype(np.int32),
    }


def patience_loader(args: argparse.Namespace, mesh: Mesh, vocab_size: int) -> PairLoader:
    """Random pairs with the Patience data's lengths (uniform in each range), padded into the default buckets
    or packed; enough of them for the warm-up and the timed steps."""
    rng = np.random.default_rng(0)
    ids = lambda low, high: rng.integers(0, vocab_size, size=int(rng.integers(low, high + 1))).astype(np.int32)
    pairs = []
    for _ in range(args.batch_size * (args.steps + 8)):
        prompt = ids(60, 250)[-args.seq_len // 2 :]
        room = args.seq_len - len(prompt)
        pairs.append(EncodedPair(prompt, ids(150, 700)[:room], ids(50, 300)[:room]))
    return PairLoader(pairs, args.batch_size, default_buckets(args.seq_len), pad_id=0, seed=0, packing=args.packing,
                      micro_batches=args.micro_batches, chosen_only=args.loss == "sft",  # as training/loop.py packs SFT
                      row_multiple=training.packed_row_multiple(args.micro_batches, mesh))  # fmt: skip


def time_loader_steps(trainer, loader: PairLoader, steps: int) -> tuple[float, list[float], int, int]:
    """(compile_s, step times, real tokens, token slots): every batch shape of the plan is compiled (one step
    each, untimed) before `steps` timed steps over the plan's batches."""
    hosts = [loader.make_batch(bucket, indices) for bucket, indices in loader.plan(0)[:steps]]
    batches = [training.device_batch(b) for b in hosts]
    if trainer.config.lora is None and trainer.config.loss.dpo_weight:  # full-parameter DPO: precomputed reference
        logps = training.make_logps_fn(trainer)
        batches = [b | {"ref_logps": np.asarray(logps(b))} for b in batches]
    start, seen = time.perf_counter(), set()
    for batch in batches:
        if batch["input_ids"].shape not in seen:
            seen.add(batch["input_ids"].shape)
            jax.block_until_ready(trainer.step(batch))
    compile_s = time.perf_counter() - start
    times = []
    for batch in batches:
        start = time.perf_counter()
        jax.block_until_ready(trainer.step(batch))
        times.append(time.perf_counter() - start)
    real = sum(int(b["attention_mask"].sum()) for b in hosts)
    return compile_s, times, real, sum(b["attention_mask"].size for b in hosts)


def aot(args: argparse.Namespace, config: TrainConfig, mesh: Mesh) -> dict:
    """Lower and compile the step from abstract shapes; what the compiled program says about itself."""
    model_config = model_shape(args)
    batch = random_batch(args.batch_size, args.seq_len, model_config.vocab_size)
    if config.lora is None and config.loss.dpo_weight:  # full-parameter DPO carries precomputed reference log-probs
        batch["ref_logps"] = np.zeros((args.batch_size, 2), np.float32)
    start = time.perf_counter()
    lowered = training.lower_abstract_step(model_config, config, mesh, batch)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    gb = lambda name: round(getattr(memory, name, 0) / 2**30, 3) if memory is not None else None
    return {"model": args.model, "dtype": args.dtype, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "mesh": dict(mesh.shape), "devices": f"{mesh.size}x {mesh.devices.flat[0].device_kind}",
            "loss": args.loss, "remat": args.remat, "scan_layers": config.scan_layers,
            "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2), "argument_gb": gb("argument_size_in_bytes"),
            "temp_gb": gb("temp_size_in_bytes"), "output_gb": gb("output_size_in_bytes"),
            "xla_flops": (cost or {}).get("flops")}  # fmt: skip


def time_steps(trainer, batch: dict[str, np.ndarray], steps: int) -> tuple[float, list[float]]:
    """(compile_s, step times): the first step compiles and is timed apart; each step waits for its metrics."""
    start = time.perf_counter()
    jax.block_until_ready(trainer.step(batch))
    compile_s = time.perf_counter() - start
    times = []
    for step in range(steps):
        start = time.perf_counter()
        metrics = jax.block_until_ready(trainer.step(batch))
        times.append(time.perf_counter() - start)
        print(f"step {step + 1}/{steps}: {times[-1]:.3f}s loss {float(metrics['loss']):.4f}", file=sys.stderr)
    return compile_s, times


def measure(args: argparse.Namespace, trainer, batch: dict[str, np.ndarray], mesh: Mesh, vocab_size: int):
    """(compile_s, step_s, real tokens per step, padding share) on fixed or Patience-like lengths."""
    if args.lengths == "patience":
        loader = patience_loader(args, mesh, vocab_size)
        compile_s, times, real, slots = time_loader_steps(trainer, loader, args.steps)
        return compile_s, sum(times) / len(times), real / len(times), 1 - real / slots  # mean: batches differ
    compile_s, times = time_steps(trainer, batch, args.steps)
    return compile_s, statistics.median(times), 2 * args.batch_size * args.seq_len, 0.0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, mesh, model = setup(args)
    except (ConfigError, ValueError) as err:
        print(f"bench_train: {err}", file=sys.stderr)
        return 2
    if args.aot:
        print(json.dumps(aot(args, config, mesh)))
        return 0
    model_config = model.config
    total_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    batch = random_batch(args.batch_size, args.seq_len, model_config.vocab_size)
    start = time.perf_counter()
    trainer = training.create_trainer(model, config, mesh)
    del model  # the trainer holds the (split) weights now
    if config.lora is None and config.loss.dpo_weight:  # full-parameter DPO: reference log-probs precomputed
        batch["ref_logps"] = np.asarray(training.make_logps_fn(trainer)(batch))
    setup_s = time.perf_counter() - start
    trainable = sum(x.size for x in jax.tree.leaves(trainer.state.params))
    compile_s, step_s, tokens, padding_share = measure(args, trainer, batch, mesh, model_config.vocab_size)
    passes = roofline.train_passes(config.lora is not None, config.loss.dpo_weight, reference_in_step=True)
    flops = passes * model_flops_per_token(model_config, args.seq_len) * tokens
    peak_mem, mem_source = peak_memory_gb()
    result = {
        "model": args.model,
        "params": int(total_params),
        "trainable_params": int(trainable),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "mesh": dict(mesh.shape),
        "devices": f"{mesh.size}x {jax.devices()[0].device_kind}",
        "lora_rank": args.lora_rank,
        "loss": args.loss,
        "micro_batches": args.micro_batches,
        "remat": args.remat,
        "steps": args.steps,
        "setup_s": round(setup_s, 3),
        "compile_s": round(compile_s, 3),
        "step_s": round(step_s, 4),
        "lengths": args.lengths,
        "packing": args.packing,
        "attention": trainer.config.attention,
        "scan_layers": config.scan_layers,
        "tokens_per_s": round(tokens / step_s, 2),  # real (non-padding) tokens
        "padding_share": round(padding_share, 4),
        "model_flops_per_step": flops,
        "peak_mem_gb": round(peak_mem, 3),
        "peak_mem_source": mem_source,
        "mfu": None if args.peak_flops is None else round(flops / step_s / (args.peak_flops * mesh.size), 4),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
