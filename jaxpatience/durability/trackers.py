"""Experiment trackers: TensorBoard and Weights & Biases, only when a run asks (`report: [tensorboard, wandb]`).

They receive what metrics.jsonl receives, line for line (MetricsWriter, metrics.py, feeds both), under the same
metric names (`loss`, `rewards/accuracies`, `tokens_per_s`, ...) and steps, on process 0 only (the one that writes
metrics.jsonl). Neither package is a dependency: the `[track]` extra brings them, and a run that asks for a
tracker whose package is missing is refused before it writes anything (RunConfig's check of `report`,
config.py, which holds the table of trackers).

* tensorboard: event files in OUT/tensorboard through `tensorboardX` (no TensorFlow). A resumed run starts its
  writer with `purge_step`, so TensorBoard drops the steps after the checkpoint that the run redoes, as
  metrics.jsonl does.
* wandb: a run in OUT/wandb whose id is kept in OUT/wandb_run_id, so a resume continues it. With no credentials
  (neither WANDB_API_KEY nor a `wandb login` in ~/.netrc) and no WANDB_MODE it runs offline, and a line says how
  to upload it later (`wandb sync`); WANDB_MODE, WANDB_PROJECT and the other WANDB_* variables are honoured.
"""

from __future__ import annotations

import netrc
import os
import secrets
import sys
from pathlib import Path
from typing import Protocol


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, out_dir: Path, resume_step: int):
        from tensorboardX import SummaryWriter  # here: only runs that ask for TensorBoard import it

        # purge_step: TensorBoard discards the earlier events from this step on (the steps a resume redoes)
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a logged step is on disk, as its metrics.jsonl line is

    def close(self) -> None:
        self.writer.close()


def _wandb_credentials() -> bool:
    """An API key in the environment or a `wandb login` entry in ~/.netrc (what wandb itself reads)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class _WandB:
    def __init__(self, out_dir: Path, run_config: dict):
        import wandb  # here: only runs that ask for W&B import it

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_credentials() else "offline")
        if mode == "offline" and "WANDB_MODE" not in os.environ:
            print(
                f"jaxpatience: W&B runs offline (no WANDB_API_KEY or `wandb login`); upload it later with "
                f"`wandb sync {out_dir / 'wandb'}/offline-run-*`.",
                file=sys.stderr,
            )
        id_file = out_dir / "wandb_run_id"  # one W&B run per training run, continued by a resume
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        (out_dir / "wandb").mkdir(exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "jaxpatience"),
            name=out_dir.name,
            id=run_id,
            resume="allow",
            dir=str(out_dir),
            mode=mode,
            config=run_config,
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(report: tuple[str, ...], out_dir: str | Path, resume_step: int, run_config: dict) -> list[Tracker]:
    """The trackers `report` names, writing under `out_dir` (call on process 0 only)."""
    out_dir = Path(out_dir)
    opened: list[Tracker] = []
    try:
        for name in dict.fromkeys(report):  # each once, in the order given
            opened.append(_TensorBoard(out_dir, resume_step) if name == "tensorboard" else _WandB(out_dir, run_config))
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened
