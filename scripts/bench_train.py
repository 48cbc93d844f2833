"""Benchmark the train step: prints, last, one JSON line with tokens_per_s, step_s, peak_mem_gb and mfu.

    python scripts/bench_train.py --model tiny --batch-size 2 --seq-len 128 --steps 3
    python scripts/bench_train.py --model qwen2-7b --batch-size 8 --seq-len 1024 --mesh fsdp=8 \
        --dtype bfloat16 --remat full --peak-flops 989e12

`--model` is a preset of jaxpatience.config.PRESETS (random weights) or an HF checkpoint directory.
B counts pairs; T is the length of each of chosen and rejected, so a step processes 2·B·T tokens. The first
step (compilation) is timed separately and not counted. `--lora-rank 0` trains every parameter (DPO then uses
reference log-probs precomputed once, outside the timing).

MFU = model FLOPs per step / step time / (peak FLOP/s per device × devices). Model FLOPs per token count the
matmuls (2 per weight: every linear layer and the LM head) plus attention scores and values (4·T·N·H per layer,
the full square as computed): F forward; the step is F (policy) + F (input gradients) + F (weight gradients,
full-parameter only) + F (in-step reference, LoRA DPO only). Recomputation under remat is not counted.
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

from jaxpatience import sharding, train
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
from jaxpatience.model import Qwen2ForCausalLM

LOSSES = {"dpo": LossConfig(), "irpo": LossConfig(nll_weight=1.0), "sft": LossConfig(dpo_weight=0.0, nll_weight=1.0)}


def random_model(config, mesh, seed: int = 0) -> Qwen2ForCausalLM:
    """Random weights created directly in their shardings (never whole on one device)."""
    make = lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.state(make()), out_shardings=sharding.state_shardings(mesh, abstract))()
    return nnx.merge(graphdef, state)


def model_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs per token: 2 per matmul weight, plus attention (see the module docstring)."""
    d, f, n, k, h = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                     config.num_key_value_heads, config.resolved_head_dim)  # fmt: skip
    per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f  # q, o; k, v; gate, up, down
    matmul_weights = config.num_hidden_layers * per_layer + config.vocab_size * d  # + LM head
    return 2.0 * matmul_weights + config.num_hidden_layers * 4.0 * seq_len * n * h


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
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    return parser.parse_args(argv)


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
    )
    mesh = train.make_mesh(config.mesh)
    if Path(args.model).is_dir():
        from jaxpatience.weights import load_model

        return config, mesh, load_model(args.model, args.dtype, mesh=mesh)
    model_config = preset(args.model).replace(param_dtype=args.dtype, compute_dtype=args.dtype)
    return config, mesh, random_model(model_config, mesh)


def random_batch(batch_size: int, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Random pairs [B, 2, T], every token real; the loss counts the second half of each sequence (the response)."""
    rng = np.random.default_rng(0)
    shape = (batch_size, 2, seq_len)
    return {
        "input_ids": rng.integers(0, vocab_size, size=shape).astype(np.int32),
        "attention_mask": np.ones(shape, np.int32),
        "loss_mask": np.broadcast_to(np.arange(seq_len) >= seq_len // 2, shape).astype(np.int32),
    }


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, mesh, model = setup(args)
    except (ConfigError, ValueError) as err:
        print(f"bench_train: {err}", file=sys.stderr)
        return 2
    model_config = model.config
    total_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    batch = random_batch(args.batch_size, args.seq_len, model_config.vocab_size)
    start = time.perf_counter()
    trainer = train.create_trainer(model, config, mesh)
    del model  # the trainer holds the (split) weights now
    if config.lora is None and config.loss.dpo_weight:  # full-parameter DPO: reference log-probs precomputed
        batch["ref_logps"] = np.asarray(train.make_logps_fn(trainer)(batch))
    setup_s = time.perf_counter() - start
    trainable = sum(x.size for x in jax.tree.leaves(trainer.state.params))
    compile_s, times = time_steps(trainer, batch, args.steps)

    step_s = statistics.median(times) if times else float("nan")
    tokens = 2 * args.batch_size * args.seq_len
    passes = 2 + (config.lora is None) + (config.lora is not None and config.loss.dpo_weight > 0)
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
        "tokens_per_s": round(tokens / step_s, 2),
        "model_flops_per_step": flops,
        "peak_mem_gb": round(peak_mem, 3),
        "peak_mem_source": mem_source,
        "mfu": None if args.peak_flops is None else round(flops / step_s / (args.peak_flops * mesh.size), 4),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
