"""One row of a plan: the job's program compiled for one mesh, what it costs, and (optionally) measured.

`compile_row` lowers the job through the project's own functions (training/step.py's lower_abstract_step;
generation/slots.py's `_insert` and `_decode_chunk` for decoding) from abstract, sharded shapes, compiles it, and
keeps what the compiled program says: memory per device, XLA's FLOPs, and hlo.analyze's loop-aware FLOPs, HBM
traffic and collectives. `predict` adds the roofline for a chip; `measure` times real steps on real devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxpatience import sharding, training
from jaxpatience.config import LoraConfig, LossConfig, MeshConfig, TrainConfig
from jaxpatience.generation import slots
from jaxpatience.generation.sampling import Sampler
from jaxpatience.model.qwen2 import Qwen2ForCausalLM
from jaxpatience.planning import chips, hlo, packed, roofline


class CompileError(Exception):
    """XLA refused to compile a mesh's program (on TPU: most often, it does not fit in HBM)."""


LOSSES = {"dpo": (1.0, 0.0), "irpo": (1.0, 1.0), "sft": (0.0, 1.0)}  # (dpo_weight, nll_weight)


def train_config(job, sizes: dict[str, int]):
    """The TrainConfig `jaxpatience train` would run the job with on a mesh of `sizes`."""
    dpo, nll = LOSSES[job.loss]
    return TrainConfig(
        mesh=MeshConfig(**sizes),
        lora=LoraConfig(rank=job.lora_rank) if job.lora_rank else None,
        loss=LossConfig(dpo_weight=dpo, nll_weight=nll),
        batch_size=job.batch_size,
        micro_batches=job.micro_batches,
        remat=job.remat,
        strategy=job.strategy,
        scan_layers=job.scan_layers,
    )


def packed_layout(job, sizes: dict[str, int]) -> packed.Layout | None:
    """The packed batch of `plan --packed` on a mesh of `sizes` (planning/packed.py); None for a padded job."""
    if job.packed is None:
        return None
    sides = (0, 1) if LOSSES[job.loss][0] > 0 else (0,)  # SFT packs the chosen sequences only, as the loader does
    shards = sizes.get("data", 1) * sizes.get("fsdp", 1)  # sharding.batch_shards: the batch splits over both
    return packed.layout(job.packed, job.batch_size, job.seq_len, job.micro_batches, shards, sides)


def _precomputed_reference(job) -> bool:
    """Whether the batch carries the reference's log-probs (DPO without LoRA, or asked for)."""
    return LOSSES[job.loss][0] > 0 and (job.lora_rank == 0 or job.reference == "precomputed")


def train_batch(job, sizes: dict[str, int] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch: padded [B, 2, T] at full length, or with `plan --packed` the packed rows drawn for a
    mesh of `sizes`; reference log-probs when the step does not make them."""
    layout = packed_layout(job, sizes or {})
    if layout is None:
        shape = (job.batch_size, 2, job.seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    else:
        batch = packed.batch_shapes(layout, job.batch_size)
    if _precomputed_reference(job):
        batch["ref_logps"] = jax.ShapeDtypeStruct((job.batch_size, 2), jnp.float32)
    return batch


def step_tokens(job, layout: packed.Layout | None = None) -> int:
    """Real tokens of one train step, all devices: the packed batch's sequences, or every padded slot (the padded
    plan's sequences fill their rows); SFT's padded step skips the rejected rows."""
    if layout is not None:
        return layout.real_tokens
    return job.batch_size * job.seq_len * (2 if LOSSES[job.loss][0] > 0 else 1)


def model_flops(job, layout: packed.Layout | None = None) -> float:
    """The job's model FLOPs per step, all devices (roofline.py's convention); packed: of the real tokens, each
    sequence at its own length."""
    if layout is not None:
        return _passes(job) * packed.forward_flops(job.model, layout)
    per_token = roofline.forward_flops_per_token(job.model, job.seq_len)
    if job.kind == "decode":  # one new token per slot, attending to the whole cache (not causal halves)
        return job.batch_size * (
            per_token
            + job.model.num_hidden_layers
            * 2.0
            * job.seq_len
            * job.model.num_attention_heads
            * job.model.resolved_head_dim
        )
    return _passes(job) * per_token * step_tokens(job)


def _passes(job) -> int:
    in_step = job.reference == "in-step" and not _precomputed_reference(job)
    return roofline.train_passes(job.lora_rank > 0, LOSSES[job.loss][0], in_step)


def _per_device_bytes(infos, shardings) -> int:
    """Bytes per device of the arguments; one the program never reads (a packed batch's `pair_mask` where the
    step does not need it) has no sharding and is not passed: 0."""
    infos = jax.tree.leaves(infos, is_leaf=lambda x: hasattr(x, "donated"))
    shardings = jax.tree.leaves(shardings, is_leaf=lambda x: x is None)
    return sum(
        math.prod(s.shard_shape(tuple(i.shape))) * np.dtype(i.dtype).itemsize
        for i, s in zip(infos, shardings, strict=True)
        if s is not None
    )


def memory_split(lowered, compiled, parts: dict[str, int]) -> dict[str, int]:
    """Bytes per device: the named arguments (`parts`: name -> argument index), temporaries, outputs, total."""
    infos, shardings = lowered.args_info[0], compiled.input_shardings[0]
    split = {name: _per_device_bytes(infos[i], shardings[i]) for name, i in parts.items()}
    memory = compiled.memory_analysis()
    outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes  # donated state is updated in place
    total = memory.argument_size_in_bytes + outputs + memory.temp_size_in_bytes
    return split | {"temp": int(memory.temp_size_in_bytes), "output": int(outputs), "total": int(total)}


def lower_train(job, mesh):
    """The train step, lowered from abstract shapes: [(name, lowered, argument index of each memory part)]."""
    sizes = dict(mesh.shape)
    lowered = training.lower_abstract_step(job.model, train_config(job, sizes), mesh, train_batch(job, sizes))
    return [("step", lowered, {"trained": 0, "weights": 1, "batch": 2})]


def _abstract(tree, shardings):
    """ShapeDtypeStructs with shardings in place of an NNX state's abstract values."""
    return jax.tree.map(
        lambda s, v: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s)),
        shardings,
        tree,
    )


def lower_decode(job, mesh):
    """The prefill of `batch_size` prompts of `prompt_len` tokens into empty slots, and one decode step."""
    config = job.model
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))))
    state = _abstract(state, sharding.state_shardings(mesh, state))
    empty_slots = _abstract_slots(job, mesh)
    rows, scalar = job.batch_size, lambda dtype=jnp.int32: jax.ShapeDtypeStruct((), dtype)
    vector = lambda dtype=jnp.int32, *tail: jax.ShapeDtypeStruct((rows, *tail), dtype)
    settings = {name: vector() for name in ("row_id", "budget", "top_k")} | {
        "stop_ids": vector(jnp.int32, 4),
        "seed": vector(jnp.uint32),
        "temperature": vector(jnp.float32),
        "top_p": vector(jnp.float32),
    }
    sampler = Sampler(greedy=True, top_k=0, use_top_p=False)
    prompts = jax.ShapeDtypeStruct((rows, job.prompt_len), jnp.int32)
    prefill = slots._insert.lower(
        state,
        empty_slots,
        prompts,
        prompts,
        vector(),
        vector(),
        settings,
        graphdef=graphdef,
        sampler=sampler,
        mesh=mesh,
    )
    decode = slots._decode_chunk.lower(
        state, empty_slots, scalar(), scalar(), graphdef=graphdef, sampler=sampler, window=job.seq_len, mesh=mesh
    )
    return [("step", decode, {"weights": 0, "trained": None, "batch": 1}), ("prefill", prefill, {})]


def _abstract_slots(job, mesh):
    """The engine's empty slots for the job (a KV cache of `seq_len` per row, room for `seq_len - prompt_len` new
    tokens) as ShapeDtypeStructs, with the shardings the engine's own program gives them."""
    config = job.model
    shape = (
        config.num_hidden_layers,
        job.batch_size,
        job.seq_len,
        config.num_key_value_heads,
        config.resolved_head_dim,
        job.seq_len - job.prompt_len,
        4,
        config.compute_dtype,
    )
    empty = slots._empty_slots.lower(shape=shape, mesh=mesh).compile()
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(lambda: slots._empty_slots(shape=shape, mesh=mesh)),
        empty.output_shardings,
    )


def compile_row(job, mesh, target: str, cache_dir: Path | None) -> dict:
    """Compile the job for one mesh (or read the cached row): compile time, memory, FLOPs, collectives."""
    key = _cache_key(job, dict(mesh.shape), target, mesh.devices.flat[0].device_kind)
    cached = cache_dir / f"{key}.json" if cache_dir else None
    if cached and cached.exists():
        return json.loads(cached.read_text()) | {"cached": True}
    row: dict = {}
    for name, lowered, parts in (lower_train if job.kind == "train" else lower_decode)(job, mesh):
        start = time.perf_counter()
        with compiler_warnings() as warnings:
            try:
                compiled = lowered.compile()
            except Exception as err:  # XLA's own errors have no common public type
                raise CompileError(str(err)) from err
        seconds = time.perf_counter() - start
        analysis = hlo.analyze(compiled.as_text(), dict(mesh.shape))
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, list) else cost) or {}
        named = {k: v for k, v in parts.items() if v is not None}
        facts = {
            "compile_s": round(seconds, 2),
            "xla_flops": float(cost.get("flops", 0.0)),
            "hlo_flops": analysis.dot_flops,
            "hbm_bytes": analysis.hbm_bytes,
            "collectives": analysis.collectives,
            "warnings": warnings,
        }
        if name == "step":
            memory = memory_split(lowered, compiled, named)
            row |= facts | {"memory_bytes": {"weights": 0, "trained": 0, "batch": 0} | memory}
            row |= {"attention_calls": attention_calls(compiled.as_text())}
        else:
            row[name] = facts | {"memory_bytes": memory_split(lowered, compiled, {})}
    if job.kind == "train":  # the attention `auto` picks for the target (training.resolve_attention), the layout
        row["attention"] = training.resolve_attention("auto", job.model.compute_dtype, mesh.devices.flat[0].platform)
        layout = packed_layout(job, dict(mesh.shape))
        row["packing"] = None if layout is None else layout.summary()
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(row))
    return row | {"cached": False}


def attention_calls(text: str) -> list[str]:
    """The fused attention kernels an optimised HLO module calls: cuDNN's (`__cudnn$fmha...`) and TPU kernels
    (`tpu_custom_call`: splash attention's Mosaic kernel)."""
    targets = set(re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*|tpu_custom_call)"', text))
    return sorted(targets)


# What XLA's compilers print (C++, to the process's stderr) when a program needs more memory than the device has:
# the GPU compiler's "Can't reduce memory use below 74.50GiB (...) by rematerialization; only reduced to
# 129.08GiB (...), down from ...". The program still compiles; the row keeps the sentence.
_MEMORY_WARNING = re.compile(r"Can't reduce memory use[^\n]*|[^\n]*exceeds? (?:the )?(?:available|memory limit)[^\n]*")


@contextlib.contextmanager
def compiler_warnings():
    """Collect XLA's memory warnings printed while the block compiles: yields a list that fills when the block
    ends. The process's stderr (file descriptor 2, where XLA's C++ logging writes) goes to a temporary file for
    the block; every line of it is passed on to stderr afterwards, so nothing is hidden."""
    found: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield found
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()
            found += [" ".join(m.split())[:300] for m in _MEMORY_WARNING.findall(text)]


def _cache_key(job, sizes: dict[str, int], target: str, device_kind: str) -> str:
    source = hashlib.sha256()
    for path in sorted(Path(__file__).parents[1].rglob("*.py")):  # the package's code shapes the program
        source.update(path.read_bytes())
    fields = dataclasses.asdict(job) | {"model_name": None}
    try:
        libtpu = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        libtpu = None
    flags = [os.environ.get(k) for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")]  # they change the compiled program
    text = json.dumps(
        [fields, sizes, target, device_kind, jax.__version__, libtpu, flags, source.hexdigest()],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def layer_bytes(config) -> int:
    """One decoder layer's weights, whole (what FSDP gathers per layer), in the storage dtype."""
    d, f, n, k, h = (
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.resolved_head_dim,
    )
    count = 2 * d * n * h + 2 * d * k * h + (n + 2 * k) * h + 3 * d * f + 2 * d  # q, o; k, v; biases; MLP; norms
    return count * np.dtype(config.param_dtype).itemsize


def predict(row: dict, job, chip: chips.Chip, devices: int) -> dict:
    """The roofline of a compiled row on `chip`: terms, bounds, MFU, whether it fits."""
    collectives = [c | {"crosses_node": roofline.crosses_node(c.get("group"), chip)} for c in row["collectives"]]
    analysis = hlo.Analysis(row["hlo_flops"], row["hbm_bytes"], collectives)
    terms = roofline.step_time(analysis, chip)
    layout = packed_layout(job, row["mesh"]) if job.kind == "train" else None
    per_device = model_flops(job, layout) / devices
    expected = 1.0 if job.kind == "decode" else roofline.remat_factor(job.remat, _passes(job))
    if layout is not None:  # the packed rows' padding slots run the projections too (model FLOPs count real tokens)
        expected *= layout.rows * layout.row_length / layout.real_tokens
    tokens = job.batch_size if job.kind == "decode" else step_tokens(job, layout)  # decode: a new token per slot
    peak_memory = max(row["memory_bytes"]["total"], row.get("prefill", {}).get("memory_bytes", {}).get("total", 0))
    return {
        "model_flops": per_device,
        "remat_factor": expected,  # the HLO/model FLOPs the remat policy explains (roofline.remat_factor)
        "layer_bytes": layer_bytes(job.model),
        "gathered_bytes": sum(c["bytes"] for c in row["collectives"] if c["kind"] == "all-gather"),
        "collectives": collectives,  # with crosses_node: the group leaves a node (costed at the network's bandwidth)
        "fits": peak_memory <= chip.hbm_bytes,  # decode: the prefill's program too
        "predicted": {k: v for k, v in terms.items()},
        "predicted_step_s": terms["step_max_s"],
        "predicted_step_sum_s": terms["step_sum_s"],
        "predicted_mfu": roofline.mfu(per_device, terms["step_max_s"], chip),
        "tokens": tokens,  # real tokens per step, all devices
        "predicted_tokens_per_s": tokens / terms["step_max_s"] if terms["step_max_s"] > 0 else None,
    }


def host_chip(devices: list) -> chips.Chip:
    """This machine's CPU devices as a chip: matmul FLOP/s and copy bandwidth measured on all devices at once
    (fake CPU devices share the cores, so each gets its share), memory = RAM / devices."""
    mesh = sharding.make_mesh(data=len(devices), devices=devices)
    split = NamedSharding(mesh, PartitionSpec("data"))
    n = 512
    x = jax.device_put(np.ones((len(devices), n, n), np.float32), split)
    matmul = jax.jit(lambda a: a @ a, out_shardings=split)
    big = jax.device_put(np.ones((len(devices), 4 * 2**20), np.float32), split)
    copy = jax.jit(lambda a: a * 1.0001, out_shardings=split)
    flops = 2.0 * n**3 * len(devices) / _best_time(matmul, x)
    bandwidth = 2.0 * big.nbytes / _best_time(copy, big)
    ram = float(np.prod([os.sysconf(k) for k in ("SC_PAGE_SIZE", "SC_PHYS_PAGES")]))
    per = lambda value: value / len(devices)
    return chips.Chip("cpu (measured)", per(flops), per(ram), per(bandwidth), per(bandwidth))


def _best_time(fn, x, repeats: int = 5) -> float:
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return min(times)


def measure(job, mesh, steps: int) -> float:
    """Median seconds of `steps` real train steps on `mesh` (random weights made in their shardings, a random
    batch at full length), after one compiling step."""
    if job.kind != "train":
        raise ValueError("--measure times train steps only; plan --job decode without it.")
    make = lambda: Qwen2ForCausalLM(job.model, rngs=nnx.Rngs(0))
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.state(make()), out_shardings=sharding.state_shardings(mesh, abstract))()
    trainer = training.create_trainer(nnx.merge(graphdef, state), train_config(job, dict(mesh.shape)), mesh)
    rng = np.random.default_rng(0)
    batch = {k: np.ones(s.shape, np.int32) for k, s in train_batch(job).items() if k != "ref_logps"}
    batch["input_ids"] = rng.integers(0, job.model.vocab_size, batch["input_ids"].shape).astype(np.int32)
    batch["loss_mask"][..., : job.seq_len // 2] = 0
    if "ref_logps" in train_batch(job):
        batch["ref_logps"] = np.zeros((job.batch_size, 2), np.float32)
    jax.block_until_ready(trainer.step(batch))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(trainer.step(batch))
        times.append(time.perf_counter() - start)
    return float(np.median(times))
