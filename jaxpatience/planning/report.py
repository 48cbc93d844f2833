"""A plan's rows as a terminal table, JSON, CSV, markdown and a PNG (time per roofline term, memory per device)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from jaxpatience.evaluation.report import figure, save

COLUMNS = (
    "rank",
    "mesh",
    "fits",
    "mem GB",
    "temp GB",
    "temp/layer",
    "compile s",
    "HLO/model FLOPs",
    "gather GB",
    "comm GB",
    "pred ms (max/sum)",
    "pred MFU",
    "pred tok/s",
    "meas ms",
    "meas MFU",
)


def mesh_text(sizes: dict[str, int]) -> str:
    return ",".join(f"{axis}={size}" for axis, size in sizes.items() if size > 1) or "data=1"


def row_name(row: dict, settings: bool = False) -> str:
    """The row's mesh; with `settings` (fit advice) also its remat policy and micro-batches: `fsdp=8 lora/2`."""
    name = mesh_text(row["mesh"])
    return f"{name} {row.get('remat')}/{row.get('micro_batches')}" if settings else name


def _cells(row: dict, settings: bool = False) -> list[str]:
    if "error" in row:
        return [str(row.get("rank", "-")), row_name(row, settings), "NO", row["error"][:60]] + [""] * (len(COLUMNS) - 4)
    gb = lambda x: f"{x / 1e9:.3g}"
    memory = row["memory_bytes"]
    ratio = row["hlo_flops"] / row["model_flops"] if row["model_flops"] else 0.0
    measured = row.get("measured_step_s")
    return [
        str(row["rank"]),
        row_name(row, settings),
        ("yes" if row["fits"] else "NO") + (" (XLA remat)" if row.get("warnings") else ""),
        gb(memory["total"]),
        gb(memory["temp"]),
        f"{memory['temp'] / row['layer_bytes']:.1f}",
        f"{row['compile_s']:.1f}" + (" (cached)" if row.get("cached") else ""),
        f"{ratio:.2f}" + (" !" if ratio > 1.1 * row.get("remat_factor", math.inf) else ""),
        gb(row["gathered_bytes"]),
        gb(sum(c["bytes"] for c in row["collectives"])),
        f"{row['predicted_step_s'] * 1e3:.3g} / {row['predicted_step_sum_s'] * 1e3:.3g}",
        f"{row['predicted_mfu']:.1%}",
        "" if row.get("predicted_tokens_per_s") is None else f"{row['predicted_tokens_per_s']:,.0f}",
        "" if measured is None else f"{measured * 1e3:.3g}",
        "" if row.get("measured_mfu") is None else f"{row['measured_mfu']:.1%}",
    ]


def table(rows: Sequence[dict], markdown: bool = False, settings: bool = False) -> str:
    """The ranked rows, one line each (aligned text, or a markdown table). `settings`: the mesh column also names
    each row's remat policy and micro-batches (`fsdp=8 lora/2`, the fit advice). "(XLA remat)" after `fits`: the
    compiler printed a memory warning and recomputed on its own to approach the chip's memory (the row's
    `warnings`). "!" after HLO/model FLOPs: over 10% above what the remat policy (and packed rows' padding)
    explains (`remat_factor`): the program repeats work. "pred tok/s": real tokens per step over the predicted
    step time (`plan --packed`: the drawn sequences' tokens, not the rows' padding)."""
    header = list(COLUMNS)
    if settings:
        header[1] = "mesh remat/micro"
    cells = [header] + [_cells(row, settings) for row in rows]
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in cells]
        return "\n".join([lines[0], "|" + "---|" * len(COLUMNS), *lines[1:]])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells)


def collectives_text(row: dict) -> str:
    """`all-gather fsdp ×145 2.29 GB; ...` for one row."""
    return "; ".join(
        f"{c['kind']} {'+'.join(c['axes']) or '-'} ×{c['count']} {c['bytes'] / 1e9:.3g} GB"
        + (" (across nodes)" if c.get("crosses_node") else "")
        for c in row.get("collectives", [])
    )


def write_json(rows: Sequence[dict], path: str | Path) -> None:
    Path(path).write_text(json.dumps(list(rows), indent=1))


def write_csv(rows: Sequence[dict], path: str | Path) -> None:
    fields = (
        "rank",
        "mesh",
        "remat",
        "micro_batches",
        "compiler",
        "attention",
        "fits",
        "weights",
        "trained",
        "batch",
        "temp",
        "output",
        "total",
        "compile_s",
        "xla_flops",
        "hlo_flops",
        "model_flops",
        "layer_bytes",
        "gathered_bytes",
        "compute_s",
        "hbm_s",
        "collective_s",
        "predicted_step_s",
        "predicted_step_sum_s",
        "predicted_mfu",
        "tokens",
        "predicted_tokens_per_s",
        "measured_step_s",
        "measured_mfu",
        "measured_tokens_per_s",
        "rows",
        "padding_share",
        "collectives",
        "warnings",
        "error",
    )
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fields)
        writer.writeheader()
        for row in rows:
            flat = {k: row.get(k) for k in fields} | row.get("memory_bytes", {}) | row.get("predicted", {})
            flat |= row.get("packing") or {}  # plan --packed: the rows and their padding share
            flat |= {"mesh": mesh_text(row["mesh"]), "collectives": collectives_text(row)}
            flat |= {"warnings": "; ".join(row.get("warnings", []))}
            writer.writerow({k: flat.get(k) for k in fields})


def write_png(rows: Sequence[dict], path: str | Path, capacity: float) -> str:
    """Left: predicted ms per term (stacked: the sum bound); right: memory per device against the chip's."""
    rows = [row for row in rows if "error" not in row]
    fig, (time_axes, memory_axes) = figure(12, 0.45 * len(rows) + 2.0, columns=2)
    settings = len({(row.get("remat"), row.get("micro_batches")) for row in rows}) > 1  # fit advice
    labels = [row_name(row, settings) for row in rows]
    ys = range(len(rows))
    left = [0.0] * len(rows)
    for term, colour in (("compute_s", "tab:blue"), ("hbm_s", "tab:green"), ("collective_s", "tab:red")):
        values = [row["predicted"][term] * 1e3 for row in rows]
        time_axes.barh(ys, values, left=left, color=colour, label=term[:-2])
        left = [a + b for a, b in zip(left, values, strict=True)]
    time_axes.set(yticks=list(ys), yticklabels=labels, xlabel="predicted ms per step (stacked = sum bound)")
    time_axes.invert_yaxis()
    time_axes.legend(loc="lower right")
    left = [0.0] * len(rows)
    for part, colour in (
        ("weights", "tab:gray"),
        ("trained", "tab:orange"),
        ("batch", "tab:purple"),
        ("temp", "tab:cyan"),
        ("output", "tab:olive"),
    ):
        values = [row["memory_bytes"].get(part, 0) / 1e9 for row in rows]
        memory_axes.barh(ys, values, left=left, color=colour, label=part)
        left = [a + b for a, b in zip(left, values, strict=True)]
    memory_axes.axvline(capacity / 1e9, color="black", linestyle="--", label="chip memory")
    memory_axes.set(yticks=list(ys), yticklabels=labels, xlabel="GB per device")
    memory_axes.invert_yaxis()
    memory_axes.legend(loc="lower right")
    return save(fig, path)
