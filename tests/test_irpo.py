"""Iterative RPO: self-play pairing on hand-made sample sets, and the loop for two iterations on a tiny model."""

from __future__ import annotations

import json
import random

from jaxpatience.data import answers
from jaxpatience.data.selfplay import pair_samples, pairs_from_generations


def _record(pid: str, response: str, correct: bool, answer: str = "5") -> dict:
    return {"id": pid, "response": response, "correct": {"strict": correct}, "strict": answer, "flexible": answer,
            "gold": "5"}  # fmt: skip


def test_pairing_all_right_all_wrong_mixed_and_cap():
    records = [_record("right", f"r{i}", True) for i in range(4)]
    records += [_record("wrong", f"w{i}", False, "7") for i in range(4)]
    records += [_record("mixed", f"good{i}", True) for i in range(3)] + [_record("mixed", f"bad{i}", False, "6")
                                                                          for i in range(5)]  # fmt: skip
    prompts = {"right": "P1", "wrong": "P2", "mixed": "P3"}
    pairs, stats = pairs_from_generations(records, prompts, metric="strict", max_pairs=4, iteration=2)
    assert stats.problems == 3 and stats.all_correct == 1 and stats.all_wrong == 1 and stats.with_pairs == 1
    assert stats.pairs == len(pairs) == 4  # 3 x 5 = 15 combinations, capped at K = 4
    assert abs(stats.sample_accuracy - 7 / 16) < 1e-9
    for pair in pairs:
        assert pair["prompt"] == "P3" and pair["iteration"] == 2 and pair["problem_id"] == "mixed"
        assert pair["chosen"].startswith("good") and pair["rejected"].startswith("bad")
        assert pair["chosen_answer"] == "5" and pair["rejected_answer"] == "6"
    assert len({(p["chosen"], p["rejected"]) for p in pairs}) == 4  # distinct pairs
    # a cap above the number of combinations keeps them all
    pairs, _ = pairs_from_generations(records, prompts, metric="strict", max_pairs=100, iteration=1)
    assert len(pairs) == 15


def test_duplicate_responses_count_once():
    samples = [{"response": "same", "correct": True}] * 3 + [{"response": "bad", "correct": False}]
    assert len(pair_samples(samples, max_pairs=10, rng=random.Random(0))) == 1


def test_an_empty_sample_is_left_out_of_the_pairs():
    # A model that stops at once writes "": no pair may hold it (the pair loader refuses an empty response), and a
    # problem whose only wrong sample is empty gives no pair: its answers were all right.
    records = [
        {"id": "a", "response": text, "correct": {"strict": ok}, "strict": answer, "flexible": answer, "gold": "5"}
        for text, ok, answer in [("good 5", True, "5"), ("  ", False, None), ("bad 6", False, "6")]
    ] + [{"id": "b", "response": r, "correct": {"strict": ok}, "strict": None, "flexible": None, "gold": "5"}
         for r, ok in [("good", True), ("", False)]]  # fmt: skip
    pairs, stats = pairs_from_generations(records, {"a": "P", "b": "Q"}, metric="strict", max_pairs=4, iteration=1)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("good 5", "bad 6")]
    assert stats.empty_samples == 2 and stats.with_pairs == 1 and (stats.all_correct, stats.all_wrong) == (1, 0)
    assert "2 empty samples left out" in stats.summary()


def _sft_pairs(path, rng: random.Random, count: int):
    """Format-teaching data: 'What is a + b?' -> 'a + b = c. The answer is c.'"""
    lines = []
    for _ in range(count):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        answer = f"{a} + {b} = {a + b}. The answer is {a + b}."
        lines.append({"prompt": f"What is {a} + {b}?", "chosen": answer, "rejected": answer})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _problems(path, rng: random.Random, count: int, offset: int):
    lines = []
    for i in range(count):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        lines.append({"id": f"p{offset + i}", "question": f"What is {a} + {b}?", "answer": f"#### {a + b}"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_irpo_loop_runs_two_iterations_and_resumes(tiny_checkpoint, tmp_path):
    from jaxpatience.recipes.irpo import load_irpo_config, run_irpo
    from jaxpatience.training.loop import load_run_config, train

    rng = random.Random(0)
    # A tiny random model first learns the answer format (full-parameter SFT with our own train step), so that
    # its sampled answers are sometimes right and sometimes wrong: the mix IRPO pairs on.
    _sft_pairs(tmp_path / "sft.jsonl", rng, 64)
    sft = load_run_config(None, [
        f"model={tiny_checkpoint(tied=True)}", f"data.path={tmp_path / 'sft.jsonl'}", f"out_dir={tmp_path / 'sft'}",
        "data.max_length=128", "data.buckets=[128]", "data.chat_template=true", "train.lora=null",
        "train.loss.dpo_weight=0", "train.loss.nll_weight=1", "train.batch_size=16", "train.max_steps=100",
        "train.optimizer.learning_rate=3e-3", "train.optimizer.warmup_steps=5", "checkpoint_every=1000",
    ])  # fmt: skip
    base = train(sft, progress=False)["exports"]["merged"]
    _problems(tmp_path / "train.jsonl", rng, 12, 0)
    _problems(tmp_path / "eval.jsonl", rng, 8, 100)
    args = [
        f"model={base}", f"out_dir={tmp_path / 'irpo'}", f"train_problems={tmp_path / 'train.jsonl'}",
        f"eval_problems={tmp_path / 'eval.jsonl'}", "prompt_style=question", "sampling.num_samples=8",
        "sampling.temperature=0.7", "max_pairs_per_problem=3", "sampling.max_new_tokens=24",
        "generation_batch_size=12", "training.data.max_length=128", "training.data.buckets=[128]",
        "training.train.batch_size=4", "training.train.lora.rank=4", "training.train.optimizer.learning_rate=1e-3",
        "training.epochs=1",
    ]  # fmt: skip
    first = run_irpo(load_irpo_config(None, [*args, "iterations=1"]), progress=False)
    assert [row["iteration"] for row in first["iterations"]] == [0, 1]
    merged_1 = tmp_path / "irpo" / "iter_1" / "train" / "merged" / "model.safetensors"
    stamp = merged_1.stat().st_mtime_ns
    second = run_irpo(load_irpo_config(None, [*args, "iterations=2"]), progress=False)
    rows = second["iterations"]
    assert [row["iteration"] for row in rows] == [0, 1, 2]
    assert merged_1.stat().st_mtime_ns == stamp  # iteration 1 was finished: not redone
    assert rows[1]["accuracy"] == first["iterations"][1]["accuracy"]
    for iteration in (1, 2):
        step = tmp_path / "irpo" / f"iter_{iteration}"
        pairs = [json.loads(line) for line in (step / "pairs.jsonl").read_text().splitlines()]
        assert pairs and all(p["iteration"] == iteration for p in pairs)
        assert all(p["chosen_answer"] == p["gold"] != p["rejected_answer"] for p in pairs)
        assert (step / "train" / "adapter" / "adapter_model.safetensors").is_file()
        assert (step / "eval" / "summary.json").is_file()
    # each row's accuracy is what its greedy generations on disk say, counted here independently of the evaluator
    for row, folder in zip(rows, ["base_eval", "iter_1/eval", "iter_2/eval"], strict=True):
        records = [
            json.loads(line) for line in (tmp_path / "irpo" / folder / "generations.jsonl").read_text().splitlines()
        ]
        right = [answers.answers_equal(answers.extract_strict(r["response"]), r["gold"]) for r in records]
        assert len(records) == 8 and row["accuracy"] == sum(right) / 8
    assert (tmp_path / "irpo" / "irpo.png").read_bytes()[:4] == b"\x89PNG"


def test_pairs_stage_killed_after_its_stats_is_redone(tiny_checkpoint, tmp_path):
    """write_pairs writes the stats, then the pairs file: a stats file alone is an unfinished stage."""
    from jaxpatience.config import IrpoConfig
    from jaxpatience.data.problems import Problem
    from jaxpatience.recipes.irpo import _make_pairs

    problems = [Problem("p0", "What is 1 + 1?", "2")]
    samples = tmp_path / "samples"
    samples.mkdir()
    records = [_record("p0", "The answer is 2.", True, "2"), _record("p0", "The answer is 3.", False, "3")]
    (samples / "generations.jsonl").write_text("".join(json.dumps({**r, "sample": i}) + "\n"
                                                       for i, r in enumerate(records)))  # fmt: skip
    (tmp_path / "pairs.jsonl.stats.json").write_text(json.dumps({"pairs": 99}))  # the kill came before the pairs
    config = IrpoConfig(model=str(tiny_checkpoint()), out_dir=str(tmp_path), prompt_style="question")
    stats = _make_pairs(config, config.model, problems, 1, {"metric": "strict"}, tmp_path)
    assert stats["pairs"] == 1 and (tmp_path / "pairs.jsonl").is_file()
    assert _make_pairs(config, config.model, problems, 1, {"metric": "strict"}, tmp_path) == stats  # now done
