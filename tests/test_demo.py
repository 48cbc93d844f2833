"""The toy demo, reduced in size: every stage leaves its artifacts, and accuracy is measured (not a number hit)."""

from __future__ import annotations

import json

import pytest

from jaxpatience.config import ConfigError
from jaxpatience.recipes.demo import load_demo_config, run_demo


def _accuracy_from_generations(path) -> float:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(bool(r["correct"]["strict"]) for r in records) / len(records)


def test_small_demo_runs_every_stage_and_resumes(tmp_path, capsys):
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
    assert "Patience (DPO + LoRA)" in table and "Patience (DPO + NLL + LoRA)" in table and "IRPO iteration 1" in table

    # a rerun finds every stage done: same results, no stage runs again
    again = run_demo(config, out, progress=False)
    assert again["base"] == summary["base"] and again["irpo"] == summary["irpo"]
    assert again["stage_s"] == summary["stage_s"]

    # the same folder with other settings is refused
    with pytest.raises(ConfigError, match=r"other settings \(seed\)"):
        run_demo(load_demo_config(["seed=1"], small=True), out, progress=False)
