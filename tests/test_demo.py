"""The toy demo, reduced in size: every stage leaves its artifacts, and accuracy is measured (not a number hit)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from jaxpatience.config import ConfigError
from jaxpatience.recipes.demo import HEADLINE, load_demo_config, run_demo

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def sweep():
    """scripts/demo_sweep.py as a module (it imports profile_demo from its own folder)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location("demo_sweep", SCRIPTS / "demo_sweep.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(SCRIPTS))


def _accuracy_from_generations(path) -> float:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(bool(r["correct"]["strict"]) for r in records) / len(records)


def test_small_demo_runs_every_stage_and_resumes(tmp_path, capsys, sweep):
    out = tmp_path / "demo"
    config = load_demo_config(small=True)
    summary = run_demo(config, out, progress=False)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["base"] == summary["base"] and on_disk["wall_s"] > 0
    for name in ("base", "patience", "patience_nll"):
        assert summary[name]["mean_response_tokens"] > 0
    assert summary["base"]["n"] == config.eval_problems
    # accuracy is what the greedy generations on disk say, read independently of the evaluator's summary
    assert summary["base"]["accuracy"] == pytest.approx(
        _accuracy_from_generations(out / "irpo" / "base_eval" / "generations.jsonl")
    )
    for name in ("patience", "patience_nll"):  # DPO, and DPO + NLL from the same base on the same pairs
        assert summary[name]["accuracy"] == pytest.approx(
            _accuracy_from_generations(out / f"{name}_eval" / "generations.jsonl")
        )
        assert set(summary[name]) == set(summary["patience"]) and summary[name]["n"] == config.eval_problems
    nll = json.loads((out / "patience_nll" / "config.json").read_text())
    assert nll["train"]["loss"]["nll_weight"] == config.patience_nll_weight > 0
    assert json.loads((out / "patience" / "config.json").read_text())["train"]["loss"]["nll_weight"] == 0
    assert len(list((out / "data" / ".reference_cache").glob("*.npy"))) == 1  # one reference pass, used twice
    assert len(summary["irpo"]) == config.irpo.iterations, "IRPO found no pairs: the small base learnt nothing"
    for row in summary["irpo"]:
        it = row["iteration"]
        assert row["pairs"] > 0
        assert row["accuracy"] == pytest.approx(
            _accuracy_from_generations(out / "irpo" / f"iter_{it}" / "eval" / "generations.jsonl")
        )
        assert (out / "irpo" / f"iter_{it}" / "train" / "merged" / "model.safetensors").is_file()
    # the base model and the Patience model are ordinary HF checkpoints; the plots are real PNGs
    for folder in (out / "base" / "merged", out / "patience" / "merged", out / "patience_nll" / "merged"):
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    for name in ("accuracy", "response_length", "logps"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["stage_s"]) >= {"data", "init", "base_sft", "base_eval", "patience_train", "patience_nll_train",
                                       "irpo"}  # fmt: skip
    table = capsys.readouterr().out
    # the headline Patience row (DPO + NLL) comes before the plain-DPO ablation, and summary.json names it
    assert summary["headline"] == HEADLINE == "patience_nll"
    assert -1 < table.index("Patience (DPO + NLL + LoRA)") < table.index("plain DPO (ablation)")
    assert "IRPO iteration 1" in table

    # a rerun finds every stage done: same results, no stage runs again
    again = run_demo(config, out, progress=False)
    assert again["base"] == summary["base"] and again["irpo"] == summary["irpo"]
    assert again["stage_s"] == summary["stage_s"]

    # the same folder with other settings is refused
    with pytest.raises(ConfigError, match=r"other settings \(seed\)"):
        run_demo(load_demo_config(["seed=1"], small=True), out, progress=False)

    _check_sweep_reuses_unchanged_stages(sweep, config, summary, out, tmp_path)


def _check_sweep_reuses_unchanged_stages(sweep, config, summary, out, tmp_path) -> None:
    """The seed sweep reuses what a changed setting does not touch: here the base and IRPO, not the Patience runs."""
    changed = dataclasses.replace(config, patience_nll_weight=2 * config.patience_nll_weight)
    keys, old_keys = sweep.group_keys(changed), sweep.group_keys(config)
    assert [keys[g] == old_keys[g] for g in sweep.GROUPS] == [True, True, False, True]
    (out / sweep.SWEEP_KEYS).write_text(json.dumps(old_keys))
    second = tmp_path / "second"
    assert sweep.reuse_stages(second, tmp_path, keys) == ["base", "patience", "irpo"]
    rerun = run_demo(changed, second, progress=False)
    for stage in ("base_sft", "patience_train", "irpo"):  # copied, with the times they took in the first run
        assert rerun["stage_s"][stage] == summary["stage_s"][stage]
    assert rerun["base"] == summary["base"] and rerun["irpo"] == summary["irpo"]
    assert rerun["stage_s"]["patience_nll_train"] != summary["stage_s"]["patience_nll_train"]  # trained again
    nll = json.loads((second / "patience_nll" / "config.json").read_text())
    assert nll["train"]["loss"]["nll_weight"] == 2 * config.patience_nll_weight
    row = sweep.seed_row(rerun)
    assert row["accuracy"]["headline"] == rerun["patience_nll"]["accuracy"]
    assert row["accuracy"]["other"] == rerun["patience"]["accuracy"]


def test_sweep_seeds_and_criteria(sweep):
    assert sweep.parse_seeds("0-3,7,2") == [0, 1, 2, 3, 7]
    for bad in ("a", "3-1", "0-", ""):
        with pytest.raises(SystemExit, match="--seeds"):
            sweep.parse_seeds(bad)

    def row(accuracy, low, high, tokens=5.0):
        return {"accuracy": accuracy, "accuracy_ci95": [low, high], "mean_response_tokens": tokens,
                "patient_share": 0.0}  # fmt: skip

    summary = {
        "seed": 4,
        "headline": "patience_nll",
        "base": row(0.20, 0.16, 0.25),
        "base_forced_patient_start": row(0.70, 0.65, 0.75, 40.0),
        "patience_nll": row(0.36, 0.31, 0.41, 44.0),
        "patience": row(0.10, 0.07, 0.14, 60.0),
        "irpo": [{**row(0.30, 0.25, 0.35), "iteration": 1, "pairs": 9}, {**row(0.26, 0.21, 0.31), "iteration": 2,
                                                                            "pairs": 8}],
        "stage_s": {},
        "wall_s": 1.0,
    }  # fmt: skip
    checks = sweep.seed_row(summary)["checks"]
    assert checks == {"patience": True, "other_row": True, "irpo_rise": True, "irpo_hold": True}
    summary["patience_nll"] = row(0.34, 0.29, 0.39, 44.0)  # 14 points over the base: short of 15
    summary["irpo"][1]["accuracy"] = 0.24  # below iteration 1's interval: a fall
    checks = sweep.seed_row(summary)["checks"]
    assert not checks["patience"] and not checks["irpo_hold"] and checks["irpo_rise"]
    summary["irpo"] = summary["irpo"][:1]  # IRPO stopped after one iteration
    assert not sweep.seed_row(summary)["ok"]
    assert "fails patience, irpo_hold" in sweep.table([sweep.seed_row(summary)])
