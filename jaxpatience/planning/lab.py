"""`jaxpatience plan`: which meshes fit one job, what each communicates, and how fast each should run.

    jaxpatience plan --model qwen2-7b --job train --batch-size 64 --seq-len 1024 --lora-rank 16 \
        --target tpu:v5p:4x4x4 --meshes auto --json plan.json

For every mesh the job's own program is built (training/step.py's lower_abstract_step: the step `jaxpatience train`
runs, from shapes alone, nothing materialised; rows.py) and compiled ahead of time for the target: `local` (the
devices present), `cpu:N` (N CPU devices), `gpu:CHIP:N` / `gpu:CHIP:HOSTSxN` (abstract NVIDIA GPUs through XLA's
real GPU compiler, the `[cuda]` extra, no GPU needed: gpus.py) or `tpu:TOPOLOGY` (abstract TPU devices through
libtpu, the `[tpu]` extra). A row then holds its `compiler` (xla-cpu, xla-gpu or libtpu); the compile time;
memory per device from the compiled program (frozen weights, trained parameters + optimizer state, batch,
temporaries, outputs) against the chip's; XLA's FLOPs and the HLO's matmul
FLOPs with loops counted (hlo.py) beside the model's FLOPs; every collective with its mesh axes; the roofline step
time and MFU (roofline.py, chips.py). `--measure` runs real steps on local / CPU devices beside the prediction.
Rows are ranked: meshes that fit first, fastest predicted step first. A train job is planned padded at full length
(the worst case), or with `--packed DIST` on packed rows drawn from a length distribution (packed.py).
Output paths and the cache folder are checked before anything compiles.

Compiled rows are cached by job, mesh, target and the package's source (`--cache-dir`, default
~/.cache/jaxpatience/plan): another chip, format or ranking reuses them; `--no-cache` recompiles.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
import time
from pathlib import Path

import jax
from jax.experimental import topologies

from jaxpatience import sharding
from jaxpatience.config import PRESETS, ConfigError, ModelConfig, preset
from jaxpatience.config_io import check_output_dir
from jaxpatience.planning import chips, gpus, report
from jaxpatience.planning.packed import Lengths, parse_lengths
from jaxpatience.planning.rows import CompileError, compile_row, host_chip, measure, predict

MESH_AXES = ("data", "fsdp", "tensor")
REMAT_ORDER = ("none", "lora", "dots", "full")  # least recomputation (fastest, most memory) first
TPU_HINT = 'TPU targets need libtpu: pip install -e ".[tpu]" (or pip install "jax[tpu]" matching your jax).'


@dataclasses.dataclass(frozen=True)
class Job:
    """What is planned, independent of the mesh."""

    model_name: str
    model: ModelConfig
    kind: str  # train | decode
    batch_size: int  # train: pairs per step; decode: slots
    seq_len: int  # train: tokens of each of chosen and rejected; decode: cache length
    lora_rank: int  # 0: full-parameter
    remat: str
    loss: str  # dpo | irpo (DPO + NLL) | sft
    micro_batches: int
    strategy: str  # gspmd | shard_map
    reference: str  # in-step | precomputed
    prompt_len: int  # decode: the prefill's prompt bucket
    scan_layers: bool = True  # train: one scanned layer (the default) or L unrolled layers
    packed: Lengths | None = None  # train: packed rows drawn from this length distribution (packed.py); None: padded


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jaxpatience plan", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help=f"a preset ({', '.join(sorted(PRESETS))}) or HF dir / config.json")
    p.add_argument("--job", default="train", choices=["train", "decode"])
    p.add_argument("--batch-size", type=int, required=True, help="train: pairs per step; decode: slots")
    p.add_argument("--seq-len", type=int, required=True, help="train: tokens per sequence; decode: cache length")
    p.add_argument("--prompt-len", type=int, default=None, help="decode: prompt tokens prefilled (default seq-len/4)")
    p.add_argument("--lora-rank", type=int, default=16, help="0 = full-parameter training")
    p.add_argument(
        "--remat",
        default="full",
        choices=["auto", *REMAT_ORDER],
        help="train: what the backward recomputes; auto = try each per mesh, least recompute first (fit advice)",
    )
    p.add_argument("--loss", default="irpo", choices=["dpo", "irpo", "sft"], help="irpo = DPO + NLL (default)")
    p.add_argument("--reference", default="in-step", choices=["in-step", "precomputed"], help="LoRA DPO's reference")
    p.add_argument(
        "--micro-batches",
        type=_micro_batches,
        default=1,
        help="train: gradient-accumulation steps per update, or auto = the fewest that fit (fit advice)",
    )
    p.add_argument("--strategy", default="gspmd", choices=["gspmd", "shard_map"])
    p.add_argument("--unrolled", action="store_true", help="train: L unrolled layers instead of one scanned layer")
    p.add_argument(
        "--packed",
        default=None,
        metavar="DIST",
        help="train: plan packed rows of pairs drawn from a length distribution: short, patience, long, or "
        "PROMPT,CHOSEN,REJECTED token ranges MIN-MAX (e.g. 60-250,150-700,50-300); default: padded, full length",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float32"],
        help="weights and matmuls (default: bfloat16 on TPU and GPU chips, float32 on the CPU)",
    )
    p.add_argument(
        "--target",
        default="local",
        help="local, cpu:N, gpu:CHIP:N, gpu:CHIP:HOSTSxN or tpu:TOPOLOGY (e.g. gpu:h100:8, tpu:v5p:4x4x4)",
    )
    p.add_argument(
        "--meshes", default="auto", help='"data=8;fsdp=8;data=2,fsdp=2,tensor=2" or auto (all factorisations)'
    )
    p.add_argument("--chip", default=None, help=f"{', '.join(chips.CHIPS)} (default: the TPU's, or this CPU measured)")
    p.add_argument("--chip-spec", default="", help="override chip fields, e.g. hbm_bytes=40e9,link_bw=2e11")
    p.add_argument("--measure", action="store_true", help="also run a few real steps per mesh (local / cpu targets)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mesh with --measure")
    p.add_argument("--json", default=None, help="write the rows as JSON")
    p.add_argument("--csv", default=None, help="write the rows as CSV")
    p.add_argument("--markdown", default=None, help="write the table as markdown")
    p.add_argument("--png", default=None, help="plot predicted time per term and memory per device")
    p.add_argument("--cache-dir", default=None, help="compiled rows (default ~/.cache/jaxpatience/plan)")
    p.add_argument("--no-cache", action="store_true", help="compile every mesh again")
    return p.parse_args(argv)


def _micro_batches(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive number or auto, not {text!r}") from None


def load_model(name: str, dtype: str) -> ModelConfig:
    """A preset or an HF checkpoint directory / config.json, in `dtype`."""
    if name in PRESETS:
        base = preset(name)
    elif Path(name).exists():
        base = ModelConfig.from_hf(name)
    else:
        raise ConfigError(f"unknown model {name!r}: not a preset ({', '.join(sorted(PRESETS))}) nor a path.")
    return base.replace(param_dtype=dtype, compute_dtype=dtype)


def _check_chip_spec(text: str) -> None:
    """Every number --chip-spec sets is finite and positive (a chip with -1 bytes of memory plans nonsense);
    unknown fields and text that is no number are chips.with_spec's to name."""
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            continue
        if not (math.isfinite(number) and number > 0):
            raise ConfigError(f"--chip-spec {key.strip()} must be a positive finite number, not {value.strip()}.")


def make_job(args: argparse.Namespace, dtype: str) -> Job:
    for name in ("batch_size", "seq_len", "micro_batches", "steps"):
        if getattr(args, name) != "auto" and getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}.")
    if args.job != "train" and "auto" in (args.remat, args.micro_batches):
        raise ConfigError("--remat auto and --micro-batches auto advise on training; drop them for --job decode.")
    if args.prompt_len is not None and args.prompt_len <= 0:  # 0 would silently mean the default
        raise ConfigError(f"--prompt-len must be positive, not {args.prompt_len}.")
    if args.lora_rank < 0:
        raise ConfigError(f"--lora-rank must be 0 (full-parameter) or positive, not {args.lora_rank}.")
    packed = None if getattr(args, "packed", None) is None else parse_lengths(args.packed)
    if packed and args.job != "train":
        raise ConfigError("--packed lays out training pairs; drop it for --job decode.")
    _check_chip_spec(args.chip_spec)
    model = load_model(args.model, dtype)
    if args.seq_len > model.max_position_embeddings:  # train's sequences and decode's cache alike
        raise ConfigError(f"--seq-len {args.seq_len} exceeds the model's {model.max_position_embeddings} positions.")
    if args.lora_rank > model.hidden_size:
        raise ConfigError(f"--lora-rank {args.lora_rank} exceeds the model's hidden size ({model.hidden_size}).")
    prompt = args.prompt_len or max(args.seq_len // 4, 1)
    if args.job == "decode" and not 0 < prompt < args.seq_len:
        raise ConfigError(f"--prompt-len must be between 1 and --seq-len - 1 ({args.seq_len - 1}), not {prompt}.")
    return Job(
        args.model,
        model,
        args.job,
        args.batch_size,
        args.seq_len,
        args.lora_rank,
        "full" if args.remat == "auto" else args.remat,  # the advice (advise) tries each in turn
        args.loss,
        1 if args.micro_batches == "auto" else args.micro_batches,
        args.strategy,
        args.reference,
        prompt,
        not args.unrolled,
        packed,
    )


# ---------------------------------------------------------------------------------------------------
# Targets and meshes.


def target_devices(target: str) -> list:
    """The devices a target names: local ones, N CPU devices, or abstract TPU devices of a topology."""
    if target == "local":
        return list(jax.devices())
    if target.startswith("cpu:"):
        count = _positive(target[4:], "cpu:N")
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise ConfigError(
                f"target {target} needs {count} CPU devices and this process has {len(devices)}; run the plan in "
                f"a fresh process (it sets them up) or with XLA_FLAGS=--xla_force_host_platform_device_count={count}."
            )
        return list(devices[:count])
    if target.startswith("gpu:"):
        try:
            return gpus.topology_devices(target)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if target.startswith("tpu:"):
        try:
            return list(topologies.get_topology_desc(topology_name=target[4:], platform="tpu").devices)
        except RuntimeError as err:
            if "not installed" in str(err):
                raise ConfigError(TPU_HINT) from None
            raise ConfigError(f"TPU topology {target[4:]!r} was refused: {str(err).splitlines()[0]}") from None
    raise ConfigError(
        f"unknown target {target!r}; expected local, cpu:N, gpu:CHIP:N, gpu:CHIP:HOSTSxN or tpu:TOPOLOGY "
        "(e.g. gpu:h100:8, tpu:v5p:4x4x4)."
    )


def prepare_backends(target: str) -> None:
    """Before JAX starts its backends (a no-op once they run): N CPU devices for `cpu:N`; for `tpu:` targets the
    CPU backend only, so that a plan never takes a TPU VM's chips from a job running there, and libtpu loaded
    beside other processes (ALLOW_MULTIPLE_LIBTPU_LOAD: the plan only compiles, it never runs on a TPU).

    Importing JAX (this module does, at its top) starts no backend and loads no libtpu: the backends start at the
    first device query, and libtpu with the first TPU topology. So what matters is the order in `main`, which
    calls this first, before `_chip_and_dtype` and `target_devices` ask for devices."""
    if target.startswith("tpu:"):
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        jax.config.update("jax_platforms", "cpu")
    if target.startswith("gpu:"):  # abstract GPUs: the CUDA plugin compiles, JAX itself runs on the CPU
        jax.config.update("jax_platforms", "cpu")
    if target.startswith("cpu:"):
        count = _positive(target[4:], "cpu:N")
        jax.config.update("jax_platforms", "cpu")  # on a GPU host too: the plan compiles for CPU devices
        try:
            jax.config.update("jax_num_cpu_devices", max(count, jax.config.jax_num_cpu_devices))
        except RuntimeError:  # the backends already started: target_devices checks the count
            pass


def _positive(text: str, what: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ConfigError(f"{what}: {text!r} is not a positive number of devices.")
    return int(text)


def parse_meshes(text: str, devices: int, job: Job) -> list[dict[str, int]]:
    """Explicit meshes (each checked; a one-sentence ConfigError names the first wrong one) or `auto`."""
    if text.strip() == "auto":
        meshes = [m for m in factorisations(devices) if mesh_problem(m, devices, job) is None]
        if not meshes:
            raise ConfigError(
                f"no factorisation of {devices} devices over data/fsdp/tensor suits this job: "
                f"{mesh_problem({'data': devices, 'fsdp': 1, 'tensor': 1}, devices, job)}"
            )
        return meshes
    meshes = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        sizes, named = dict.fromkeys(MESH_AXES, 1), set()
        for pair in filter(None, item.split(",")):
            name, _, value = (part.strip() for part in pair.partition("="))
            if name not in sizes or not value.isdigit() or int(value) <= 0:
                raise ConfigError(f"mesh {item!r}: expected axis=size pairs over {', '.join(MESH_AXES)}.")
            if name in named:
                raise ConfigError(f"mesh {item!r} names the {name} axis twice; give each axis once.")
            named.add(name)
            sizes[name] = int(value)
        problem = mesh_problem(sizes, devices, job)
        if problem:
            raise ConfigError(f"mesh {item!r}: {problem}")
        meshes.append(sizes)
    if not meshes:
        raise ConfigError("--meshes names no mesh.")
    return meshes


def factorisations(devices: int) -> list[dict[str, int]]:
    """Every (data, fsdp, tensor) with data · fsdp · tensor = devices."""
    divisors = [d for d in range(1, devices + 1) if devices % d == 0]
    return [
        dict(data=d, fsdp=f, tensor=devices // (d * f)) for d in divisors for f in divisors if devices % (d * f) == 0
    ]


def mesh_problem(sizes: dict[str, int], devices: int, job: Job) -> str | None:
    """Why a mesh cannot run the job, in one sentence; None when it can."""
    data, fsdp, tensor = (sizes[a] for a in MESH_AXES)
    model = job.model
    if data * fsdp * tensor != devices:
        return f"data·fsdp·tensor = {data * fsdp * tensor}, not the target's {devices} devices."
    shards = data * fsdp * (job.micro_batches if job.kind == "train" else 1)
    if job.batch_size % shards:
        what = "micro-batches × data × fsdp" if job.kind == "train" else "data × fsdp"
        return f"the batch of {job.batch_size} does not split over {what} = {shards}."
    if model.hidden_size % fsdp:
        return f"fsdp={fsdp} does not divide the model dim {model.hidden_size}."
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        if getattr(model, name) % tensor:
            return f"tensor={tensor} does not divide {name} = {getattr(model, name)}."
    if job.strategy == "shard_map" and tensor > 1:
        return "the shard_map strategy is written for the data and fsdp axes only (tensor must be 1)."
    return None


# ---------------------------------------------------------------------------------------------------
# The command.


def _chip_and_dtype(args: argparse.Namespace) -> tuple[chips.Chip | None, str]:
    """The chip (None: measure this CPU later) and the storage dtype `train` would use there."""
    if args.chip:
        chip = chips.chip(args.chip)
    elif args.target.startswith("tpu:"):
        chip = chips.chip_of_topology(args.target[4:])
    elif args.target.startswith("gpu:"):
        chip = chips.chip(gpus.parse_target(args.target)[0])
    elif args.target == "local" and _local_platform() != "cpu":  # the accelerators present: name their chip
        chip = chips.chip_of_device(_local_device_kind())
    else:
        chip = None
    return chip, args.dtype or ("float32" if chip is None else "bfloat16")


def _local_platform() -> str:
    return jax.devices()[0].platform


def _local_device_kind() -> str:
    return jax.devices()[0].device_kind


def plan_mesh(job: Job, sizes: dict[str, int], devices: list, args: argparse.Namespace, chip: chips.Chip) -> dict:
    """One row: compiled (or an error row), predicted on `chip`, measured with --measure."""
    mesh = sharding.make_mesh(**sizes, devices=devices)
    cache = cache_dir(args)
    compiler = {"cpu": "xla-cpu", "gpu": "xla-gpu", "tpu": "libtpu"}.get(devices[0].platform, devices[0].platform)
    settings = {"compiler": compiler, "remat": job.remat, "micro_batches": job.micro_batches}
    try:
        gpu = args.target.startswith("gpu:")  # JAX's cuDNN lowering asks for the chip's compute capability
        with gpus.capability_of(gpus.parse_target(args.target)[0]) if gpu else contextlib.nullcontext():
            row = compile_row(job, mesh, args.target, cache)
    except CompileError as err:  # XLA refuses the program (on TPU: it does not fit): a row that says so
        return error_row(sizes, err) | settings
    # flops: the compiled program's matmul FLOPs with loops counted (XLA's cost_analysis counts a loop once)
    row = {"mesh": sizes, **settings, **row, "flops": row["hlo_flops"]}
    row |= predict(row, job, chip, len(devices)) | {"measured_step_s": None, "measured_mfu": None}
    if args.measure and row["fits"]:
        try:
            seconds = measure(job, mesh, args.steps)
        except Exception as err:  # e.g. out of memory at run time: the row says so, the other meshes go on
            return row | {"measure_error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        row |= {"measured_step_s": seconds, "measured_mfu": row["model_flops"] / seconds / chip.peak_flops}
        row["measured_tokens_per_s"] = row["tokens"] / seconds
    return row


def advise(job: Job, sizes: dict[str, int], devices: list, args: argparse.Namespace, chip: chips.Chip) -> list[dict]:
    """Fit advice for one mesh (`--remat auto` / `--micro-batches auto`): a row per remat policy, each at the fewest
    micro-batches with which it fits cleanly (within the chip's memory, and XLA did not have to recompute on its
    own to get there: a compiler memory warning). Policies go from least recomputation to most, and a candidate
    that needs at least as many micro-batches as a cheaper policy already did is skipped: it can only be slower.
    Every compiled candidate is a row, so the ranking (predicted step time, fits first) shows what was tried."""
    policies = REMAT_ORDER if args.remat == "auto" else (job.remat,)
    per_shard = job.batch_size // (sizes["data"] * sizes["fsdp"])
    counts = [m for m in _powers_of_two(per_shard) if per_shard % m == 0]
    counts = counts if args.micro_batches == "auto" else [job.micro_batches]
    rows, fewest = [], math.inf  # fewest: micro-batches of the best clean fit so far
    for remat in policies:
        for micro in (m for m in counts if m < fewest):
            trial = dataclasses.replace(job, remat=remat, micro_batches=micro)
            row = plan_mesh(trial, sizes, devices, args, chip)
            rows.append(row)
            if row.get("fits") and not row.get("warnings"):
                fewest = micro
                break
            if "error" in row and args.micro_batches != "auto":
                break
    return rows


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(max(limit, 1).bit_length())]


def error_row(sizes: dict[str, int], err: Exception) -> dict:
    """A mesh XLA would not compile. When libtpu says how much its temporaries need, that figure is the row's
    `temp` and `total` (a lower bound: the arguments come on top)."""
    text = str(err)  # libtpu: "the total memory required for HLO temporaries (216.78G) exceeds available HBM"
    used = re.search(r"(?:required for HLO temporaries \(|Used )([\d.]+)([KMGT])?", text)
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, None: 1}
    temp = int(float(used.group(1)) * scale[used.group(2)]) if used else None  # a lower bound of the total
    line = next((part for part in text.splitlines() if "memory" in part.lower()), text.splitlines()[0] if text else "")
    return {
        "mesh": sizes,
        "fits": False,
        "error": f"{type(err).__name__}: {line.strip()[:300]}",
        "memory_bytes": {"weights": None, "trained": None, "batch": None, "temp": temp, "total": temp},
        "flops": None,
        "model_flops": None,
        "collectives": [],
        "predicted_step_s": None,
        "predicted_mfu": None,
        "measured_step_s": None,
    }


def rank(rows: list[dict]) -> list[dict]:
    """Meshes that fit first, then by predicted step time; errors last."""
    key = lambda row: ("error" in row, not row["fits"], row.get("predicted_step_s") or math.inf)
    ordered = sorted(rows, key=key)
    return [row | {"rank": i} for i, row in enumerate(ordered, 1)]


def cache_dir(args: argparse.Namespace) -> Path | None:
    """Where compiled rows are kept: --cache-dir, ~/.cache/jaxpatience/plan, or None with --no-cache."""
    return None if args.no_cache else Path(args.cache_dir or Path.home() / ".cache" / "jaxpatience" / "plan")


def check_outputs(args: argparse.Namespace) -> None:
    """Every file the plan will write, and its cache folder, checked before anything is compiled (a plan of many
    meshes can compile for minutes): a ConfigError in one sentence naming the option."""
    for option in ("json", "csv", "markdown", "png"):
        path = getattr(args, option)
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"--{option} {path} is a folder; give a file name.")
        folder = path.parent
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise ConfigError(f"--{option} {path}: its folder {folder} {what}.")
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"--{option} {path}: its folder {folder} is not writable.")
    folder = cache_dir(args)
    if folder is None:
        return
    where = "--cache-dir" if args.cache_dir else "the plan's cache folder (under HOME)"
    try:
        check_output_dir(folder, where)  # the one check of a folder to be made (config_io.py)
    except ConfigError as err:
        raise ConfigError(f"{str(err).rstrip('.')}; or pass --no-cache.") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_outputs(args)
    prepare_backends(args.target)
    chip, dtype = _chip_and_dtype(args)
    job = make_job(args, dtype)
    if args.measure and (args.target.startswith(("tpu:", "gpu:")) or job.kind != "train"):
        raise ConfigError(
            "--measure runs train steps on local or cpu:N devices; drop it for TPU and GPU targets and decode."
        )
    if args.measure and job.packed:
        raise ConfigError("--measure times padded batches; drop it with --packed (the prediction stays).")
    if args.measure and args.chip and args.target.startswith("cpu:"):
        raise ConfigError("--measure on CPU devices compares with this CPU's own measured figures; drop --chip.")
    devices = target_devices(args.target)
    meshes = parse_meshes(args.meshes, len(devices), job)
    chip = chips.with_spec(chip or host_chip(devices), args.chip_spec)
    layout = f" packed {job.packed.name}" if job.packed else ""
    print(
        f"plan: {args.model} {job.kind} B={job.batch_size} T={job.seq_len}{layout} {dtype} on {len(devices)}× "
        f"{devices[0].device_kind} ({chip.name}): {len(meshes)} mesh(es)",
        file=sys.stderr,
    )
    rows = []
    advice = "auto" in (args.remat, args.micro_batches)
    for i, sizes in enumerate(meshes, 1):
        start = time.perf_counter()
        found = advise(job, sizes, devices, args, chip) if advice else [plan_mesh(job, sizes, devices, args, chip)]
        rows += found
        tried = f" ({len(found)} settings tried)" if advice else ""
        if found[0].get("packing"):  # plan --packed: the drawn batch's rows on this mesh
            layout = found[0]["packing"]
            tried += f" ({layout['rows']} rows, {layout['real_tokens']} real tokens, {layout['padding_share']:.0%} pad)"
        print(
            f"  [{i}/{len(meshes)}] {report.mesh_text(sizes)}{tried}: {time.perf_counter() - start:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    rows = rank(rows)
    print(report.table(rows, settings=advice))
    for row in rows:
        print(f"  {report.row_name(row, advice)}: {report.collectives_text(row) or row.get('error', '')}")
        for warning in row.get("warnings", []):
            print(f"    XLA: {warning}")
    for path, write in ((args.json, report.write_json), (args.csv, report.write_csv)):
        if path:
            write(rows, path)
    if args.markdown:
        Path(args.markdown).write_text(report.table(rows, markdown=True, settings=advice) + "\n")
    if args.png:
        report.write_png(rows, args.png, chip.hbm_bytes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
