"""Every table and plot the commands print or write: eval, train, irpo and the demo.

Plots use matplotlib's object API (`Figure` + the Agg canvas), never pyplot: no global state, no display, safe
from threads and repeated calls. Each function takes the numbers it shows (summaries, metric records, lengths);
reading files is the caller's job, except `plot_training`, which reads the metrics file it is named after.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxpatience.durability.metrics import read_metrics

ANSWER_READINGS = ("strict", "flexible", "math_verify")  # the evaluator's answer readings (evaluate.METRICS)


def figure(width: float = 6.0, height: float = 4.0, columns: int = 1):
    """(figure, axes) of a new figure drawn by the Agg canvas (no pyplot); `columns` > 1 gives a row of axes."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, (fig.add_subplot() if columns == 1 else fig.subplots(1, columns))


def save(fig, path: str | Path) -> str:
    """Write a figure as PNG; returns the path as a string (summaries store it)."""
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return str(path)


# ---------------------------------------------------------------------------------------------------
# Training (training/loop.py): metrics.jsonl -> training.png.


def plot_training(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """Loss (left) and log-probs of chosen / rejected responses (right) over steps. None if nothing to plot."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    fig, (left, right) = figure(10, 3.6, columns=2)
    steps = [r["step"] for r in records]
    series = lambda key: [r.get(key, math.nan) for r in records]
    left.plot(steps, series("loss"), label="loss")
    if any("nll" in r for r in records):
        left.plot(steps, series("nll"), label="nll", alpha=0.7)
    left.set(xlabel="step", title="loss")
    left.legend()
    right.plot(steps, series("logps/chosen"), label="chosen")
    right.plot(steps, series("logps/rejected"), label="rejected")
    right.set(xlabel="step", title="sequence log-probs")
    right.legend()
    if title:
        fig.suptitle(title)
    save(fig, out_png)
    return Path(out_png)


# ---------------------------------------------------------------------------------------------------
# Evaluation (evaluation/evaluate.py, `jaxpatience eval`).


def plot_eval(summary: dict, out_dir: Path) -> dict[str, str]:
    """response_length.png (histogram) and, with several samples, maj_at_k.png (the test-time-compute curve)."""
    paths = {}
    hist = summary["response_tokens"]["histogram"]
    fig, ax = figure()
    ax.stairs(hist["counts"], hist["bin_edges"], fill=True)
    ax.axvline(summary["mean_response_tokens"], color="k", linestyle="--", label="mean")
    ax.set(xlabel="response length (tokens)", ylabel="responses", title="Response length")
    ax.legend()
    paths["response_length"] = save(fig, out_dir / "response_length.png")
    if summary["samples"] > 1:
        fig, ax = figure()
        ks = [int(k) for k in summary["maj_at_k"]]
        ax.plot(ks, [summary["maj_at_k"][str(k)] for k in ks], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])  # 1, 2, 4 rather than 2^0, 2^1, 2^2
        ax.set_ylim(0, 1)
        ax.set(xlabel="samples k", ylabel="maj@k accuracy", title="Test-time compute: majority vote")
        paths["maj_at_k"] = save(fig, out_dir / "maj_at_k.png")
    return paths


def format_eval_summary(summary: dict) -> str:
    """An evaluation summary in a few lines for the terminal."""
    low, high = summary["accuracy_ci95"]
    lines = [
        f"accuracy ({summary['metric']}): {summary['accuracy']:.3f}  [95% CI {low:.3f}-{high:.3f}]  "
        f"n={summary['n_problems']}"
    ]
    for name, m in summary["metrics"].items():
        lines.append(f"  {name:<12} {m['accuracy']:.3f}" if "accuracy" in m else f"  {name:<12} ({m['unavailable']})")
    if summary["samples"] > 1:
        lines.append("  maj@k " + "  ".join(f"@{k}={v:.3f}" for k, v in summary["maj_at_k"].items()))
    t = summary["response_tokens"]
    lines.append(
        f"response tokens: mean {t['mean']:.1f}, median {t['median']:.1f}, truncated {t['truncated_share']:.1%}"
    )
    b = summary["behaviour"]
    lines.append(f"verify {b['verify_share']:.1%}, backtrack {b['backtrack_share']:.1%}")
    timing = summary["timing"]
    if timing.get("tokens_per_s"):
        warm = f" ({timing['tokens_per_s_warm']:.1f} warm)" if timing.get("tokens_per_s_warm") else ""
        lines.append(
            f"generation {timing['generation_s']:.1f}s, {timing['tokens_per_s']:.1f} tokens/s{warm}"
            + (f", wall {timing['wall_s']:.1f}s" if "wall_s" in timing else "")
        )
    return "\n".join(lines)


def compare_table(before: dict, after: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """A before/after table of two summaries: the headline numbers and their change (shares in points)."""

    def get(summary: dict, *keys):
        for key in keys:
            summary = summary.get(key) if isinstance(summary, dict) else None
        return summary

    def show(value, is_share: bool) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f}%" if is_share else (f"{value:.1f}" if isinstance(value, float) else str(value))

    def change(a, b, is_share: bool) -> str:
        if a is None or b is None:
            return ""
        return (
            f"{100 * (b - a):+.1f} pts"
            if is_share
            else (f"{b - a:+.1f}" if isinstance(b - a, float) else f"{b - a:+d}")
        )

    several = max(before.get("samples", 1), after.get("samples", 1)) > 1
    ks = sorted({*before.get("maj_at_k", {}), *after.get("maj_at_k", {})}, key=int) if several else []
    rows = [  # (label, keys into the summary, is a share)
        (f"accuracy ({before.get('metric')} / {after.get('metric')})", ("accuracy",), True),
        *[(f"  {name}", ("metrics", name, "accuracy"), True) for name in ANSWER_READINGS],
        *[(f"maj@{k}", ("maj_at_k", k), True) for k in ks],
        ("mean response tokens", ("mean_response_tokens",), False),
        ("median response tokens", ("median_response_tokens",), False),
        ("truncated share", ("response_tokens", "truncated_share"), True),
        ("verify share", ("behaviour", "verify_share"), True),
        ("backtrack share", ("behaviour", "backtrack_share"), True),
        ("tokens/s (warm)", ("timing", "tokens_per_s_warm"), False),
        ("problems", ("n_problems",), False),
    ]
    table = [("", *names, "change")]
    for label, keys, is_share in rows:
        a, b = get(before, *keys), get(after, *keys)
        table.append((label, show(a, is_share), show(b, is_share), change(a, b, is_share)))
    # The 95% interval under the accuracy, so a reader sees at once whether the change is more than noise.
    ci = [get(s, "accuracy_ci95") for s in (before, after)]
    table.insert(2, ("  95% CI", *("-" if c is None else f"{100 * c[0]:.1f}-{100 * c[1]:.1f}" for c in ci), ""))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = [
        "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)])
        for row in table
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Iterative RPO (recipes/irpo.py): accuracy per iteration.


def irpo_table(rows: Sequence[dict]) -> str:
    lines = [f"{'iter':>4}  {'accuracy':>8}  {'95% CI':>15}  {'pairs':>6}  {'resp. tokens':>12}"]
    for row in rows:
        ci = row.get("accuracy_ci95")
        ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
        lines.append(
            f"{row['iteration']:>4}  {row['accuracy']:>8.3f}  {ci_text:>15}  {row.get('pairs', '-'):>6}  "
            f"{row['mean_response_tokens']:>12.1f}"
        )
    return "\n".join(lines)


def plot_irpo(rows: Sequence[dict], path: Path) -> str:
    """Held-out accuracy per iteration (0 = the start model), with 95% intervals when every row has one."""
    fig, ax = figure(5, 3.4)
    xs = [r["iteration"] for r in rows]
    ys = [r["accuracy"] for r in rows]
    if all(r.get("accuracy_ci95") for r in rows):
        lows = [y - r["accuracy_ci95"][0] for y, r in zip(ys, rows, strict=True)]
        highs = [r["accuracy_ci95"][1] - y for y, r in zip(ys, rows, strict=True)]
        ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3)
    else:
        ax.plot(xs, ys, marker="o")
    ax.set(xlabel="iteration (0 = base model)", ylabel="held-out accuracy", xticks=xs, ylim=(0, 1))
    return save(fig, path)


# ---------------------------------------------------------------------------------------------------
# The demo (recipes/demo.py): one table and three plots over its stages.


def demo_table(summary: dict) -> str:
    lines = [f"{'stage':<30} {'accuracy':>8}  {'95% CI':>13}  {'patient':>7}  {'resp. tokens':>12}  {'wall s':>7}"]
    named = [
        ("base (SFT, concise default)", summary["base"]),
        ("base, answer started", summary["base_forced_patient_start"]),
        ("Patience (DPO + NLL + LoRA)", summary["patience_nll"]),
        ("Patience, plain DPO (ablation)", summary["patience"]),
    ]  # the headline row first: plain DPO is the fragile one at toy scale (docs/RESULTS.md)
    named += [(f"IRPO iteration {r['iteration']} ({r['pairs']} pairs)", r) for r in summary["irpo"]]
    for name, r in named:
        low, high = r["accuracy_ci95"]
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else ""
        lines.append(
            f"{name:<30} {r['accuracy']:>8.3f}  [{low:.2f}, {high:.2f}]  {r['patient_share']:>7.0%}  "
            f"{r['mean_response_tokens']:>12.1f}  {wall:>7}"
        )
    lines.append(f"(wall s: the stage's training, or IRPO's iterations all told; whole demo {summary['wall_s']:.0f} s)")
    return "\n".join(lines)


def plot_stage_accuracy(stages: Sequence[tuple[str, dict]], path: Path) -> str:
    """A bar per stage (name, row with accuracy and accuracy_ci95): base grey, Patience blue, IRPO orange."""
    fig, ax = figure(7)
    ys = [r["accuracy"] for _, r in stages]
    errors = [
        [y - r["accuracy_ci95"][0] for y, (_, r) in zip(ys, stages, strict=True)],
        [r["accuracy_ci95"][1] - y for y, (_, r) in zip(ys, stages, strict=True)],
    ]
    colors = ["C1" if name.startswith("IRPO") else "grey" if name == "base" else "C0" for name, _ in stages]
    ax.bar([name for name, _ in stages], ys, yerr=errors, capsize=4, color=colors)
    ax.set(ylabel="held-out accuracy (95% CI)", ylim=(0, 1), title="Accuracy per stage")
    return save(fig, path)


def plot_response_lengths(lengths: dict[str, Sequence[int]], max_tokens: int, path: Path) -> str:
    """Overlaid histograms of response lengths in tokens, one per named model."""
    fig, ax = figure()
    for name, values in lengths.items():
        ax.hist(values, bins=range(0, max_tokens + 8, 4), alpha=0.6, label=name)
    ax.set(xlabel="response length (tokens)", ylabel="held-out responses", title="Response length before / after")
    ax.legend()
    return save(fig, path)


def plot_logps(panels: dict[str, tuple[dict[str, Sequence[dict]], Sequence[str]]], path: Path) -> str:
    """One panel per title, given (runs, sides): the sequence log-probs of each side ("chosen" solid, "rejected"
    dashed) over training steps, one colour per named run (its metrics records). Empty panels are left out."""
    panels = {title: panel for title, panel in panels.items() if panel[0]}
    fig, axes = figure(5 * len(panels), 4, columns=len(panels))
    for ax, (title, (runs, sides)) in zip([axes] if len(panels) == 1 else axes, panels.items(), strict=True):
        for i, (name, records) in enumerate(runs.items()):
            steps = [r["step"] for r in records]
            for side in sides:
                ax.plot(
                    steps,
                    [r[f"logps/{side}"] for r in records],
                    color=f"C{i}",
                    linestyle="-" if side == "chosen" else "--",
                    label=f"{name}: {side}",
                )
        ax.set(xlabel="training step", ylabel="sequence log-prob (policy)", title=title)
        ax.legend(fontsize=8)
    return save(fig, path)
