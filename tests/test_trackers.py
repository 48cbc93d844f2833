"""Experiment trackers (durability/trackers.py): `report: [tensorboard]` writes event files TensorBoard's own reader
reads back with metrics.jsonl's names, steps and values; W&B gets the same lines, offline without credentials;
only process 0 writes; unknown or uninstalled trackers are refused at the door."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from test_run import config_args, write_pairs

from jaxpatience import config as config_module
from jaxpatience.config import ConfigError, RunConfig, load_config
from jaxpatience.durability.metrics import MetricsWriter, read_metrics
from jaxpatience.training.loop import load_run_config, train


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard log folder, read by TensorBoard's EventAccumulator: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_report_tensorboard_writes_what_metrics_jsonl_holds_across_a_resume(tiny_checkpoint, tmp_path):
    pytest.importorskip("tensorboardX")
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = config_args(tiny_checkpoint(), write_pairs(tmp_path / "pairs.jsonl", count=8), out, "report=[tensorboard]")
    config = load_run_config(None, [*args, "train.max_steps=4", "checkpoint_every=2"])
    train(config, progress=False, stop_after=2)  # a stop and a resume: two writers, one log
    train(config, progress=False)
    lines = read_metrics(out / "metrics.jsonl")
    scalars = _scalars(out / "tensorboard")
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert set(scalars) == set(lines[0]) - {"step"}  # the same metric names, `loss`, `rewards/accuracies`, ...
    for name, points in scalars.items():
        assert [step for step, _ in points] == [1, 2, 3, 4], name
        np.testing.assert_array_equal([value for _, value in points], np.float32([line[name] for line in lines]))


def test_only_process_0_writes_and_wandb_gets_the_same_lines_offline(tmp_path, monkeypatch):
    """W&B through a stand-in module (the package is optional): mode, run id kept for a resume, and the lines."""
    calls = []
    run = types.SimpleNamespace(log=lambda values, step: calls.append(("log", step, values)),
                                finish=lambda: calls.append(("finish",)))  # fmt: skip
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: calls.append(kw) or run))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no `wandb login`
    other = MetricsWriter(tmp_path / "other", enabled=False, report=("wandb",))  # process 1 of 2
    other.write(1, {"loss": 0.5})
    other.close()
    assert calls == [] and not (tmp_path / "other").exists()
    (tmp_path / "run").mkdir()
    writer = MetricsWriter(tmp_path / "run", report=("wandb",), run_config={"model": "m"})
    writer.write(1, {"loss": 0.5, "rewards/accuracies": 1.0})
    writer.close()
    init = calls[0]
    assert init["mode"] == "offline" and init["config"] == {"model": "m"} and init["resume"] == "allow"
    assert init["id"] == (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert calls[1:] == [("log", 1, {"loss": 0.5, "rewards/accuracies": 1.0}), ("finish",)]
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == [{"step": 1, "loss": 0.5, "rewards/accuracies": 1.0}]
    MetricsWriter(tmp_path / "run", resume_step=1, report=("wandb",)).close()  # a resume continues the same run
    assert calls[-2]["id"] == init["id"]


def test_unknown_or_missing_trackers_are_refused_at_the_door(monkeypatch):
    with pytest.raises(ConfigError, match=r"report: unknown tracker 'tensorbored'; choose from tensorboard, wandb"):
        load_config(RunConfig, None, ["report=[tensorbored]"])
    monkeypatch.setitem(config_module.TRACKERS, "wandb", "no_such_module_for_wandb")
    with pytest.raises(ConfigError, match="report: wandb needs the no_such_module_for_wandb package"):
        load_config(RunConfig, None, ["report=[wandb]"])
    assert load_config(RunConfig, None, []).report == ()  # nothing is tracked unless asked
