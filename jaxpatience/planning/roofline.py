"""The cost model of a plan: analytic model FLOPs and a roofline step time per device.

Terms, each a lower bound on the step time of one device:
    compute      matmul FLOPs of the compiled program (hlo.analyze, loops counted) / peak FLOP/s
    hbm          estimated HBM traffic / HBM bandwidth
    collectives  per collective, a ring over its group of n devices: all-gather and reduce-scatter move
                 (n - 1)/n of the full buffer through each device, all-reduce twice that, all-to-all (n - 1)/n,
                 a collective-permute its buffer once; at the chip's `link_bw`, or `network_bw` when the group
                 leaves an NVLink domain
`step_max_s` = max of the three (everything overlaps perfectly: the optimistic bound) and `step_sum_s` = their
sum (nothing overlaps). Predicted MFU = model FLOPs per device / step_max_s / peak, an upper bound.

Model FLOPs count what the job needs, not what the program does (remat's recomputation is not counted), per
token: 2 per matmul weight (every projection and the LM head) plus attention scores and values counted causally
(4·(T/2)·heads·head_dim per layer). A training step runs that forward (policy), the backward's input gradients
(the same again), the weight gradients only in full-parameter training, and a second forward for the in-step
reference of LoRA DPO: 6N per token for LoRA DPO, as scripts/bench_train.py counts.
"""

from __future__ import annotations

from jaxpatience.planning.chips import Chip
from jaxpatience.planning.hlo import Analysis

RING = {"all-gather": 1.0, "reduce-scatter": 1.0, "all-to-all": 1.0, "all-reduce": 2.0}


def forward_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs per token of a Qwen2 config at sequence length T (see the module docstring)."""
    d, f, n, k, h = (
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.resolved_head_dim,
    )
    per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f  # q, o; k, v; gate, up, down
    matmul_weights = config.num_hidden_layers * per_layer + config.vocab_size * d  # + LM head
    return 2.0 * matmul_weights + config.num_hidden_layers * 2.0 * seq_len * n * h  # causal: T/2 keys on average


def train_passes(lora: bool, dpo_weight: float, reference_in_step: bool) -> int:
    """Forward-sized passes of one training step: forward + input gradients, + weight gradients when every
    parameter trains, + the reference forward when LoRA DPO computes it in the step."""
    return 2 + (not lora) + (lora and dpo_weight > 0 and reference_in_step)


def remat_factor(remat: str, passes: int) -> float:
    """HLO/model FLOPs a step should show: `full` recomputes the policy's forward once more in the backward (the
    layers; the LM head is outside the remat, so a real program lands a little under this); the other policies
    keep the matmul outputs (`dots`) or the base projections' (`lora`) and recompute only elementwise work or the
    adapters' small matmuls. More than this (by 10%, say) is work the program repeats: a mesh that replicates a
    computation, or XLA recomputing on its own to fit memory (its warning in the row)."""
    return (passes + (remat == "full")) / passes


def collective_seconds(entry: dict, chip: Chip) -> float:
    """Time of one collective entry (hlo.Analysis.collectives) over its ring."""
    n = max(entry.get("group_size", 2), 2)
    bandwidth = chip.network_bw if entry.get("crosses_node") and chip.network_bw else chip.link_bw
    if entry["kind"] == "collective-permute":
        return entry["bytes"] / bandwidth
    return RING.get(entry["kind"], 1.0) * entry["bytes"] * (n - 1) / n / bandwidth


def crosses_node(group: list[int] | None, chip: Chip) -> bool:
    """Whether a replica group's devices sit in more than one NVLink domain (device ids in the mesh's order)."""
    return bool(chip.node_size and group and len({d // chip.node_size for d in group}) > 1)


def step_time(analysis: Analysis, chip: Chip) -> dict[str, float]:
    """The roofline terms of one step on one device, and both bounds (seconds)."""
    terms = {
        "compute_s": analysis.dot_flops / chip.peak_flops,
        "hbm_s": analysis.hbm_bytes / chip.hbm_bw,
        "collective_s": sum(collective_seconds(entry, chip) for entry in analysis.collectives),
    }
    return terms | {"step_max_s": max(terms.values()), "step_sum_s": sum(terms.values())}


def mfu(model_flops_per_device: float, seconds: float, chip: Chip) -> float:
    return model_flops_per_device / seconds / chip.peak_flops if seconds > 0 else 0.0
