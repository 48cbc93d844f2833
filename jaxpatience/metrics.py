"""Training metrics: one JSON line per step (TensorBoard too when `tensorboardX` is installed), and the PNG plot
of loss and chosen/rejected log-probs over steps that every run ends with."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    """Appends {"step": s, ...} lines to `metrics.jsonl`; a resumed run drops lines past its restart step."""

    def __init__(self, out_dir: str | Path, resume_step: int = 0, enabled: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Keep only the lines the resumed state has really seen (steps after the checkpoint are redone).
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if self.path.exists() else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        try:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        except ImportError:
            pass

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step} | {k: float(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_training(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """Loss (left) and log-probs of chosen / rejected responses (right) over steps. None if nothing to plot."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    series = lambda key: [r.get(key, math.nan) for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(steps, series("loss"), label="loss")
    if any("nll" in r for r in records):
        left.plot(steps, series("nll"), label="nll", alpha=0.7)
    left.set_xlabel("step")
    left.set_title("loss")
    left.legend()
    right.plot(steps, series("logps/chosen"), label="chosen")
    right.plot(steps, series("logps/rejected"), label="rejected")
    right.set_xlabel("step")
    right.set_title("sequence log-probs")
    right.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
