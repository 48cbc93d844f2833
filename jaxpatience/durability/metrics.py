"""Training metrics: one JSON line per logged step in OUT/metrics.jsonl, through the durable JSONL store
(store.py), and the same lines to the trackers a run asks for (`report`, trackers.py). plot_training
(evaluation/report.py) draws them."""

from __future__ import annotations

from pathlib import Path

from jaxpatience.durability.store import JsonlStore, read_jsonl
from jaxpatience.durability.trackers import open_trackers


class MetricsWriter:
    """Appends {"step": s, ...} lines to `metrics.jsonl`; a resumed run drops lines past its restart step."""

    def __init__(
        self,
        out_dir: str | Path,
        resume_step: int = 0,
        enabled: bool = True,
        report: tuple[str, ...] = (),
        run_config: dict | None = None,
    ):
        """`report`: the trackers (trackers.py) that get every line too; `run_config` is what W&B records."""
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.trackers = []
        self.store = None
        if not enabled:
            return
        self.trackers = open_trackers(report, out_dir, resume_step, run_config or {})
        try:
            self.store = JsonlStore(self.path, required=("step",)).open()  # last: nothing after it can fail and leak it
        except BaseException:
            self.close()
            raise
        # Keep only the lines the resumed state has really seen (steps after the checkpoint are redone).
        self.store.rewrite([r for r in self.store.records if r["step"] <= resume_step])

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self.store.append([{"step": step} | values])
        for tracker in self.trackers:
            tracker.log(step, values)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        for tracker in self.trackers:
            tracker.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl ([] if there is none; a torn last line of a killed run is left out)."""
    return read_jsonl(path, required=("step",))
