"""Training metrics: one JSON line per step in OUT/metrics.jsonl (TensorBoard too when `tensorboardX` is
installed). report.plot_training draws them."""

from __future__ import annotations

import json
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
