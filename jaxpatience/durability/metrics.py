"""Training metrics: one JSON line per logged step in OUT/metrics.jsonl, through the durable JSONL store
(store.py), and TensorBoard too when `tensorboardX` is installed. plot_training (evaluation/report.py) draws them."""

from __future__ import annotations

from pathlib import Path

from jaxpatience.durability.store import JsonlStore, read_jsonl


class MetricsWriter:
    """Appends {"step": s, ...} lines to `metrics.jsonl`; a resumed run drops lines past its restart step."""

    def __init__(self, out_dir: str | Path, resume_step: int = 0, enabled: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        self.store = None
        if not enabled:
            return
        try:  # optional: TensorBoard files only where tensorboardX is installed
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        except ImportError:
            pass
        self.store = JsonlStore(self.path, required=("step",)).open()  # last: nothing after it can fail and leak it
        # Keep only the lines the resumed state has really seen (steps after the checkpoint are redone).
        self.store.rewrite([r for r in self.store.records if r["step"] <= resume_step])

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.store.append([{"step": step} | {k: float(v) for k, v in metrics.items()}])
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl ([] if there is none; a torn last line of a killed run is left out)."""
    return read_jsonl(path, required=("step",))
