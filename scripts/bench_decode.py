"""Decoding benchmarks: a fixed workload against transformers, and a varied one, slot engine against static batches.

    python scripts/bench_decode.py --model HF_DIR --batch-size 16 --prompt-len 64 --new-tokens 64
    python scripts/bench_decode.py --model qwen2-0.5b --workload varied --prompts 64 --batch-size 16
    python scripts/bench_decode.py --model toy --workload toy      # the toy demo's compiled programs

--model is an HF checkpoint directory, or a preset name from jaxpatience.config.PRESETS ("tiny",
"qwen2-0.5b", ...), in which case random weights are saved to a temporary directory first so that both sides
read the same weights (with --no-hf, or with --workload varied, which does not use transformers, a preset is
initialised in JAX directly and transformers is not used).

--workload fixed (the default): tokens/s and time-to-first-token of jaxpatience.generate against transformers'
generate. Both sides decode greedily from the same random prompts of exactly --prompt-len tokens and must produce
exactly --new-tokens tokens per row: ours is called with stop_tokens=[] (no stop token at all), transformers' with
min_new_tokens=N (it masks EOS until N tokens exist); the script checks the counts. Each figure is the best of
--repeats timed runs after one untimed warm-up run (compilation for us, lazy initialisation for torch):
tokens/s = batch * new_tokens / time of a full generate call; TTFT = time of a generate call with
max_new_tokens=1 (prompt encoding included on both sides, text decoding on ours). The last line printed is one
JSON object: tokens_per_s, ttft_s, hf_tokens_per_s, hf_ttft_s, ratio (ours over transformers'), batch,
prompt_len, new_tokens, device, plus, with --bandwidth-gbs, the memory-bandwidth bound on tokens/s (every decode
step reads all weights and the whole KV cache once).

--workload varied: answers of mixed lengths, as in a GSM8K evaluation. --prompts random prompts (numpy
default_rng(0)) of lengths uniform in 80..250 tokens, each with its own budget: a lognormal with median
180 * c tokens and sigma 0.5, rounded and clipped to [round(40 * c), --max-budget], where c = --max-budget / 512
(c = 1 by default: median 180, clip 40..512; a smaller --max-budget scales the whole distribution down, so a CPU
run keeps the spread of lengths that the comparison is about). No stop tokens (stop_tokens=[]): each row
stops exactly at its budget, and the useful tokens are the sum of the budgets. Both engines run in the same
process on the same model, prompts and budgets, with --batch-size rows decoded at once:

* slots (engine="slots"): one generate call with a Request(prompt, max_new_tokens=budget) per prompt and
  batch_size = the slot count; its EngineStats gives decode steps, slot steps (sum over decode steps of the slot
  count), prefills and inserts.
* static (engine="static"): the prompts are cut, in the order drawn (no sorting), into batches of --batch-size;
  each batch is one generate call with max_new_tokens = the batch's largest budget (the static engine takes one
  budget per call), so every row runs to its batch's longest row, which is exactly what static batching costs
  when rows stop at their own lengths. A row's useful tokens are its own budget (the first ones it generated).
  Its slot steps = sum over batches of rows x (largest budget - 1), rows being the batch's padded row count.

In both, a row's first token comes from its prefill, so a row with budget b takes b - 1 decode steps; the
occupancy is sum(b - 1) / slot steps. Both engines must return each row's budget worth of tokens (checked).
Each engine is timed as one untimed warm-up call on the same workload (compilation), then the best of
--repeats; useful tokens/s = sum of budgets / wall seconds (prefill included). A table is printed, and as the
last line one JSON object with both engines' figures, speedup (slots' useful tokens/s over static's), model,
dtype, device, slots and prompts; with --bandwidth-gbs, the bound on tokens/s with every slot busy (each decode
step reads all weights and every slot's whole KV cache once, at the slot engine's cache length).

--workload toy (with --model toy, a random model of the toy demo's shape: 3 layers, 128 wide, vocab 512): the
compiled programs of the demo's two generate workloads, each run once, cold, in one process, since compiling is
what they are about: held-out evaluation (200 greedy prompts, batch 128) and IRPO sampling (256 prompts x 8
samples at temperature 1, 1024 slots). Prompts of 28..48 random ids, budgets uniform in 8..96 (no stop tokens:
each row stops at its budget, as the toy's answers stop at their varied lengths). Printed per workload: wall
and CPU seconds, XLA programs compiled and their compile seconds, inserts, chunks, slot buckets, slot steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation / lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def save_random_checkpoint(preset_name: str, directory: Path, dtype: str) -> Path:
    """Random transformers Qwen2 weights with a preset's shape, saved as an HF checkpoint."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from jaxpatience.config import preset

    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in preset(preset_name).to_hf().items() if k != "torch_dtype"})
    Qwen2ForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(directory)
    return directory


def random_jax_model(preset_name: str, dtype: str, mesh):
    """A preset-shaped model with random weights made in JAX (no transformers, no files)."""
    from flax import nnx

    from jaxpatience import sharding
    from jaxpatience.config import preset
    from jaxpatience.model.qwen2 import Qwen2ForCausalLM

    config = preset(preset_name).replace(param_dtype=dtype, compute_dtype=dtype)

    def init():
        return nnx.split(Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))[1]

    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))))
    out_shardings = sharding.state_shardings(mesh, abstract_state) if mesh is not None else None
    state = jax.jit(init, out_shardings=out_shardings)()  # each weight is created in place, already sharded
    return nnx.merge(graphdef, state)


def bandwidth_bound(model, batch: int, cache_len: int, bandwidth_gbs: float) -> float:
    """Tokens/s if each decode step only had to read every weight and the whole KV cache once."""
    from flax import nnx

    config = model.config
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    kv_bytes = (2 * config.num_hidden_layers * batch * cache_len * config.num_key_value_heads
                * config.resolved_head_dim * np.dtype(config.compute_dtype).itemsize)  # fmt: skip
    return batch * bandwidth_gbs * 1e9 / (weight_bytes + kv_bytes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory or a preset name")
    parser.add_argument("--workload", default="fixed", choices=["fixed", "varied", "toy"])
    parser.add_argument("--prompts", type=int, default=64, help="varied: number of prompts")
    parser.add_argument("--max-budget", type=int, default=512, help="varied: the budgets' upper clip (scales them)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows at once (varied: slots = static batch)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the best is reported")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers (e.g. a 7B shape on a GPU)")
    parser.add_argument("--mesh", default="", help="e.g. 'data=2,tensor=4'; default: one device")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth for the bound")
    return parser.parse_args(argv)


def load(args: argparse.Namespace, tmp_dir: Path, mesh):
    """(model, tokenizer, path): the path is the HF checkpoint transformers reads (None with --no-hf on a preset).

    A preset gets random weights; presets have no tokenizer (prompts are ids and `.text` stays empty).
    """
    from jaxpatience import load_pretrained
    from jaxpatience.config import PRESETS
    from jaxpatience.model.weights import load_model

    path = Path(args.model)
    if args.model == "toy" and not path.exists():
        return toy_model(args.dtype), None, None
    if args.model in PRESETS and not path.exists():
        if args.no_hf or args.workload == "varied":
            return random_jax_model(args.model, args.dtype, mesh), None, None
        path = save_random_checkpoint(args.model, tmp_dir / args.model, args.dtype)
        return load_model(path, args.dtype, mesh=mesh), None, path
    model, tokenizer = load_pretrained(path, param_dtype=args.dtype, mesh=mesh)
    return model, tokenizer, path


def time_transformers(path: Path, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """transformers' greedy generate on the same prompts and weights: tokens/s, TTFT and torch's thread count."""
    import torch
    from transformers import Qwen2ForCausalLM

    batch, prompt_len, new_tokens = args.batch_size, args.prompt_len, args.new_tokens
    torch_model = Qwen2ForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    input_ids = torch.tensor(prompts)
    mask = torch.ones_like(input_ids)

    def theirs(max_new: int):
        with torch.no_grad():
            out = torch_model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                       max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=0)  # fmt: skip
        assert out.shape == (batch, prompt_len + max_new)

    hf_seconds = best_time(lambda: theirs(new_tokens), args.repeats)
    return dict(hf_tokens_per_s=batch * new_tokens / hf_seconds, hf_ttft_s=best_time(lambda: theirs(1), args.repeats),
                torch_threads=torch.get_num_threads())  # fmt: skip


def device_name() -> str:
    return f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{len(jax.devices())}"


def rounded(report: dict) -> dict:
    return {k: rounded(v) if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v
            for k, v in report.items()}  # fmt: skip


def run_fixed(args: argparse.Namespace, model, tokenizer, path: Path | None, mesh) -> dict:
    """The fixed workload: ours against transformers (see the module docstring)."""
    from jaxpatience import generate

    batch, prompt_len, new_tokens = args.batch_size, args.prompt_len, args.new_tokens
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size if tokenizer is None else min(len(tokenizer), model.config.vocab_size)
    prompts = rng.integers(0, vocab, size=(batch, prompt_len)).tolist()

    def ours(max_new: int):
        results = generate(model, tokenizer, prompts, max_new_tokens=max_new, stop_tokens=[], batch_size=batch,
                           mesh=mesh, progress=False)  # fmt: skip
        assert all(len(r.token_ids) == max_new for r in results)

    seconds = best_time(lambda: ours(new_tokens), args.repeats)
    report = dict(
        model=args.model,
        device=device_name(),
        dtype=args.dtype,
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        tokens_per_s=batch * new_tokens / seconds,
        ttft_s=best_time(lambda: ours(1), args.repeats),
        hf_tokens_per_s=None,
        hf_ttft_s=None,
        ratio=None,
    )
    if args.bandwidth_gbs:
        cache_len = 2 ** (prompt_len - 1).bit_length() + 2 ** (new_tokens - 1).bit_length()  # the bucketed S
        report["bandwidth_bound_tokens_per_s"] = bandwidth_bound(model, batch, cache_len, args.bandwidth_gbs)
    if not args.no_hf:
        report |= time_transformers(path, prompts, args)
        report["ratio"] = report["tokens_per_s"] / report["hf_tokens_per_s"]
    return report


def varied_workload(count: int, max_budget: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    """Prompts of 80..250 random ids and GSM8K-like budgets (lognormal, median 180 c, sigma 0.5, clipped), c =
    max_budget / 512."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(80, 251, size=count)
    prompts = [rng.integers(0, vocab, size=n).tolist() for n in lengths]
    scale = max_budget / 512
    draws = rng.lognormal(mean=np.log(180 * scale), sigma=0.5, size=count)
    budgets = np.clip(np.round(draws), max(1, round(40 * scale)), max_budget).astype(int).tolist()
    return prompts, budgets


def slots_engine(model, prompts: list[list[int]], budgets: list[int], slots: int, mesh) -> dict:
    """One slot-engine call; every row must return exactly its budget. Returns its EngineStats as a dict."""
    from jaxpatience.generation.api import EngineStats, Request, generate

    stats = EngineStats()
    requests = [Request(p, max_new_tokens=b) for p, b in zip(prompts, budgets, strict=True)]
    results = generate(model, None, requests, stop_tokens=[], batch_size=slots, engine="slots", mesh=mesh,
                       stats=stats, progress=False)  # fmt: skip
    assert [len(r.token_ids) for r in results] == budgets, "the slot engine missed a row's budget"
    assert stats.tokens == sum(budgets), (stats.tokens, sum(budgets))
    return dataclasses.asdict(stats)


def static_engine(model, prompts: list[list[int]], budgets: list[int], slots: int, mesh) -> dict:
    """Static batches of `slots` prompts in the given order, each run to its largest budget (module docstring)."""
    from jaxpatience import generate, sharding
    from jaxpatience.generation.shapes import bucket, round_up

    counts = dict(prefill_rows=0, batches=0, decode_steps=0, slot_steps=0, tokens=0)
    for start in range(0, len(prompts), slots):
        group, group_budgets = prompts[start : start + slots], budgets[start : start + slots]
        longest = max(group_budgets)
        results = generate(model, None, group, max_new_tokens=longest, stop_tokens=[], batch_size=slots,
                           engine="static", mesh=mesh, progress=False)  # fmt: skip
        assert all(len(r.token_ids) == longest for r in results), "a static row stopped before its batch"
        rows = min(slots, round_up(bucket(len(group)), sharding.batch_shards(mesh)))  # decode_static._pack_batch
        counts["prefill_rows"] += len(group)
        counts["batches"] += 1
        counts["decode_steps"] += longest - 1
        counts["slot_steps"] += rows * (longest - 1)
        counts["tokens"] += sum(min(b, len(r.token_ids)) for b, r in zip(group_budgets, results, strict=True))
    assert counts["tokens"] == sum(budgets)
    return counts


def time_engine(run, repeats: int) -> dict:
    """One untimed warm-up call, then the best of `repeats`; the figures of the last call, with its seconds."""
    last = {}

    def call():
        last.update(run())

    seconds = best_time(call, repeats)
    return dict(seconds=seconds, **last)


def run_varied(args: argparse.Namespace, model, vocab: int, mesh) -> dict:
    """Both engines on one varied workload; prints a table and returns the JSON report."""
    prompts, budgets = varied_workload(args.prompts, args.max_budget, vocab)
    slots, useful, ideal = args.batch_size, sum(budgets), sum(b - 1 for b in budgets)
    engines = {
        "slots": time_engine(lambda: slots_engine(model, prompts, budgets, slots, mesh), args.repeats),
        "static": time_engine(lambda: static_engine(model, prompts, budgets, slots, mesh), args.repeats),
    }
    for figures in engines.values():
        figures["useful_tokens_per_s"] = useful / figures["seconds"]
        figures["occupancy"] = ideal / figures["slot_steps"]
    lengths = [len(p) for p in prompts]
    report = dict(
        model=args.model, dtype=args.dtype, device=device_name(), workload="varied", slots=slots,
        prompts=len(prompts), max_budget=args.max_budget, useful_tokens=useful,
        prompt_len=dict(min=min(lengths), mean=float(np.mean(lengths)), max=max(lengths)),
        budget=dict(min=min(budgets), median=float(np.median(budgets)), mean=float(np.mean(budgets)),
                    max=max(budgets)),
        slots_engine=engines["slots"], static_engine=engines["static"],
        speedup=engines["slots"]["useful_tokens_per_s"] / engines["static"]["useful_tokens_per_s"],
    )  # fmt: skip
    if args.bandwidth_gbs:
        cache_len = bucket16(max(lengths)) + bucket16(max(budgets))  # the slot engine's S
        report["bandwidth_bound_tokens_per_s"] = bandwidth_bound(model, slots, cache_len, args.bandwidth_gbs)
    print_table(report)
    return report


def toy_model(dtype: str):
    """A random model of the toy demo's shape (configs/toy.yaml)."""
    from flax import nnx

    from jaxpatience.config import ModelConfig
    from jaxpatience.model.qwen2 import Qwen2ForCausalLM

    config = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         param_dtype=dtype, compute_dtype=dtype)  # fmt: skip
    return Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))


def run_toy(args: argparse.Namespace, model, mesh) -> dict:
    """The toy demo's generate workloads, each once and cold: programs compiled, seconds, the engine's stats."""
    from jaxpatience.generation.api import EngineStats, Request, generate

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compiles.append(duration)
        if event == "/jax/core/compile/backend_compile_duration" else None
    )  # fmt: skip
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size

    def requests(count: int) -> list:
        return [Request(rng.integers(0, vocab, int(rng.integers(28, 49))).tolist(),
                        max_new_tokens=int(rng.integers(8, 97))) for _ in range(count)]  # fmt: skip

    workloads = {
        "eval (200 x 1, greedy, batch 128)": (requests(200), dict(batch_size=128)),
        "irpo (256 x 8, temperature 1, 1024 slots)": (requests(256), dict(batch_size=1024, num_samples=8,
                                                                           temperature=1.0)),
    }  # fmt: skip
    report = dict(model=args.model, dtype=args.dtype, device=device_name(), workload="toy")
    print(f"{'workload':<44}{'wall s':>8}{'CPU s':>8}{'programs':>10}{'compile s':>11}{'inserts':>9}{'chunks':>8}"
          f"{'slot steps':>12}  slot buckets")  # fmt: skip
    for name, (batch, kwargs) in workloads.items():
        stats, before = EngineStats(), len(compiles)
        start, cpu = time.perf_counter(), time.process_time()
        generate(model, None, batch, stop_tokens=[], stats=stats, progress=False, mesh=mesh, **kwargs)
        figures = dict(seconds=time.perf_counter() - start, cpu_s=time.process_time() - cpu,
                       programs=len(compiles) - before, compile_s=sum(compiles[before:]),
                       **dataclasses.asdict(stats))  # fmt: skip
        report[name] = figures
        print(f"{name:<44}{figures['seconds']:>8.1f}{figures['cpu_s']:>8.1f}{figures['programs']:>10}"
              f"{figures['compile_s']:>11.1f}{stats.inserts:>9}{stats.chunks:>8}{stats.slot_steps:>12}  "
              f"{stats.slot_buckets}")  # fmt: skip
    return report


def bucket16(n: int) -> int:
    return max(16, 2 ** (n - 1).bit_length())


def print_table(report: dict) -> None:
    slots, static = report["slots_engine"], report["static_engine"]
    budget = report["budget"]
    print(f"{report['model']} {report['dtype']} on {report['device']}: {report['prompts']} prompts of "
          f"{report['prompt_len']['min']}..{report['prompt_len']['max']} tokens, budgets {budget['min']}.."
          f"{budget['max']} (median {budget['median']:.0f}, mean {budget['mean']:.1f}), {report['slots']} slots, "
          f"{report['useful_tokens']} useful tokens")  # fmt: skip
    print(f"{'engine':<8}{'wall s':>10}{'useful tok/s':>14}{'decode steps':>14}{'slot steps':>12}"
          f"{'occupancy':>11}{'prefills':>10}{'calls':>7}")  # fmt: skip
    for name, figures, calls in (("slots", slots, slots["inserts"]), ("static", static, static["batches"])):
        print(f"{name:<8}{figures['seconds']:>10.3f}{figures['useful_tokens_per_s']:>14.1f}"
              f"{figures['decode_steps']:>14}{figures['slot_steps']:>12}{figures['occupancy']:>11.3f}"
              f"{figures['prefill_rows']:>10}{calls:>7}")  # fmt: skip
    print(f"speedup (useful tokens/s, slots / static): {report['speedup']:.3f}; static / slots slot steps: "
          f"{static['slot_steps'] / slots['slot_steps']:.3f}; slots: {slots['chunks']} chunks, slot buckets "
          f"{slots['slot_buckets']}")  # fmt: skip


def main() -> None:
    args = parse_args()
    from jaxpatience.sharding import make_mesh, parse_mesh

    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    tmp = tempfile.TemporaryDirectory()
    model, tokenizer, path = load(args, Path(tmp.name), mesh)
    if args.workload == "fixed":
        report = run_fixed(args, model, tokenizer, path, mesh)
    elif args.workload == "toy":
        report = run_toy(args, model, mesh)
    else:
        vocab = model.config.vocab_size if tokenizer is None else min(len(tokenizer), model.config.vocab_size)
        report = run_varied(args, model, vocab, mesh)
    tmp.cleanup()
    print(json.dumps(rounded(report)))


if __name__ == "__main__":
    main()
