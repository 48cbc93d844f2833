"""What an optimised HLO module does per device: matmul FLOPs, HBM traffic and collectives, loops counted.

XLA's own `cost_analysis()` counts a `while` body once, so a step that scans 80 layers looks 80 times cheaper
than it is. `analyze(compiled.as_text(), mesh_shape)` walks the module's call graph instead: every computation
gets a multiplier (how often it runs per step: a while body `known_trip_count` times its caller's, a fusion or
call as often as its caller), and then

* `dot_flops`: 2 · (result elements) · (contracted size) of every `dot` and `convolution` (TPU writes matmuls as
  1-D convolutions), and of the GPU's library calls (cuBLAS GEMMs, cuDNN fused attention: `_library_flops`),
  times the multiplier. Elementwise work is left out: matmuls are > 95% of a transformer.
* `hbm_bytes`: for every instruction outside fusions, the bytes of its result and of its operands. A fused
  parameter that is only sliced (a scanned layer's weights out of the stacked [L, ...] array) counts as the
  slices it feeds; a dynamic-update-slice or scatter writes its update. An estimate, in the way XLA's own one is.
* `collectives`: every all-gather, all-reduce, reduce-scatter, all-to-all and collective-permute, grouped by
  (kind, mesh axes its replica groups span): count and bytes per device per step. Bytes are the full buffer
  the collective works on: an all-gather's output, a reduce-scatter's input, an all-reduce's operand.

Replica groups come in three spellings (explicit `{{0,1},{2,3}}`, iota `[2,4]<=[4,2]T(1,0)`, and mesh axes
`mesh['axis_0'=2,'axis_1'=4], device_ids=([8]) {'axis_1'}`); all become lists of device ids, the position of the
device in the jitted mesh's device order, and `spanned_axes` names the mesh axes along which a group's devices
differ.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {  # bytes per element, one row per width
    "s4": 0.5, "u4": 0.5,
    "pred": 1, "s8": 1, "u8": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8,
    "c128": 16,
}  # fmt: skip
_NO_TRAFFIC = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "conditional",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "async-start",
    "async-done",
    "async-update",
}
# Ops that update their first operand in place (XLA aliases the buffer): opcode -> operand index of the update.
# Their traffic is the update, read and written, not the whole buffer.
_IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result type as printed: "f32[8,64]{1,0}" or a tuple "(f32[], bf16[2,3])"
    opcode: str
    operands: list[str]
    args: str  # the text between the parentheses (a parameter's index)
    attributes: str
    root: bool = False  # the computation's result


@dataclasses.dataclass
class Analysis:
    dot_flops: float
    hbm_bytes: float
    collectives: list[dict]  # {kind, axes, count, bytes, group_size, group}: axes spanned, one group's device ids


def shape_bytes(shape: str) -> float:
    """Bytes of every array in a printed type (a tuple's elements summed)."""
    return sum(math.prod(_dims(dims)) * _DTYPE_BYTES.get(dtype, 4) for dtype, dims in _ARRAY.findall(shape))


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def _first_array(shape: str) -> list[int]:
    match = _ARRAY.search(shape)
    return _dims(match.group(2)) if match else []


def parse_module(text: str) -> dict[str, dict[str, Instruction]]:
    """Computation name -> {instruction name -> Instruction}, in order; the entry computation is named 'ENTRY'."""
    computations: dict[str, dict[str, Instruction]] = {}
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = computations.setdefault("ENTRY" if line.startswith("ENTRY") else header.group(1), {})
            continue
        if current is None or line.strip() in ("", "}"):
            continue
        match = _INSTRUCTION.match(line)
        if match:
            root, name, shape, opcode, rest = match.groups()
            depth, end = 1, len(rest)
            for i, char in enumerate(rest):  # the operand list ends at the matching parenthesis
                depth += {"(": 1, ")": -1}.get(char, 0)
                if depth == 0:
                    end = i
                    break
            operands = re.findall(r"%([\w.\-]+)", rest[:end])
            current[name] = Instruction(name, shape, opcode, operands, rest[:end], rest[end + 1 :], bool(root))
    return computations


def trip_count(
    loop: Instruction, computations: dict[str, dict[str, Instruction]], caller: dict[str, Instruction]
) -> float:
    """A while loop's iterations: XLA's `known_trip_count` (CPU, GPU), else a scan's `counter < N` in its
    condition (TPU modules leave the count out): the compare's left side a tuple element of the loop state that
    starts at constant 0, its right side a constant, and the body adds a constant step to it (1 for a scan; 2
    where libtpu unrolled a windowed einsum's loop, two chunks per iteration). Anything else (a loop that runs
    until its rows are done) 1."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attributes)
    if known:
        return float(known.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", loop.attributes)
    table = computations.get(condition.group(1), {}) if condition else {}
    init = _source(caller, loop.operands[0]) if loop.operands else None
    for compare in table.values():
        direction = re.search(r"direction=(LT|LE)", compare.attributes)
        if compare.opcode != "compare" or not direction or len(compare.operands) != 2:
            continue
        counter, bound = (_source(table, name) for name in compare.operands)
        index = (
            re.search(r"index=(\d+)", counter.attributes) if counter and counter.opcode == "get-tuple-element" else None
        )
        limit = _constant(bound)
        if index is None or limit is None or init is None or init.opcode != "tuple":
            continue
        if (
            int(index.group(1)) < len(init.operands)
            and _constant(_source(caller, init.operands[int(index.group(1))])) == 0
        ):
            step = _counter_step(loop, computations, int(index.group(1)))
            return float(math.ceil((limit + (direction.group(1) == "LE")) / step))
    return 1.0


def _counter_step(loop: Instruction, computations: dict[str, dict[str, Instruction]], index: int) -> int:
    """What a loop's body adds to element `index` of its state each iteration: `add(gte(param, index), constant)`
    at that position of the body's result tuple; 1 when the body does something else."""
    body = re.search(r"body=%?([\w.\-]+)", loop.attributes)
    table = computations.get(body.group(1), {}) if body else {}
    root = next((i for i in table.values() if i.root), None)
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
        return 1
    update = _source(table, root.operands[index])
    if update is None or update.opcode != "add" or len(update.operands) != 2:
        return 1
    for counter, step in (update.operands, update.operands[::-1]):
        element = _source(table, counter)
        same = element is not None and element.opcode == "get-tuple-element"
        if same and re.search(rf"\bindex={index}\b", element.attributes) and (_constant(table.get(step)) or 0) > 0:
            return _constant(table.get(step))
    return 1


def _source(table: dict[str, Instruction], name: str) -> Instruction | None:
    """The instruction behind `name`, through copies, bitcasts and converts."""
    instruction = table.get(name)
    while instruction is not None and instruction.opcode in ("copy", "bitcast", "convert") and instruction.operands:
        instruction = table.get(instruction.operands[0])
    return instruction


def _constant(instruction: Instruction | None) -> int | None:
    value = (
        re.fullmatch(r"\s*(-?\d+)\s*", instruction.args) if instruction and instruction.opcode == "constant" else None
    )
    return int(value.group(1)) if value else None


def _callees(
    instruction: Instruction, computations: dict | None = None, caller: dict | None = None
) -> list[tuple[str, float]]:
    """(computation, times per execution of the instruction) for every computation it calls."""
    attributes = instruction.attributes
    if instruction.opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", attributes)
        condition = re.search(r"condition=%?([\w.\-]+)", attributes)
        trips = trip_count(instruction, computations or {}, caller or {})
        return [(m.group(1), trips) for m in (body, condition) if m]
    called = re.findall(r"(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)", attributes)
    for group in re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", attributes):
        called += re.findall(r"%?([\w.\-]+)", group)
    return [(name, 1.0) for name in called]


def multipliers(computations: dict[str, dict[str, Instruction]]) -> dict[str, float]:
    """How many times each computation runs per execution of the entry computation."""
    times: dict[str, float] = defaultdict(float)
    times["ENTRY"] = 1.0
    order, seen = [], set()

    def visit(name: str) -> None:  # callers before callees (the call graph has no cycles)
        if name in seen or name not in computations:
            return
        seen.add(name)
        for instruction in computations[name].values():
            for callee, _ in _callees(instruction):
                visit(callee)
        order.append(name)

    visit("ENTRY")
    for name in reversed(order):
        for instruction in computations[name].values():
            for callee, count in _callees(instruction, computations, computations[name]):
                times[callee] += times[name] * count
    return dict(times)


def _matmul_flops(instruction: Instruction, table: dict[str, Instruction]) -> float:
    out = _first_array(instruction.shape)
    shapes = [_first_array(table[o].shape) if o in table else [] for o in instruction.operands[:2]]
    if instruction.opcode == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instruction.attributes)
        size = math.prod(shapes[0][d] for d in _dims(contracting.group(1))) if contracting and shapes[0] else 1
        return 2.0 * math.prod(out) * size
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attributes)
    if not labels or [len(s) for s in shapes] != [len(labels.group(1)), len(labels.group(2))]:
        return 0.0
    lhs, rhs, result = labels.groups()
    spec = re.search(r"window=\{([^}]*)\}", instruction.attributes)  # absent on a plain matmul: no spatial dims
    window = dict(re.findall(r"(\w+)=([0-9x_]+)", spec.group(1))) if spec else {}
    taps = 1.0  # average window taps per output position that land on real (not padded, not dilated) input
    for d, digit in enumerate(sorted(c for c in rhs if c.isdigit())):
        field = lambda key, default, d=d: window.get(key, "x".join([default] * len(shapes[1]))).split("x")[d]
        size, stride, dilate = int(field("size", "1")), int(field("stride", "1")), int(field("lhs_dilate", "1"))
        pad, window_dilate = int(field("pad", "0_0").split("_")[0]), int(field("rhs_dilate", "1"))
        extent, positions = (shapes[0][lhs.index(digit)] - 1) * dilate + 1, out[result.index(digit)]
        hits = sum(
            0 <= (p := o * stride + j * window_dilate - pad) < extent and p % dilate == 0
            for o in range(positions)
            for j in range(size)
        )
        taps *= hits / max(positions, 1)
    return 2.0 * math.prod(out) * shapes[1][rhs.index("i")] * taps


def _library_flops(instruction: Instruction, table: dict[str, Instruction]) -> float:
    """Matmul FLOPs of the GPU compiler's library calls, which are custom-calls rather than dots:
    * cuBLAS GEMMs (`__cublas$gemm`, `__cublas$lt$matmul`, what autotuning may pick on a real GPU): 2 · (result
      elements) · (contracted size), the contracting dimensions from the call's backend config;
    * cuDNN fused attention (`__cudnn$fmha...`): the call's [B, N, T, S] score tensor times the head dim H, two
      matmuls (scores, values) of 2·B·N·T·S·H forward and five backward (scores recomputed, then the gradients of
      values, probabilities, queries and keys); half of that with a causal mask, whose upper blocks the flash
      kernel skips (the model's FLOPs count attention causally the same way). Other custom-calls: 0."""
    target = re.search(r'custom_call_target="([^"]+)"', instruction.attributes)
    target = target.group(1) if target else ""
    if target.startswith("__cublas$"):
        contracting = re.search(r'"lhs_contracting_dimensions":\s*\[([^\]]*)\]', instruction.attributes)
        lhs = _first_array(table[instruction.operands[0]].shape) if instruction.operands[0] in table else []
        dims = [int(d) for d in re.findall(r"\d+", contracting.group(1))] if contracting else []
        return 2.0 * math.prod(_first_array(instruction.shape)) * math.prod(lhs[d] for d in dims if d < len(lhs))
    if not target.startswith("__cudnn$fmha"):
        return 0.0
    scores = re.search(r'"intermediate_tensor_shape":\s*\{[^}]*?"dimensions":\s*\[([^\]]*)\]', instruction.attributes)
    query = re.search(r"operand_layout_constraints=\{\s*([a-z0-9]+\[[0-9,]*\])", instruction.attributes)
    if not scores or not query:
        return 0.0
    head_dim = _first_array(query.group(1))[-1]
    matmuls = 5 if target.endswith("Backward") else 2
    causal = 0.5 if '"mask_type":"CAUSAL"' in instruction.attributes.replace(" ", "") else 1.0
    return matmuls * 2.0 * math.prod(int(d) for d in re.findall(r"\d+", scores.group(1))) * head_dim * causal


def _fusion_bytes(instruction: Instruction, computations, table) -> float:
    """Result and operand bytes of a fusion: a parameter that is only sliced inside counts as the slices it feeds;
    a fusion ending in a dynamic-update-slice or a scatter writes its update into the buffer in place (the buffer,
    its operand, is neither read nor written whole: a scan storing one layer's result into an [L, ...] array, the
    slot engine writing each row's new token into the KV cache)."""
    callees = _callees(instruction)
    body = computations.get(callees[0][0]) if callees else None
    root = next((i for i in body.values() if i.root), None) if body else None
    update_at = _IN_PLACE.get(root.opcode) if root is not None else None
    in_place = update_at is not None and len(root.operands) > update_at
    buffer = body.get(root.operands[0]) if in_place else None
    update = body.get(root.operands[update_at]) if in_place else None
    total = 2.0 * shape_bytes(update.shape) if update is not None else shape_bytes(instruction.shape)
    for index, operand in enumerate(instruction.operands):
        full = shape_bytes(table[operand].shape) if operand in table else 0.0
        if body is None:
            total += full
            continue
        if buffer is not None and buffer.opcode == "parameter" and buffer.args.strip() == str(index):
            continue  # updated in place
        params = [i for i in body.values() if i.opcode == "parameter" and i.args.strip() == str(index)]
        users = [u for p in params for u in body.values() if p.name in u.operands]
        sliced = users and all(
            u.opcode in ("dynamic-slice", "slice", "gather") and u.operands[0] in {p.name for p in params}
            for u in users
        )
        total += sum(shape_bytes(u.shape) for u in users) if sliced else full
    return total


def _traffic(instruction: Instruction, computations, table) -> float:
    if instruction.opcode in _NO_TRAFFIC:
        return 0.0
    if instruction.opcode == "dynamic-slice":
        return 2.0 * shape_bytes(instruction.shape)
    if instruction.opcode in _IN_PLACE:
        at = _IN_PLACE[instruction.opcode]
        update = table.get(instruction.operands[at]) if len(instruction.operands) > at else None
        return 2.0 * shape_bytes(update.shape) if update else 0.0
    if instruction.opcode == "fusion":
        return _fusion_bytes(instruction, computations, table)
    return shape_bytes(instruction.shape) + sum(shape_bytes(table[o].shape) for o in instruction.operands if o in table)


def replica_groups(attributes: str) -> list[list[int]] | None:
    """Device-id groups of a collective from any of XLA's three spellings; None when absent."""
    ids = r"(?:,\s*device_ids=\((\[[0-9,]*\](?:T\([0-9,]*\))?)\))?"
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]" + ids + r"\s*\{([^}]*)\}", attributes)
    if mesh:
        sizes = [int(s) for s in re.findall(r"=(\d+)", mesh.group(1))]
        names = re.findall(r"'([^']+)'=", mesh.group(1))
        ids = _iota(mesh.group(2)) if mesh.group(2) else np.arange(math.prod(sizes))
        grouped = [names.index(n) for n in re.findall(r"'([^']+)'", mesh.group(3))]
        kept = [i for i in range(len(sizes)) if i not in grouped]
        ids = np.transpose(ids.reshape(sizes), kept + grouped)
        return ids.reshape(-1, math.prod(sizes[i] for i in grouped)).tolist()
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=(\[[0-9,]*\](?:T\([0-9,]*\))?)", attributes)
    if iota:
        return _iota(iota.group(3)).reshape(int(iota.group(1)), int(iota.group(2))).tolist()
    explicit = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", attributes)
    if explicit:
        return [_dims(g) for g in re.findall(r"\{([0-9,]*)\}", explicit.group(1))] or None
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attributes)
    if pairs:
        return [_dims(p) for p in re.findall(r"\{(\d+,\d+)\}", pairs.group(1))]
    return None


def _iota(text: str) -> np.ndarray:
    """'[4,2]T(1,0)' -> iota(8).reshape(4, 2).transpose(1, 0).ravel(); '[8]' -> iota(8)."""
    match = re.fullmatch(r"\[([0-9,]*)\](?:T\(([0-9,]*)\))?", text.strip())
    dims = _dims(match.group(1))
    ids = np.arange(math.prod(dims)).reshape(dims)
    return (np.transpose(ids, _dims(match.group(2))) if match.group(2) else ids).ravel()


def spanned_axes(groups: list[list[int]] | None, mesh_shape: dict[str, int]) -> list[str]:
    """Mesh axes along which the devices of some group differ (device id = position in the mesh's order)."""
    if not groups:
        return [name for name, size in mesh_shape.items() if size > 1]  # no groups: every device together
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    spanned = set()
    for group in groups:
        coords = np.array(np.unravel_index(np.array(group) % math.prod(sizes), sizes))  # [axes, members]
        spanned |= {names[a] for a in range(len(names)) if len(set(coords[a].tolist())) > 1}
    return [name for name in names if name in spanned]


def _collective(instruction: Instruction, table: dict[str, Instruction]) -> tuple[str, Instruction] | None:
    """(kind, the instruction holding the replica groups) for a collective's sync op or its -done half."""
    opcode = instruction.opcode
    if opcode in COLLECTIVES:
        return opcode, instruction
    if opcode.endswith("-done") and opcode[: -len("-done")] in COLLECTIVES:
        start = table.get(instruction.operands[0]) if instruction.operands else None
        return opcode[: -len("-done")], start or instruction
    return None


def _widest(groups: list[list[int]] | None) -> list[int]:
    """The group whose device ids lie furthest apart (the one that may leave a node)."""
    return max(groups, key=lambda g: max(g) - min(g)) if groups else []


def _reduce_scatter_fusions(computations: dict[str, dict[str, Instruction]]) -> dict[str, Instruction]:
    """TPU writes a reduce-scatter as a fusion calling `%all-reduce-scatter...` (an all-reduce, then each device
    keeps its slice): callee name -> the all-reduce inside, counted once, as the reduce-scatter it is."""
    found = {}
    for table in computations.values():
        for instruction in table.values():
            callee = re.search(r"calls=%?(all-reduce-scatter[\w.\-]*)", instruction.attributes)
            if instruction.opcode == "fusion" and callee and callee.group(1) in computations:
                inner = [
                    i for i in computations[callee.group(1)].values() if i.opcode in ("all-reduce", "all-reduce-start")
                ]
                if inner:
                    found[callee.group(1)] = inner[0]
    return found


def analyze(text: str, mesh_shape: dict[str, int]) -> Analysis:
    """FLOPs, HBM traffic and collectives per device of one execution of an optimised HLO module."""
    computations = parse_module(text)
    times = multipliers(computations)
    fused = {
        c for instrs in computations.values() for i in instrs.values() if i.opcode == "fusion" for c, _ in _callees(i)
    }
    scatters = _reduce_scatter_fusions(computations)
    flops = traffic = 0.0
    grouped: dict[tuple[str, tuple[str, ...]], dict] = {}
    for name, table in computations.items():
        count = times.get(name, 0.0)
        if not count:
            continue
        for instruction in table.values():
            if instruction.opcode in ("dot", "convolution"):
                flops += count * _matmul_flops(instruction, table)
            elif instruction.opcode == "custom-call":
                flops += count * _library_flops(instruction, table)
            if name not in fused:
                traffic += count * _traffic(instruction, computations, table)
            callee = re.search(r"calls=%?([\w.\-]+)", instruction.attributes)
            if instruction.opcode == "fusion" and callee and callee.group(1) in scatters:
                inner = scatters[callee.group(1)]  # its input is the full buffer, as a reduce-scatter's
                _record(grouped, "reduce-scatter", inner, shape_bytes(inner.shape), count, mesh_shape)
                continue
            found = _collective(instruction, table) if name not in scatters else None
            if found is not None:
                kind, holder = found
                groups = replica_groups(holder.attributes)
                size = len(groups[0]) if groups else math.prod(mesh_shape.values())
                buffer = shape_bytes(instruction.shape) * (size if kind == "reduce-scatter" else 1)
                _record(grouped, kind, holder, buffer, count, mesh_shape)
    return Analysis(flops, traffic, [grouped[key] for key in sorted(grouped)])


def _record(grouped: dict, kind: str, holder: Instruction, buffer: float, count: float, mesh_shape: dict) -> None:
    """Add one collective (run `count` times per step) to its (kind, spanned axes) entry."""
    groups = replica_groups(holder.attributes)
    size = 2 if kind == "collective-permute" else len(groups[0]) if groups else math.prod(mesh_shape.values())
    axes = spanned_axes(groups, mesh_shape)
    entry = grouped.setdefault(
        (kind, tuple(axes)),
        {"kind": kind, "axes": axes, "count": 0, "bytes": 0.0, "group_size": size, "group": _widest(groups)},
    )
    entry["count"] += int(round(count))
    entry["bytes"] += count * buffer


def summary(analysis: Analysis) -> str:
    return json.dumps(dataclasses.asdict(analysis))
