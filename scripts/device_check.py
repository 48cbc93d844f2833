"""One prepared device check: the LoRA-DPO train step, the slot engine and a GSM8K-sized decode, each measured
beside the sharding lab's prediction for the same job on the same device; JSON out, rewritten as each part ends.

    python scripts/device_check.py --out device_check.json              # --preset 7b on a GPU, tiny elsewhere
    python scripts/device_check.py --preset tiny --out /tmp/check.json  # the CPU, in seconds (tests run this)
    PYTHONPATH=. python3 scripts/device_check.py --preset 7b --budget-s 480 --out "$OUT/device_check.json"

Nothing is downloaded: the model has random weights of the preset's shape (`qwen2-7b`: Qwen2-7B's, made in bf16
on the device, each weight in place), and the data are random token ids with the shapes of the real workloads.
Timing does not depend on weight or token values; rows are decoded with no stop token, so each runs to its budget.

Stages, most important first. Each starts only while the time budget (`--budget-s`, counted from the start)
leaves room for it; the JSON is rewritten whole (temporary file, then rename) when a stage starts ("running"),
after its measurement and after its prediction, so a run killed from outside keeps what it finished.

1. **train**: the LoRA (r16) DPO + NLL step of `jaxpatience train` (training.create_trainer, the config the
   lab's rows.train_config builds), bf16, attention `auto` (cuDNN on a GPU), remat `full`, at the per-device
   share of configs/qwen2_7b_patience_8gpu.yaml: 8 pairs per step (64 over 8 GPUs) in 2 micro-batches, packed
   into rows of 1024 tokens. Pairs have scripts/bench_train.py's Patience lengths (prompt 60-250, chosen
   150-700, rejected 50-300 tokens, cut to 1024) and go through the PairLoader as training packs them; only
   batches of its most common row count R are timed (one compilation). The first step (compile_s) is apart,
   then `steps` steps, each waited for. MFU = model FLOPs / step time / the chip's peak bf16 FLOP/s, with
   bench_train's FLOPs (3 forward passes a real token for LoRA DPO; remat's recomputation not counted). The
   yaml's LoRA dropout (0.05) is left out: the measured step is the program the lab predicts.
2. **decode**: `generate(engine="slots")` with 256 slots on the first 512 of 1319 GSM8K-shaped prompts
   (scripts/bench_decode.py's varied workload). Prompt lengths uniform in 80..250 tokens: an assumption for a
   GSM8K test question (about 25-200 tokens) in Qwen2's chat template with its default system prompt and the
   zero_shot instruction (about 55 tokens). Answer budgets lognormal with median 180 tokens, clipped to
   40..512 (512: `jaxpatience eval`'s default max_new_tokens). One untimed call compiles, one call is timed.
   The HBM bound is bench_decode.bandwidth_bound: slots x HBM bandwidth / (every weight + every slot's whole
   KV cache of the engine's S slots), the tokens/s of decode steps that only read their memory once with every
   slot busy; slot_tokens_per_s (slot steps / wall, prefill time included) is the figure to hold against it.
3. **full_set**: all 1319 prompts (the size of GSM8K's test set) in one generate call at 256 slots: wall time,
   any compilation the decode stage left undone included. It starts only when 1.25 x its tokens at the decode
   stage's tokens/s fit in the budget left.

The lab's prediction (planning/lab.py `plan_mesh`: the job compiled for this device, costed by the roofline with
the chip's figures from planning/chips.py) sits beside each measurement. The lab compiles padded batches, so
the train step's twin is the padded job with the packed step's token slots in the same micro-batches: R pairs
of 2 x 512 tokens (attention over 512 keys instead of 1024: 0.7% of the 7B step's model FLOPs). The decode job is
`slots` rows over the engine's cache length S, prefilling prompts of the longest prompt's bucket (below S).
Its predicted wall time for a workload = decode steps x the predicted step (every step at the full slot count
and cache: high for the tail) + prefilled prompts / slots x the predicted prefill.

The JSON also holds jax's version, the device kind, the chip's figures, compile time of each stage, and memory:
the device's `peak_bytes_in_use` (the process's peak so far, after each stage), or the host's peak RSS where
the device does not report it (the CPU). `--preset tiny` runs the same stages on the tiny model with small
counts. The JSON's `summary`, also the last line printed, holds each stage's status and the headline figures
beside their predictions. Exit status 0 when every stage that ran succeeded, 1 when one failed (its error is in
the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import flax
import jax
import numpy as np
from flax import nnx

from jaxpatience import sharding, training
from jaxpatience.config import preset as model_preset
from jaxpatience.generation.shapes import MIN_LENGTH_BUCKET, bucket
from jaxpatience.generation.slots import prompt_bucket
from jaxpatience.planning import chips, hlo, lab, roofline, rows

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks beside this script: their helpers
import bench_decode  # noqa: E402
import bench_train  # noqa: E402

SIZES = {"data": 1, "fsdp": 1, "tensor": 1}  # one device
GSM8K_TEST_PROBLEMS = 1319


@dataclasses.dataclass(frozen=True)
class Preset:
    model: str  # a jaxpatience.config preset, random weights
    dtype: str
    pairs: int  # B: pairs per train step
    seq_len: int  # the longest sequence and the packed row length
    micro_batches: int
    remat: str
    steps: int  # timed train steps
    slots: int
    decode_prompts: int  # the decode stage's: the first of the full set's prompts
    max_budget: int  # the answers' clip; scales the whole lognormal (bench_decode.varied_workload)
    full_set: int  # prompts of the full-set stage
    decode_min_s: float  # the decode stage starts only with this much budget left (its compilations and plan)
    lora_rank: int = 16
    loss: str = "irpo"  # DPO + NLL, in the lab's names


PRESETS = {
    "7b": Preset("qwen2-7b", "bfloat16", pairs=8, seq_len=1024, micro_batches=2, remat="full", steps=5, slots=256,
                 decode_prompts=512, max_budget=512, full_set=GSM8K_TEST_PROBLEMS, decode_min_s=150),
    # the code path in seconds: every prompt + answer within one cache length (S = 256: prompts up to 250 tokens,
    # answers up to 6), and a full set no larger than the decode stage's prompts, so it compiles nothing new
    "tiny": Preset("tiny", "float32", pairs=4, seq_len=256, micro_batches=2, remat="full", steps=3, slots=4,
                   decode_prompts=8, max_budget=6, full_set=8, decode_min_s=5),
}  # fmt: skip


class Skipped(Exception):
    """A stage that did not start, with the reason."""


class Report:
    """The JSON file, rewritten whole (a temporary file renamed over it) each time `save` is called."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    def save(self) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=_plain) + "\n")
        os.replace(temporary, self.path)


def _plain(value):
    """JSON for numpy scalars and anything else the report might hold."""
    return value.item() if isinstance(value, np.generic) else str(value)


@dataclasses.dataclass
class Check:
    """What every stage reads: the preset, the one device, its mesh and chip, the report and the deadline."""

    preset: Preset
    devices: list
    mesh: object
    chip: chips.Chip
    report: Report
    deadline: float  # time.monotonic() at which the budget ends
    decode_model: object = None  # made by the decode stage, reused by the full set
    decode_tokens_per_s: float | None = None
    decode_plan: dict | None = None  # the decode stage's plan row, for the full set's prediction
    workload: tuple[list[list[int]], list[int]] | None = None  # the full set's (prompts, budgets)

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ---------------------------------------------------------------------------------------------------
# Shared pieces: the plan's prediction, memory, the model.


def plan_job(check: Check, kind: str, batch_size: int, seq_len: int, prompt_len: int | None = None):
    """(lab arguments, lab.Job) for a job on this device, through the lab's own command-line parser."""
    p = check.preset
    argv = ["--model", p.model, "--job", kind, "--batch-size", str(batch_size), "--seq-len", str(seq_len),
            "--lora-rank", str(p.lora_rank), "--remat", p.remat, "--loss", p.loss, "--dtype", p.dtype,
            "--micro-batches", str(p.micro_batches if kind == "train" else 1), "--target", "local",
            "--meshes", "data=1", "--no-cache"]  # fmt: skip
    if prompt_len is not None:
        argv += ["--prompt-len", str(prompt_len)]
    args = lab.parse_args(argv)
    return args, lab.make_job(args, p.dtype)


def predict(check: Check, args: argparse.Namespace, job) -> dict:
    """The lab's row for the job on this device (compiled here, costed with the chip's figures)."""
    start = time.perf_counter()
    row = lab.plan_mesh(job, SIZES, check.devices, args, check.chip)
    job_fields = {k: v for k, v in dataclasses.asdict(job).items() if k != "model"}
    return row | {"job": job_fields, "plan_s": round(time.perf_counter() - start, 2)}


def memory() -> dict:
    """The process's peak memory so far: the device's peak_bytes_in_use, or the host's peak RSS on the CPU."""
    peak_gib, source = bench_train.peak_memory_gb()  # GiB, whatever its name says
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"peak_gib": round(peak_gib, 3), "source": source, "bytes_in_use": stats.get("bytes_in_use")}


def model_config(p: Preset):
    return model_preset(p.model).replace(param_dtype=p.dtype, compute_dtype=p.dtype)


def finite_ratio(numerator, denominator) -> float | None:
    usable = numerator is not None and denominator is not None and math.isfinite(denominator) and denominator > 0
    return numerator / denominator if usable else None


# ---------------------------------------------------------------------------------------------------
# Stage 1: the train step.


def packed_batches(p: Preset, mesh, vocab_size: int) -> list[dict[str, np.ndarray]]:
    """Up to steps + 1 packed host batches of one shape [R, L]: bench_train's Patience-length pairs through the
    PairLoader as `jaxpatience train` packs them, only the batches of its most common row count R."""
    shape = argparse.Namespace(batch_size=p.pairs, steps=3 * p.steps, seq_len=p.seq_len, packing=True,
                               micro_batches=p.micro_batches, loss=p.loss)  # fmt: skip
    loader = bench_train.patience_loader(shape, mesh, vocab_size)
    hosts = [loader.make_batch(length, indices) for length, indices in loader.plan(0)]
    common = Counter(h["input_ids"].shape for h in hosts).most_common(1)[0][0]
    return [h for h in hosts if h["input_ids"].shape == common][: p.steps + 1]


def time_train(trainer, hosts: list[dict], steps: int) -> tuple[float, list[float], list[int]]:
    """(compile_s: the first step, untimed; step times; real tokens of each timed step's batch)."""
    batches = [training.device_batch(h) for h in hosts]
    start = time.perf_counter()
    jax.block_until_ready(trainer.step(batches[0]))
    compile_s = time.perf_counter() - start
    times, tokens = [], []
    for step in range(steps):
        index = 1 + step % (len(batches) - 1) if len(batches) > 1 else 0  # other data, the same shape
        start = time.perf_counter()
        metrics = jax.block_until_ready(trainer.step(batches[index]))
        times.append(time.perf_counter() - start)
        tokens.append(int(hosts[index]["attention_mask"].sum()))
        print(f"  step {step + 1}/{steps}: {times[-1]:.3f}s loss {float(metrics['loss']):.4f}", file=sys.stderr)
    return compile_s, times, tokens


def train_stage(check: Check, section: dict) -> None:
    p, mesh = check.preset, check.mesh
    config = model_config(p)
    hosts = packed_batches(p, mesh, config.vocab_size)
    packed_rows, row_len = hosts[0]["input_ids"].shape
    # the lab's padded twin: R pairs of 2 x L/2 tokens, the packed step's token slots in the same micro-batches
    args, job = plan_job(check, "train", batch_size=packed_rows, seq_len=row_len // 2)
    start = time.perf_counter()
    model = bench_train.random_model(config, mesh)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    step_config = dataclasses.replace(rows.train_config(job, SIZES), batch_size=p.pairs)  # the lab's TrainConfig
    trainer = training.create_trainer(model, step_config, mesh)
    del model  # the trainer holds the weights now
    setup_s = time.perf_counter() - start
    compile_s, times, tokens = time_train(trainer, hosts, p.steps)
    step_s = sum(times) / len(times)  # the batches differ in real tokens: mean time, mean tokens
    real = sum(tokens) / len(tokens)
    passes = roofline.train_passes(True, rows.LOSSES[p.loss][0], reference_in_step=True)
    flops = passes * roofline.forward_flops_per_token(config, row_len) * real
    section["measured"] = {
        "model": p.model, "dtype": p.dtype, "params": int(params),
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(trainer.state.params))),
        "pairs": p.pairs, "packed_rows": packed_rows, "row_len": row_len, "micro_batches": p.micro_batches,
        "remat": p.remat, "loss": p.loss, "lora_rank": p.lora_rank, "attention": trainer.config.attention,
        "setup_s": round(setup_s, 3), "compile_s": round(compile_s, 3), "steps": len(times),
        "step_s": step_s, "step_s_each": [round(t, 4) for t in times], "step_s_median": statistics.median(times),
        "real_tokens_per_step": real, "token_slots_per_step": packed_rows * row_len,
        "tokens_per_s": real / step_s, "model_flops_per_step": flops, "mfu": flops / step_s / check.chip.peak_flops,
        "memory": memory(),
    }  # fmt: skip
    del trainer
    check.report.save()
    plan = predict(check, args, job)
    slot_mfu = finite_ratio(plan.get("model_flops"), step_s * check.chip.peak_flops)
    section["plan"] = plan | {
        "twin": f"padded [{packed_rows}, 2, {row_len // 2}]: the packed step's {packed_rows} x {row_len} token slots",
        "measured_over_predicted_step": finite_ratio(step_s, plan.get("predicted_step_s")),
        "measured_mfu_of_twin": slot_mfu,  # the twin's model FLOPs (every token slot) over the measured step
    }


# ---------------------------------------------------------------------------------------------------
# Stages 2 and 3: decoding.


def run_workload(check: Check, prompts: list[list[int]], budgets: list[int], warm_up: bool) -> dict:
    """One (after an untimed warm-up call, with `warm_up`) timed slot-engine call, and its figures."""
    model, slots = check.decode_model, check.preset.slots
    call = lambda: bench_decode.slots_engine(model, prompts, budgets, slots, check.mesh)  # checks every budget
    warm_up_s = None
    if warm_up:
        start = time.perf_counter()
        call()
        warm_up_s = time.perf_counter() - start
    start = time.perf_counter()
    stats = call()
    wall_s = time.perf_counter() - start
    cache_len = bucket(max(len(q) + b for q, b in zip(prompts, budgets, strict=True)), MIN_LENGTH_BUCKET)  # S
    busy = stats["slot_buckets"][0]
    bandwidth_gbs = check.chip.hbm_bw / 1e9
    bound = bench_decode.bandwidth_bound(model, busy, cache_len, bandwidth_gbs)
    lengths = [len(q) for q in prompts]
    return {
        "prompts": len(prompts), "slots": busy, "useful_tokens": sum(budgets), "cache_len": cache_len,
        "prompt_len": {"min": min(lengths), "mean": float(np.mean(lengths)), "max": max(lengths)},
        "budget": {"min": min(budgets), "median": float(np.median(budgets)), "mean": float(np.mean(budgets)),
                   "max": max(budgets)},
        "warm_up_s": warm_up_s, "wall_s": wall_s,
        "compile_s": None if warm_up_s is None else max(warm_up_s - wall_s, 0.0),  # warm-up call minus timed call
        "tokens_per_s": sum(budgets) / wall_s, "slot_tokens_per_s": stats["slot_steps"] / wall_s,
        "occupancy": sum(b - 1 for b in budgets) / max(stats["slot_steps"], 1),
        "hbm_bound_tokens_per_s": bound, "of_hbm_bound": stats["slot_steps"] / wall_s / bound,
        "weights_only_bound_tokens_per_s": bench_decode.bandwidth_bound(model, busy, 0, bandwidth_gbs),
        "engine": stats, "memory": memory(),
    }  # fmt: skip


def predicted_wall(plan: dict, engine: dict, chip: chips.Chip) -> float | None:
    """The plan's seconds for a workload the engine ran: its decode steps at the predicted step, plus its
    prefilled prompts at the predicted prefill's cost per prompt (the lab prefills one prompt per slot at once)."""
    if plan.get("predicted_step_s") is None or "prefill" not in plan:
        return None
    prefill = plan["prefill"]
    analysis = hlo.Analysis(prefill["hlo_flops"], prefill["hbm_bytes"], prefill["collectives"])
    prefill_s = roofline.step_time(analysis, chip)["step_max_s"]
    per_prompt = prefill_s / plan["job"]["batch_size"]
    return engine["decode_steps"] * plan["predicted_step_s"] + engine["prefill_rows"] * per_prompt


def decode_stage(check: Check, section: dict) -> None:
    p = check.preset
    if check.left() < p.decode_min_s:
        raise Skipped(f"{check.left():.0f} s of budget left, the stage needs about {p.decode_min_s:.0f} s.")
    config = model_config(p)
    start = time.perf_counter()
    check.decode_model = bench_train.random_model(config, check.mesh)
    setup_s = time.perf_counter() - start
    check.workload = bench_decode.varied_workload(p.full_set, p.max_budget, config.vocab_size)  # the full set
    prompts, budgets = (part[: p.decode_prompts] for part in check.workload)  # its first prompts
    measured = run_workload(check, prompts, budgets, warm_up=True)
    section["measured"] = measured | {"setup_s": setup_s}
    check.decode_tokens_per_s = measured["tokens_per_s"]
    check.report.save()
    cache_len = measured["cache_len"]  # the lab needs room for a new token after the prompt bucket
    prompt_len = min(prompt_bucket(measured["prompt_len"]["max"]), cache_len - 1)
    args, job = plan_job(check, "decode", measured["slots"], cache_len, prompt_len)
    plan = predict(check, args, job)
    predicted_tokens_per_s = finite_ratio(measured["slots"], plan.get("predicted_step_s"))
    section["plan"] = plan | {
        "predicted_tokens_per_s": predicted_tokens_per_s,  # every slot busy, the whole cache read each step
        "measured_slot_tokens_over_predicted": finite_ratio(measured["slot_tokens_per_s"], predicted_tokens_per_s),
        "predicted_wall_s": predicted_wall(plan, measured["engine"], check.chip),
    }
    check.decode_plan = section["plan"]


def full_set_stage(check: Check, section: dict) -> None:
    if check.decode_model is None or not check.decode_tokens_per_s:
        raise Skipped("the decode stage measured no tokens/s to size the full set by.")
    prompts, budgets = check.workload
    expected_s = 1.25 * sum(budgets) / check.decode_tokens_per_s
    if check.left() < expected_s:
        raise Skipped(f"{check.left():.0f} s of budget left, the full set needs about {expected_s:.0f} s.")
    measured = run_workload(check, prompts, budgets, warm_up=False)
    section["measured"] = measured | {"expected_s": expected_s}
    plan = check.decode_plan or {}
    section["plan"] = {
        "predicted_wall_s": predicted_wall(plan, measured["engine"], check.chip),
        "from": "the decode stage's plan row (same slots, cache length and prompt bucket)",
    }
    if measured["cache_len"] != (plan.get("job") or {}).get("seq_len"):
        section["plan"]["from"] += f"; its cache length differs from this workload's {measured['cache_len']}"


STAGES = (("train", train_stage), ("decode", decode_stage), ("full_set", full_set_stage))
SUMMARY = {  # the headline figures, measured beside predicted: name -> (stage, part, key)
    "train_step_s": ("train", "measured", "step_s"),
    "train_predicted_step_s": ("train", "plan", "predicted_step_s"),
    "train_tokens_per_s": ("train", "measured", "tokens_per_s"),
    "train_mfu": ("train", "measured", "mfu"),
    "train_predicted_mfu": ("train", "plan", "predicted_mfu"),
    "train_compile_s": ("train", "measured", "compile_s"),
    "decode_tokens_per_s": ("decode", "measured", "tokens_per_s"),
    "decode_slot_tokens_per_s": ("decode", "measured", "slot_tokens_per_s"),
    "decode_hbm_bound_tokens_per_s": ("decode", "measured", "hbm_bound_tokens_per_s"),
    "decode_predicted_tokens_per_s": ("decode", "plan", "predicted_tokens_per_s"),
    "decode_wall_s": ("decode", "measured", "wall_s"),
    "decode_predicted_wall_s": ("decode", "plan", "predicted_wall_s"),
    "full_set_wall_s": ("full_set", "measured", "wall_s"),
    "full_set_predicted_wall_s": ("full_set", "plan", "predicted_wall_s"),
}


def summary(data: dict) -> dict:
    """Each stage's status and the SUMMARY figures the stages have reached (None where not)."""
    stages = data["stages"]
    figures = {name: stages.get(stage, {}).get(part, {}).get(key) for name, (stage, part, key) in SUMMARY.items()}
    return {"status": {name: section["status"] for name, section in stages.items()}} | figures


# ---------------------------------------------------------------------------------------------------
# The command.


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="7b (the default when a GPU is present) or tiny (the default elsewhere)",
    )
    parser.add_argument(
        "--budget-s",
        type=positive_seconds,
        default=480.0,
        help="seconds for the whole check; a stage starts only if it fits (default 480)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("device_check.json"),
        help="the JSON report (replaced if it exists; default device_check.json)",
    )
    parser.add_argument("--chip", default=None,
                        help=f"the chip's figures to use ({', '.join(chips.CHIPS)}); default: from the device kind "
                        "(the CPU: measured)")  # fmt: skip
    return parser.parse_args(argv)


def local_chip(name: str | None, devices: list) -> chips.Chip:
    """The chip's peak FLOP/s and HBM figures: named, from the device kind, or measured on the CPU."""
    if name:
        return chips.chip(name)
    if devices[0].platform == "cpu":
        return rows.host_chip(devices)
    return chips.chip_of_device(devices[0].device_kind)


def environment(devices: list, chip: chips.Chip) -> dict:
    device, plugin = devices[0], _version("jax-cuda13-plugin") or _version("jax-cuda12-plugin")
    return {
        "jax": jax.__version__, "jaxlib": _version("jaxlib"), "cuda_plugin": plugin,
        "flax": flax.__version__, "python": platform.python_version(), "platform": device.platform,
        "device_kind": device.device_kind, "local_devices": jax.local_device_count(), "devices_used": len(devices),
        "chip": dataclasses.asdict(chip), "xla_flags": os.environ.get("XLA_FLAGS"),
    }  # fmt: skip


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_stage(check: Check, name: str, body) -> bool:
    """Run one stage into report["stages"][name]; False if it failed (skips are not failures)."""
    section = check.report.data["stages"][name] = {"status": "running"}
    start = time.perf_counter()
    try:
        if check.left() <= 0:
            raise Skipped("no budget left.")
        check.report.save()
        print(f"device_check: {name} ({check.left():.0f} s of the budget left)", file=sys.stderr, flush=True)
        body(check, section)
        section["status"] = "done"
    except Skipped as reason:
        section |= {"status": "skipped", "reason": str(reason)}
    except Exception as err:  # out of memory, a compiler error: the JSON says so and the next stage still runs
        first = (str(err).strip().splitlines() or [""])[0][:500]
        section |= {"status": "error", "error": f"{type(err).__name__}: {first}"}
    section["elapsed_s"] = round(time.perf_counter() - start, 3)
    check.report.data["summary"] = summary(check.report.data)
    check.report.save()
    print(f"device_check: {name} {section['status']} in {section['elapsed_s']:.1f}s", file=sys.stderr, flush=True)
    return section["status"] != "error"


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    devices = jax.devices()[:1]
    name = args.preset or ("7b" if devices[0].platform == "gpu" else "tiny")
    try:
        chip = local_chip(args.chip, devices)
    except ValueError as err:
        print(f"device_check: {err}", file=sys.stderr)
        return 2
    data = {"preset": name, "settings": dataclasses.asdict(PRESETS[name]), "budget_s": args.budget_s,
            "environment": environment(devices, chip), "stages": {}, "finished": False}  # fmt: skip
    report = Report(args.out, data)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report.save()  # before any stage: an unwritable --out is one sentence, not a lost run
    except OSError as err:
        print(f"device_check: cannot write {args.out}: {err.strerror}.", file=sys.stderr)
        return 2
    mesh = sharding.make_mesh(**SIZES, devices=devices)
    check = Check(PRESETS[name], devices, mesh, chip, report, deadline=started + args.budget_s)
    ok = [run_stage(check, stage, body) for stage, body in STAGES]
    data |= {"finished": True, "elapsed_s": round(time.monotonic() - started, 3)}
    report.save()
    print(json.dumps(data["summary"], default=_plain))  # the last line: the headline figures
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
