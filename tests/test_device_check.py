"""scripts/device_check.py on the CPU: the tiny preset runs every stage and writes a complete JSON report; the
budget is honoured between stages; bad input is one sentence and writes nothing."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "device_check.py"


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def assert_positive(section: dict, *keys: str) -> None:
    bad = {key: section.get(key) for key in keys if not positive(section.get(key))}
    assert not bad, f"not positive and finite: {bad}"


def test_tiny_preset_measures_and_predicts_every_stage(tmp_path):
    out = tmp_path / "nested" / "check.json"
    done = run_check("--preset", "tiny", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["finished"] and report["preset"] == "tiny"
    assert report["environment"]["jax"] and report["environment"]["device_kind"]
    assert_positive(report["environment"]["chip"], "peak_flops", "hbm_bw", "hbm_bytes")
    stages = report["stages"]
    assert list(stages) == ["train", "decode", "full_set"]  # most important first
    assert {name: s["status"] for name, s in stages.items()} == dict.fromkeys(stages, "done"), stages

    train = stages["train"]
    assert_positive(train["measured"], "compile_s", "step_s", "tokens_per_s", "mfu", "model_flops_per_step")
    assert_positive(train["measured"]["memory"], "peak_gib")
    assert train["measured"]["steps"] == report["settings"]["steps"]
    # the plan's twin holds the packed step's token slots, in the same micro-batches, for the same model
    twin = train["plan"]["job"]
    assert 2 * twin["batch_size"] * twin["seq_len"] == train["measured"]["token_slots_per_step"]
    assert twin["micro_batches"] == train["measured"]["micro_batches"] and twin["model_name"] == "tiny"
    assert_positive(train["plan"], "predicted_step_s", "predicted_mfu", "measured_over_predicted_step", "compile_s")
    assert train["plan"]["memory_bytes"]["total"] > 0

    decode = stages["decode"]["measured"]
    assert_positive(decode, "wall_s", "tokens_per_s", "slot_tokens_per_s", "hbm_bound_tokens_per_s", "of_hbm_bound")
    assert decode["engine"]["tokens"] == decode["useful_tokens"]  # every row ran to its budget
    assert decode["hbm_bound_tokens_per_s"] < decode["weights_only_bound_tokens_per_s"]  # the cache costs bytes
    plan = stages["decode"]["plan"]
    assert plan["job"]["kind"] == "decode" and plan["job"]["seq_len"] == decode["cache_len"]
    assert_positive(plan, "predicted_step_s", "predicted_tokens_per_s", "predicted_wall_s")

    assert json.loads(done.stdout.strip().splitlines()[-1]) == report["summary"]  # the last line printed
    assert_positive(report["summary"], *(key for key in report["summary"] if key != "status"))

    full = stages["full_set"]["measured"]
    assert full["prompts"] == report["settings"]["full_set"] and full["warm_up_s"] is None
    assert_positive(full, "wall_s", "tokens_per_s")
    assert_positive(stages["full_set"]["plan"], "predicted_wall_s")


def load_script(monkeypatch):
    """The script as a module (scripts/ is no package), for the checks that need no subprocess."""
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "device_check", module)  # its dataclasses look their module up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts scripts/ on the path for its benchmark helpers
    spec.loader.exec_module(module)
    return module


def test_a_spent_budget_skips_every_stage_and_still_writes_the_report(tmp_path, monkeypatch):
    out = tmp_path / "check.json"
    assert load_script(monkeypatch).main(["--preset", "tiny", "--budget-s", "0.001", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["finished"]
    assert [s["status"] for s in report["stages"].values()] == ["skipped"] * 3


def test_bad_budget_is_one_sentence_and_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "check.json"
    with pytest.raises(SystemExit) as exit_info:
        load_script(monkeypatch).main(["--budget-s", "-5", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "--budget-s: must be a positive number of seconds, not '-5'" in capsys.readouterr().err
    assert not out.exists()
