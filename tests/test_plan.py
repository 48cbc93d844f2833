"""The sharding lab: HLO reading (loops, replica groups, matmul FLOPs), the roofline, and `jaxpatience plan`."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxpatience import cli, sharding
from jaxpatience.config import preset
from jaxpatience.planning import chips, hlo, roofline
from jaxpatience.planning import lab as plan
from jaxpatience.planning import rows as plan_rows

# A module as XLA prints it: a scan of 7 iterations over a [64, 32] x [32, 16] matmul, with an all-reduce in the
# body (groups in iota form) and an all-gather outside (groups in the mesh-axes form with a device order).
LOOP_MODULE = """
HloModule jit_step, entry_computation_layout={(f32[64,32]{1,0})->f32[64,16]{1,0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_matmul (param_0: f32[64,32], param_1: f32[32,16]) -> f32[64,16] {
  %param_0 = f32[64,32]{1,0} parameter(0)
  %param_1 = f32[32,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (state: (s32[], f32[64,32], f32[32,16])) -> (s32[], f32[64,32], f32[32,16]) {
  %state = (s32[], f32[64,32]{1,0}, f32[32,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = f32[64,32]{1,0} get-tuple-element(%state), index=1
  %w = f32[32,16]{1,0} get-tuple-element(%state), index=2
  %y = f32[64,16]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_matmul
  %r = f32[64,16]{1,0} all-reduce(%y), channel_id=1, replica_groups=[2,4]<=[4,2]T(1,0), to_apply=%add
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[64,32]{1,0}, f32[32,16]{1,0}) tuple(%next, %x, %w)
}

%cond (state.1: (s32[], f32[64,32], f32[32,16])) -> pred[] {
  %state.1 = (s32[], f32[64,32]{1,0}, f32[32,16]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%state.1), index=0
  %limit = s32[] constant(7)
  ROOT %lt = pred[] compare(%i.1, %limit), direction=LT
}

ENTRY %main (x.1: f32[64,32], w.1: f32[8,16]) -> f32[64,16] {
  %x.1 = f32[64,32]{1,0} parameter(0)
  %w.1 = f32[8,16]{1,0} parameter(1)
  %g = f32[32,16]{1,0} all-gather(%w.1), channel_id=2, \
replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}, dimensions={0}
  %zero = s32[] constant(0)
  %init = (s32[], f32[64,32]{1,0}, f32[32,16]{1,0}) tuple(%zero, %x.1, %g)
  %loop = (s32[], f32[64,32]{1,0}, f32[32,16]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %res = f32[64,16]{1,0} fusion(%x.1, %g), kind=kOutput, calls=%fused_matmul
}
"""


def test_loops_count_their_trips_and_groups_map_to_mesh_axes():
    analysis = hlo.analyze(LOOP_MODULE, {"data": 4, "tensor": 2})
    assert analysis.dot_flops == (7 + 1) * 2 * 64 * 32 * 16  # seven in the loop, one after it
    by_kind = {c["kind"]: c for c in analysis.collectives}
    # iota [2,4]<=[4,2]T(1,0): groups {0,2,4,6}, {1,3,5,7}: the data axis of a (data=4, tensor=2) mesh
    assert hlo.replica_groups("replica_groups=[2,4]<=[4,2]T(1,0),") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert by_kind["all-reduce"] == {"kind": "all-reduce", "axes": ["data"], "count": 7, "bytes": 7 * 64 * 16 * 4,
                                     "group_size": 4, "group": [0, 2, 4, 6]}  # fmt: skip
    # mesh form: ids iota(8).reshape(4, 2).T = [0,2,4,6,1,3,5,7] as a [2, 4] mesh grouped over axis_1
    assert hlo.replica_groups(LOOP_MODULE[LOOP_MODULE.index("replica_groups=mesh") :]) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert by_kind["all-gather"]["axes"] == ["data"] and by_kind["all-gather"]["bytes"] == 32 * 16 * 4
    assert hlo.replica_groups("replica_groups={{0,1},{2,3}}, x") == [[0, 1], [2, 3]]
    assert hlo.spanned_axes([[0, 1], [2, 3]], {"data": 4, "tensor": 2}) == ["tensor"]
    # the known_trip_count XLA writes on CPU and GPU wins over the condition
    known = LOOP_MODULE.replace("body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"3"}}')
    assert hlo.analyze(known, {"data": 4, "tensor": 2}).dot_flops == (3 + 1) * 2 * 64 * 32 * 16
    # libtpu unrolls a windowed einsum's loop by two (two chunks per iteration, the counter steps by 2): the
    # condition's bound 7 means ceil(7 / 2) = 4 iterations, not 7 (qwen2-0.5b on fsdp=8 v5p read 2.06x the model's
    # FLOPs that way, 1.33x once counted)
    unrolled = LOOP_MODULE.replace("%one = s32[] constant(1)", "%one = s32[] constant(2)")
    assert hlo.analyze(unrolled, {"data": 4, "tensor": 2}).dot_flops == (4 + 1) * 2 * 64 * 32 * 16


# TPU spellings: a plain matmul as a window-less convolution, a reduce-scatter as a fusion around an all-reduce.
TPU_MODULE = """
HloModule jit_step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (p0: f32[64]) -> f32[16] {
  %p0 = f32[64]{0} parameter(0)
  %ar = f32[64]{0} all-reduce(%p0), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %off = s32[] constant(0)
  ROOT %ds = f32[16]{0} dynamic-slice(%ar, %off), dynamic_slice_sizes={16}
}

ENTRY %main (a: bf16[8,32], b: bf16[32,16], g: f32[64]) -> (f32[8,16], f32[16]) {
  %a = bf16[8,32]{1,0:T(8,128)(2,1)} parameter(0)
  %b = bf16[32,16]{1,0:T(8,128)(2,1)} parameter(1)
  %g = f32[64]{0} parameter(2)
  %c = f32[8,16]{1,0} convolution(%a, %b), dim_labels=bf_io->bf
  %rs = f32[16]{0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
  ROOT %t = (f32[8,16]{1,0}, f32[16]{0}) tuple(%c, %rs)
}
"""


def test_tpu_spellings_and_loops_that_are_not_counted():
    analysis = hlo.analyze(TPU_MODULE, {"data": 2, "fsdp": 4})
    assert analysis.dot_flops == 2 * 8 * 16 * 32
    assert [(c["kind"], c["axes"], c["count"], c["bytes"]) for c in analysis.collectives] == [
        ("reduce-scatter", ["fsdp"], 1, 64 * 4)
    ]
    # a loop whose condition bounds something other than its counter (decoding until rows are done) counts once
    until_done = LOOP_MODULE.replace("compare(%i.1, %limit)", "compare(%twice, %limit)").replace(
        "  %limit = s32[] constant(7)", "  %twice = s32[] add(%i.1, %i.1)\n  %limit = s32[] constant(7)"
    )
    assert hlo.analyze(until_done, {"data": 4, "tensor": 2}).dot_flops == 2 * 2 * 64 * 32 * 16


def test_roofline_arithmetic_by_hand():
    chip = chips.Chip("test", peak_flops=1e12, hbm_bytes=1e9, hbm_bw=1e11, link_bw=1e10, node_size=4, network_bw=1e9)
    collectives = [
        {"kind": "all-reduce", "bytes": 4e8, "group_size": 4, "group": [0, 1, 2, 3]},  # 2 · 4e8 · 3/4 / 1e10 = 60 ms
        {"kind": "all-gather", "bytes": 2e8, "group_size": 2, "group": [0, 4]},  # network: 2e8 · 1/2 / 1e9 = 100 ms
        {"kind": "collective-permute", "bytes": 1e8, "group_size": 2, "group": [0, 1]},  # 1e8 / 1e10 = 10 ms
    ]
    for entry in collectives:
        entry["crosses_node"] = roofline.crosses_node(entry["group"], chip)
    terms = roofline.step_time(hlo.Analysis(dot_flops=2e11, hbm_bytes=3e10, collectives=collectives), chip)
    assert terms["compute_s"] == pytest.approx(0.2) and terms["hbm_s"] == pytest.approx(0.3)
    assert terms["collective_s"] == pytest.approx(0.06 + 0.1 + 0.01)
    assert terms["step_max_s"] == pytest.approx(0.3) and terms["step_sum_s"] == pytest.approx(0.67)
    assert roofline.mfu(1.5e11, 0.3, chip) == pytest.approx(0.5)
    # 6N per token for LoRA DPO with the in-step reference; 3 forward-sized passes
    assert roofline.train_passes(lora=True, dpo_weight=1.0, reference_in_step=True) == 3
    assert roofline.train_passes(lora=False, dpo_weight=1.0, reference_in_step=False) == 3


def _job(**changes) -> plan.Job:
    fields = dict(model_name="tiny", model=preset("tiny"), kind="train", batch_size=8, seq_len=64, lora_rank=8,
                  remat="full", loss="irpo", micro_batches=1, strategy="gspmd", reference="in-step",
                  prompt_len=16)  # fmt: skip
    return plan.Job(**(fields | changes))


def _row(job: plan.Job, **sizes) -> dict:
    mesh = sharding.make_mesh(**sizes, devices=jax.devices()[:8])
    return plan_rows.compile_row(job, mesh, "cpu:8", cache_dir=None)


def test_data_fsdp_and_tensor_rows_show_their_communication():
    job = _job()
    data, fsdp = _row(job, data=8), _row(job, fsdp=8)
    # data=8: the gradients are all-reduced once: the trained (LoRA) parameters in float32, plus scalar metrics
    from flax import nnx

    from jaxpatience.model import lora
    from jaxpatience.model.qwen2 import Qwen2ForCausalLM

    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(job.model, rngs=nnx.Rngs(0)))
    lora.apply_lora(model, plan_rows.train_config(job, {"data": 8}).lora)
    trained = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(nnx.state(model, lora.LoRAParam)))
    reduced = sum(c["bytes"] for c in data["collectives"] if c["kind"] == "all-reduce")
    assert reduced == pytest.approx(trained, rel=0.05)
    assert all(c["axes"] == ["data"] for c in data["collectives"])
    # fsdp=8 splits the frozen weights 8 ways; data=8 holds them whole
    assert fsdp["memory_bytes"]["weights"] == pytest.approx(data["memory_bytes"]["weights"] / 8, rel=0.05)
    assert any(c["kind"] == "all-gather" and c["axes"] == ["fsdp"] for c in fsdp["collectives"])
    # tensor=8 (a model whose heads split 8 ways): the activations' collectives run over the tensor axis
    wide = _job(model=preset("tiny").replace(num_attention_heads=8, num_key_value_heads=8, head_dim=8))
    tensor = _row(wide, tensor=8)
    assert tensor["collectives"] and all(c["axes"] == ["tensor"] for c in tensor["collectives"])
    # loops counted: the HLO's matmul FLOPs are at least the model's (remat adds a forward)
    for row in (data, fsdp):
        assert row["hlo_flops"] >= plan_rows.model_flops(job) / 8
    # the hand-written strategy reduce-scatters the gradients over fsdp, where GSPMD all-reduces them
    by_hand = _row(_job(strategy="shard_map"), fsdp=8)
    assert any(c["kind"] == "reduce-scatter" and c["axes"] == ["fsdp"] for c in by_hand["collectives"])
    assert not any(c["kind"] == "reduce-scatter" for c in fsdp["collectives"])


def _cli(capsys, *args) -> tuple[int, str]:
    status = cli.main(["plan", *args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "qwen9-1b"], "unknown model 'qwen9-1b'"),
        (["--chip", "h900"], "unknown chip 'h900'"),
        (["--target", "gpu:8"], "target 'gpu:8': expected gpu:CHIP:N"),
        (["--target", "npu:8"], "unknown target 'npu:8'"),
        (["--meshes", "data=3"], "not the target's 8 devices"),
        (["--meshes", "data=8", "--batch-size", "4"], "does not split"),
        (["--meshes", "tensor=8"], "tensor=8 does not divide num_attention_heads"),
        (["--meshes", "pipeline=8"], "expected axis=size pairs"),
        (["--chip", "h100", "--chip-spec", "hbm=1"], "unknown chip field 'hbm'"),
        (["--meshes", "data=2,data=4"], "mesh 'data=2,data=4' names the data axis twice"),
        (["--packed", "medium"], "--packed 'medium': expected short, patience, long or three token ranges"),
        (["--packed", "60-250,150-700"], "expected short, patience, long or three token ranges"),
        (["--packed", "50-20,30-200,20-120"], "the prompt range 50-20 needs 1 <= MIN <= MAX"),
        (["--packed", "20-100,0-200,20-120"], "the chosen range 0-200 needs 1 <= MIN <= MAX"),
        (["--packed", "short", "--job", "decode"], "--packed lays out training pairs; drop it for --job decode"),
    ],
)
def test_bad_input_is_one_sentence(capsys, args, message):
    base = {"--model": "tiny", "--batch-size": "8", "--seq-len": "64", "--target": "cpu:8", "--meshes": "data=8"}
    for key, value in zip(args[::2], args[1::2], strict=True):
        base[key] = value
    status, output = _cli(capsys, *[x for pair in base.items() for x in pair])
    assert status == 2 and message in output and "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1


def test_plan_measures_and_writes_every_format(capsys, tmp_path):
    out = {ext: tmp_path / f"plan.{ext}" for ext in ("json", "csv", "md", "png")}
    status, output = _cli(capsys, "--model", "tiny", "--batch-size", "8", "--seq-len", "64", "--target", "cpu:8",
                          "--meshes", "data=8", "--measure", "--steps", "2", "--json", str(out["json"]),
                          "--csv", str(out["csv"]), "--markdown", str(out["md"]), "--png", str(out["png"]),
                          "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert status == 0, output
    rows = json.loads(out["json"].read_text())
    assert [row["rank"] for row in rows] == [1] and plan_report_mesh(rows[0]) == "data=8"
    for row in rows:
        assert set(row["memory_bytes"]) >= {"weights", "trained", "batch", "temp", "total"}
        assert row["fits"] is True and row["flops"] > 0 and row["model_flops"] > 0
        assert all(set(c) >= {"kind", "count", "bytes", "axes"} for c in row["collectives"])
        assert row["predicted_step_s"] > 0 and 0 < row["predicted_mfu"] < 1 and row["measured_step_s"] > 0
    assert out["csv"].read_text().count("\n") == 2 and out["md"].read_text().startswith("| rank |")
    assert out["png"].stat().st_size > 1000
    # a second plan reads the compiled rows from the cache
    status, output = _cli(capsys, "--model", "tiny", "--batch-size", "8", "--seq-len", "64", "--target", "cpu:8",
                          "--meshes", "data=8", "--chip", "h100", "--dtype", "float32",
                          "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert status == 0 and "(cached)" in output, output


def plan_report_mesh(row: dict) -> str:
    from jaxpatience.planning.report import mesh_text

    return mesh_text(row["mesh"])


def test_decode_job_plans_prefill_and_step():
    job = _job(kind="decode", batch_size=8, seq_len=128, prompt_len=32, lora_rank=0)
    row = _row(job, data=2, tensor=2, fsdp=2)
    assert row["hlo_flops"] > 0 and row["prefill"]["hlo_flops"] > row["hlo_flops"]
    assert row["memory_bytes"]["weights"] > 0 and row["memory_bytes"]["batch"] > 0  # the KV cache is the "batch"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the [tpu] extra) is not installed")
def test_a_v5p_plan_compiles_for_abstract_tpu_devices(tmp_path):
    out = tmp_path / "plan.json"
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "jaxpatience", "plan", "--model", "tiny", "--batch-size", "8", "--seq-len", "64",
               "--target", "tpu:v5p:2x2x2", "--meshes", "fsdp=8;data=8", "--json", str(out), "--no-cache"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(row["fits"] for row in rows) and "v5p" in result.stderr
    fsdp = next(row for row in rows if row["mesh"]["fsdp"] == 8)
    assert any(c["kind"] == "all-gather" and c["axes"] == ["fsdp"] for c in fsdp["collectives"])
    assert np.isfinite(fsdp["predicted_step_s"]) and fsdp["memory_bytes"]["total"] < 95e9
    # a topology libtpu does not know: its reason in one sentence
    bad = [*command[: command.index("--target") + 1], "tpu:v5p:3x3x3", "--meshes", "fsdp=27"]
    result = subprocess.run(bad, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "jaxpatience: error: TPU topology 'v5p:3x3x3' was refused" in result.stderr


def test_fit_advice_tries_the_cheapest_settings_that_fit(capsys, tmp_path):
    """`--remat auto --micro-batches auto` on a chip just too small for the job without remat: the advice tries
    remat=none at 1, 2, ... micro-batches until it fits, then only the policies and counts that could beat it."""
    common = ["--model", "tiny", "--batch-size", "8", "--seq-len", "64", "--target", "cpu:2", "--meshes", "fsdp=2",
              "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    out = tmp_path / "plain.json"
    assert _cli(capsys, *common, "--remat", "none", "--json", str(out))[0] == 0
    (plain,) = json.loads(out.read_text())
    assert (plain["remat"], plain["micro_batches"], plain["warnings"]) == ("none", 1, [])
    small = int(plain["memory_bytes"]["total"] * 0.9)  # remat=none at one micro-batch no longer fits
    out = tmp_path / "advice.json"
    status, output = _cli(capsys, *common, "--remat", "auto", "--micro-batches", "auto",
                          "--chip-spec", f"hbm_bytes={small}", "--json", str(out))  # fmt: skip
    assert status == 0 and "mesh remat/micro" in output, output
    rows = json.loads(out.read_text())
    tried = [(row["remat"], row["micro_batches"]) for row in rows]
    assert ("none", 1) in tried and not next(r for r in rows if r["remat"] == "none" and r["micro_batches"] == 1)[
        "fits"
    ]
    assert any(row["fits"] for row in rows) and rows[0]["fits"]  # ranked: a setting that fits comes first
    fewest = math.inf  # rows come ranked; per policy, in the order tried: counts rise until the first fit
    for remat in plan.REMAT_ORDER:
        mine = sorted((row["micro_batches"], row["fits"]) for row in rows if row["remat"] == remat)
        assert all(m < fewest for m, _ in mine) and not any(fit for _, fit in mine[:-1]), tried
        fewest = min([fewest, *(m for m, fit in mine if fit)])
    assert _cli(capsys, *common, "--job", "decode", "--remat", "auto")[0] == 2  # advice is for training


def test_compiler_warnings_are_collected_and_still_printed(capfd):
    with plan_rows.compiler_warnings() as found:
        os.write(
            2, b"W hlo_rematerialization.cc] Can't reduce memory use below 1.0GiB (1 bytes); only reduced to 2GiB\n"
        )
        os.write(2, b"another line\n")
    assert found == ["Can't reduce memory use below 1.0GiB (1 bytes); only reduced to 2GiB"]
    assert "another line" in capfd.readouterr().err  # passed on, not swallowed


# The GPU compiler's library calls, as it prints them (attributes trimmed to what the count reads).
LIBRARY_MODULE = """
HloModule jit_step

ENTRY %main (q: bf16[2,128,4,64], k: bf16[2,128,2,64], a: f32[32,48], b: f32[48,16]) -> f32[32,16] {
  %q = bf16[2,128,4,64]{3,2,1,0} parameter(0)
  %k = bf16[2,128,2,64]{3,2,1,0} parameter(1)
  %a = f32[32,48]{1,0} parameter(2)
  %b = f32[48,16]{1,0} parameter(3)
  %fwd = (bf16[2,4,128,64]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k, %k), custom_call_target="__cudnn$fmhaSoftmax", \
operand_layout_constraints={bf16[2,128,4,64]{3,2,1,0}, bf16[2,128,2,64]{3,2,1,0}}, \
backend_config={"cudnn_fmha_backend_config": \
{"intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["2", "4", "128", "128"]}, "mask_type": "CAUSAL"}}
  %bwd = (bf16[2,128,4,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %k), \
custom_call_target="__cudnn$fmhaSoftmaxBackward", \
operand_layout_constraints={bf16[2,128,4,64]{3,2,1,0}, bf16[2,128,2,64]{3,2,1,0}}, \
backend_config={"cudnn_fmha_backend_config": \
{"intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["2", "4", "128", "128"]}, "mask_type": "NO_MASK"}}
  ROOT %gemm = f32[32,16]{1,0} custom-call(%a, %b), custom_call_target="__cublas$gemm", \
backend_config={"gemm_backend_config": {"dot_dimension_numbers": \
{"lhs_contracting_dimensions": ["1"], "rhs_contracting_dimensions": ["0"]}}}
}
"""


def test_gpu_library_calls_count_their_matmuls():
    scores = 2 * 4 * 128 * 128 * 64  # B·N·T·S·H multiply-adds of one attention matmul
    forward, backward = 2 * 2 * scores * 0.5, 5 * 2 * scores  # causal forward: half its blocks; full backward
    assert hlo.analyze(LIBRARY_MODULE, {"data": 1}).dot_flops == forward + backward + 2 * 32 * 16 * 48


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the [tpu] extra) is not installed")
def test_tpu_meshes_compute_what_their_remat_explains(tmp_path):
    """As tests/test_gpu_compile.py checks for GPUs: HLO/model FLOPs within 10% of the remat factor on TPU meshes,
    fsdp alone (where libtpu writes windowed einsums, loops unrolled by two) and with tensor > 1."""
    from test_gpu_compile import wide_model

    out = tmp_path / "plan.json"
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "jaxpatience", "plan", "--model", wide_model(tmp_path), "--batch-size", "16",
               "--seq-len", "256", "--lora-rank", "8", "--target", "tpu:v5p:2x2x2",
               "--meshes", "fsdp=8;fsdp=4,tensor=2", "--json", str(out), "--no-cache"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for row in json.loads(out.read_text()):
        ratio = row["hlo_flops"] / row["model_flops"]
        assert abs(ratio / row["remat_factor"] - 1) < 0.1, (row["mesh"], ratio, row["remat_factor"])


def test_a_packed_plan_costs_less_per_real_token_than_the_padded_plan(capsys, tmp_path):
    """`--packed short`: the same 8 pairs packed into rows of 256 instead of padded to [8, 2, 256]: the compiled
    step's matmul FLOPs per real token fall, tokens/s counts real tokens, and `auto` is blocked on the CPU."""
    common = ["--model", "tiny", "--batch-size", "8", "--seq-len", "256", "--target", "cpu:2", "--meshes", "data=2",
              "--chip", "h100", "--dtype", "float32", "--no-cache"]  # fmt: skip
    rows = {}
    for name, extra in (("padded", []), ("packed", ["--packed", "short"])):
        out = tmp_path / f"{name}.json"
        status, output = _cli(capsys, *common, *extra, "--json", str(out))
        assert status == 0, output
        (rows[name],) = json.loads(out.read_text())
    padded, packed = rows["padded"], rows["packed"]
    layout = packed["packing"]
    assert padded["packing"] is None and padded["tokens"] == 8 * 2 * 256  # the padded plan: every slot a token
    assert layout["rows"] % 2 == 0 and layout["row_length"] == 256 and layout["tile_pairs"] > 0
    real = layout["real_tokens"]
    assert packed["tokens"] == real and 0 < real < layout["rows"] * 256 and layout["padding_share"] > 0
    assert {padded["attention"], packed["attention"]} == {"blocked"} and packed["attention_calls"] == []
    # the same pairs (real tokens) cost fewer FLOPs packed (fewer slots; at 2 tiles a row, padded rows' causal
    # tiles are all a packed row can need too, so the saving per slot needs longer rows)
    assert packed["hlo_flops"] / real < padded["hlo_flops"] / real
    assert packed["model_flops"] < padded["model_flops"] and packed["memory_bytes"]["batch"] > 0
    assert packed["predicted_tokens_per_s"] == pytest.approx(real / packed["predicted_step_s"])
    # the measured step runs a padded batch: refused with --packed, before anything compiles
    status, output = _cli(capsys, *common, "--packed", "short", "--measure")
    assert status == 2 and "--measure times padded batches; drop it with --packed" in output, output


def test_outputs_and_the_cache_folder_are_checked_before_anything_compiles(capsys, tmp_path, monkeypatch):
    def compiled(*args, **kwargs):
        raise AssertionError("the plan compiled before checking its outputs")

    monkeypatch.setattr(plan, "compile_row", compiled)
    monkeypatch.setattr(plan, "host_chip", compiled)  # measuring this CPU is work too
    common = ["--model", "tiny", "--batch-size", "8", "--seq-len", "64", "--target", "cpu:8", "--meshes", "data=8"]
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    cases = [
        (["--json", str(tmp_path / "adir")], "is a folder; give a file name"),
        (["--markdown", str(tmp_path / "missing" / "plan.md")], "missing does not exist"),
        (["--png", str(tmp_path / "afile" / "plan.png")], "afile is a file, not a folder"),
        (["--cache-dir", str(tmp_path / "afile" / "cache")], "--cache-dir"),
    ]
    for extra, message in cases:
        status, output = _cli(capsys, *common, *extra)
        assert status == 2 and message in output and len(output.strip().splitlines()) == 1, output
    # HOME where no cache folder can be made (a file): the default cache is refused, --no-cache is the way out
    monkeypatch.setenv("HOME", str(tmp_path / "afile"))
    status, output = _cli(capsys, *common)
    assert status == 2 and "the plan's cache folder (under HOME)" in output and "--no-cache" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"] and not list((tmp_path / "adir").iterdir())


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_planned_packed_batch_is_the_loaders(micro_batches):
    """planning/packed.py lays out the drawn pairs as the PairLoader packs the same pairs: rows, segments per row
    and tile pairs per row agree (no JAX: the loader's numpy batch against the plan's shapes)."""
    from jaxpatience.data.pairs import EncodedPair, PairLoader
    from jaxpatience.planning import packed

    lengths, pairs, row_length, shards = packed.parse_lengths("patience"), 16, 1024, 2
    drawn = packed.draw(lengths, pairs, row_length)
    tokens = lambda n: np.ones(n, np.int32)
    records = [EncodedPair(tokens(1), tokens(c - 1), tokens(r - 1)) for c, r in drawn]  # prompt 1 + response
    loader = PairLoader(records, pairs, (row_length,), pad_id=0, seed=0, shuffle=False, packing=True,
                        micro_batches=micro_batches, row_multiple=micro_batches * shards)  # fmt: skip
    (bucket, indices), *_ = loader.plan(0)
    batch = loader.make_batch(bucket, indices)
    layout = packed.layout(lengths, pairs, row_length, micro_batches, shards, (0, 1))
    assert layout.real_tokens == int(batch["attention_mask"].sum()) == sum(c + r for c, r in drawn)
    assert (layout.rows, layout.row_length) == batch["input_ids"].shape
    assert layout.segments == batch["segment_pairs"].shape[1]
    assert layout.tile_pairs == batch["attention_blocks"].shape[1]
