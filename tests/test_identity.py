"""A rerun knows what it resumes: training, evaluation and IRPO refuse to continue a folder made from other
inputs (edited data, replaced weights, other problems), and say how much is already done; data that would train
or score silently wrong (identical pairs, unreadable gold answers) is refused or left out with a warning."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import make_hf_checkpoint, make_tokenizer
from test_evaluate import ScriptedGenerator, scripted_problems
from test_run import config_args, write_pairs

from jaxpatience.config import ConfigError, EvalConfig, IrpoConfig, SamplingConfig
from jaxpatience.data.answers import unreadable_gold
from jaxpatience.data.pairs import DataError, PairLoader
from jaxpatience.data.problems import Problem
from jaxpatience.durability import identity
from jaxpatience.evaluation.evaluate import EvalError, evaluate, evaluate_checkpoint
from jaxpatience.recipes.irpo import _check_rerun
from jaxpatience.training.loop import _warn_about_settings, load_run_config, train


def test_a_resume_refuses_edited_data_and_replaced_weights(tiny_checkpoint, tmp_path, capsys):
    checkpoint, pairs = tiny_checkpoint(), write_pairs(tmp_path / "pairs.jsonl")
    config = load_run_config(None, config_args(checkpoint, pairs, tmp_path / "out"))
    train(config, progress=False, stop_after=3)
    lines = pairs.read_text().splitlines()
    edited = json.loads(lines[5]) | {"chosen": "An edited answer. The answer is 7."}
    pairs.write_text("\n".join([*lines[:5], json.dumps(edited), *lines[6:]]) + "\n")  # same count, one pair edited
    with pytest.raises(ConfigError, match=r"made from other inputs: the data differ"):
        train(config, progress=False)
    pairs.write_text("\n".join(lines) + "\n")  # the original data again
    weights = checkpoint / "model.safetensors"
    original = weights.read_bytes()
    make_hf_checkpoint(checkpoint, seed=1)  # another model, same shapes, written over the same folder
    assert weights.read_bytes() != original
    with pytest.raises(ConfigError, match=r"the model's files \(model\.safetensors changed\)"):
        train(config, progress=False)
    weights.write_bytes(original)
    capsys.readouterr()
    assert train(config, progress=False)["resumed_from"] == 3
    assert "resuming from step 3 of 8" in capsys.readouterr().out


def test_an_eval_rerun_checks_its_problems_and_keeps_a_larger_summary(tmp_path, capsys):
    problems, script = scripted_problems(n=6, samples=1)
    run = dict(out_dir=tmp_path, progress=False, plots=False, sampling=SamplingConfig(max_new_tokens=64))
    whole = evaluate(None, make_tokenizer(), problems, generate_fn=ScriptedGenerator(script), **run)
    assert whole["n_problems"] == 6
    summary = (tmp_path / "summary.json").read_text()
    capsys.readouterr()
    part = evaluate(None, make_tokenizer(), problems[:2], generate_fn=ScriptedGenerator(script), **run)
    out = capsys.readouterr().out
    assert part["n_problems"] == 2 and "2 of 2 problems already done" in out
    assert "holds 4 more problems than this run's 2" in out
    assert (tmp_path / "summary.json").read_text() == summary  # the larger summary is not overwritten
    other_gold = [dataclasses.replace(problems[0], answer="11"), *problems[1:]]
    with pytest.raises(EvalError, match="another problem q0 \\(its gold answer differs\\)"):
        evaluate(None, make_tokenizer(), other_gold, generate_fn=ScriptedGenerator(script), **run)
    reworded = [dataclasses.replace(problems[1], question=problems[1].question + " Be careful."), *problems[2:]]
    with pytest.raises(EvalError, match="another problem q1 \\(its question differs\\)"):
        evaluate(None, make_tokenizer(), reworded, generate_fn=ScriptedGenerator(script), **run)


def test_an_eval_rerun_refuses_replaced_weights(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint()
    config = EvalConfig(model=str(checkpoint), dataset="unused", out_dir=str(tmp_path / "eval"),
                        prompt_style="question", sampling=SamplingConfig(max_new_tokens=4))  # fmt: skip
    problems = [Problem("a", "What is 2 + 3?", "5"), Problem("b", "What is 1 + 1?", "2")]
    evaluate_checkpoint(config, problems, progress=False, plots=False)
    inputs = json.loads((tmp_path / "eval" / "run.json").read_text())["inputs"]
    assert set(inputs["model"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    make_hf_checkpoint(checkpoint, seed=3)
    with pytest.raises(ConfigError, match=r"eval was made from other inputs: the model's files \(model\.safetensors"):
        evaluate_checkpoint(config, problems, progress=False, plots=False)


def test_an_irpo_rerun_refuses_another_config_or_other_problems(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint()
    config = IrpoConfig(model=str(checkpoint), train_problems="t.jsonl", eval_problems="e.jsonl", out_dir=str(tmp_path))
    problems = [Problem("a", "What is 2 + 3?", "5")]
    inputs = {**identity.model_inputs(checkpoint), "train_problems": identity.problems_fingerprint(problems)}
    _check_rerun(tmp_path, config, inputs)  # a new folder: nothing to compare
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    (tmp_path / "inputs.json").write_text(json.dumps(inputs))
    _check_rerun(tmp_path, dataclasses.replace(config, iterations=3, generation_batch_size=4), inputs)  # allowed
    train = config.training.train
    train = dataclasses.replace(train, mesh=dataclasses.replace(train.mesh, fsdp=2))
    moved = dataclasses.replace(config, out_dir=str(tmp_path.resolve()), train_problems="elsewhere/t.jsonl",
                                training=dataclasses.replace(config.training, train=train))  # fmt: skip
    _check_rerun(tmp_path, moved, inputs)  # another mesh, the same inputs under other paths: allowed
    with pytest.raises(ConfigError, match=r"another config \(differs in: max_pairs_per_problem\)"):
        _check_rerun(tmp_path, dataclasses.replace(config, max_pairs_per_problem=2), inputs)
    other = [dataclasses.replace(problems[0], answer="6")]
    changed = dict(inputs, train_problems=identity.problems_fingerprint(other))
    with pytest.raises(ConfigError, match="other inputs: the train_problems differ"):
        _check_rerun(tmp_path, config, changed)


def test_identical_pairs_are_left_out_with_a_warning_or_refused_when_all(tmp_path, capsys):
    tokenizer = make_tokenizer()
    records = [{"prompt": f"What is {i} + 3?", "chosen": f"{i} + 3 = {i + 3}. #### {i + 3}", "rejected": "#### 1"}
               for i in range(8)]  # fmt: skip
    records[2]["rejected"] = records[2]["chosen"]
    records[5]["rejected"] = records[5]["chosen"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loader = PairLoader.from_source(path, tokenizer, batch_size=2, max_length=64)
    assert len(loader.pairs) == 6 and loader.stats.identical == 2 and loader.stats.pairs == 6
    assert "2 of 8 pairs have the same chosen and rejected text" in capsys.readouterr().err
    assert all(not np.array_equal(p.chosen, p.rejected) for p in loader.pairs)
    sft = PairLoader.from_source(path, tokenizer, batch_size=2, max_length=64, chosen_only=True)
    assert len(sft.pairs) == 8  # SFT reads the chosen side only: nothing to leave out
    path.write_text("".join(json.dumps(dict(r, rejected=r["chosen"])) + "\n" for r in records))
    with pytest.raises(DataError, match="every pair of .*pairs.jsonl has the same chosen and rejected"):
        PairLoader.from_source(path, tokenizer, batch_size=2, max_length=64)


def test_the_data_fingerprint_follows_content_not_place(tmp_path):
    tokenizer = make_tokenizer()
    a, b = write_pairs(tmp_path / "a.jsonl"), tmp_path / "b.jsonl"
    b.write_bytes(a.read_bytes())
    fingerprint = PairLoader.from_source(a, tokenizer, batch_size=2, max_length=160).fingerprint
    assert fingerprint == PairLoader.from_source(b, tokenizer, batch_size=2, max_length=160).fingerprint
    b.write_text(a.read_text().replace("The answer", "the answer", 1))
    assert fingerprint != PairLoader.from_source(b, tokenizer, batch_size=2, max_length=160).fingerprint


@pytest.mark.parametrize(
    ("gold", "readable"),
    [("18", True), ("-3.5", True), ("1,000", True), ("\\frac{1}{2}", True), ("(3, 4)", True), ("x^2+1", True),
     ("\\text{east}", True), ("(C)", True), ("x", True), ("B, E", True), ("AB", True), ("blue", False),
     ("Sunday", False),
     ("Add them up and you get the total of the apples", False)],
)  # fmt: skip
def test_gold_answers_no_reading_can_score_are_named(gold, readable):
    assert (unreadable_gold(gold) is None) == readable


def test_settings_that_do_not_do_what_they_seem_are_warned(capsys):
    config = load_run_config(None, ["model=m", "data.path=p", "data.max_length=4096", "keep_checkpoints=0"])
    _warn_about_settings(config, context=2048)
    err = capsys.readouterr().err
    assert "data.max_length=4096 is past the model's context (2048 positions)" in err
    assert "keep_checkpoints=0 keeps no checkpoint" in err
    _warn_about_settings(load_run_config(None, ["model=m", "data.path=p"]), context=32768)
    assert capsys.readouterr().err == ""
