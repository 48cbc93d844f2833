"""Problem sources (local files, gsm_symbolic, the hub when offline) and prompt styles."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tokenizer

from jaxpatience.data.problems import (
    GSM8K_COT_EXEMPLARS,
    Problem,
    ProblemsError,
    as_problem,
    build_prompt,
    cut_at_stop_strings,
    load_file,
    load_problems,
)

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A car costs $1,200 and a bike $300. Total?", "answer": "1200 + 300 = 1500\n#### 1,500"},
    {"question": "Sara had 10 coins and lost 12. Balance?", "answer": "10 - 12 = -2\n#### -2"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_gsm8k_jsonl(tmp_path):
    problems = load_problems(str(write_jsonl(tmp_path / "gsm8k_test.jsonl", GSM8K_ROWS)))
    assert [p.answer for p in problems] == ["7", "1,500", "-2"]  # the bare gold after '####'
    assert [p.question for p in problems] == [row["question"] for row in GSM8K_ROWS]
    assert len({p.id for p in problems}) == 3
    assert load_problems(str(tmp_path / "gsm8k_test.jsonl"), limit=2) == problems[:2]


def test_math_layouts_json_and_parquet(tmp_path):
    math500 = [{"problem": "Compute 1/2 + 1/4.", "answer": "\\frac{3}{4}", "unique_id": "test/algebra/1.json"}]
    hendrycks = [{"problem": "What is 2+2?", "solution": "We add: $2+2=\\boxed{4}$, as expected."}]
    (tmp_path / "math.json").write_text(json.dumps(math500 + hendrycks))
    problems = load_file(tmp_path / "math.json")
    assert problems[0] == Problem("test/algebra/1.json", "Compute 1/2 + 1/4.", "\\frac{3}{4}")
    assert problems[1].answer == "4"  # the last \boxed{} of the solution

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS), tmp_path / "gsm8k.parquet")
    assert [p.answer for p in load_problems(str(tmp_path / "gsm8k.parquet"))] == ["7", "1,500", "-2"]


def test_bad_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GSM8K_ROWS[0]) + "\n\n" + '{"question": "x", "answer": \n')
    with pytest.raises(ProblemsError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_file(bad)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(json.dumps(GSM8K_ROWS[0]).encode() + b"\n\xff\xfe 2\n")
    with pytest.raises(ProblemsError, match=r"binary\.jsonl, line 2: not UTF-8"):
        load_file(binary)
    missing = write_jsonl(tmp_path / "missing.jsonl", [GSM8K_ROWS[0], {"answer": "#### 5"}])
    with pytest.raises(ProblemsError, match=r"missing\.jsonl, line 2: missing or empty field question"):
        load_file(missing)
    empty_gold = write_jsonl(tmp_path / "gold.jsonl", [{"question": "q", "answer": "work ####"}])
    with pytest.raises(ProblemsError, match=r"gold\.jsonl, line 1: the answer has nothing after"):
        load_file(empty_gold)
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"id": "a", **GSM8K_ROWS[0]}, {"id": "a", **GSM8K_ROWS[1]}])
    with pytest.raises(ProblemsError, match="id 'a' occurs twice"):
        load_file(twice)
    with pytest.raises(ProblemsError, match=r"problem file .*nowhere\.jsonl does not exist"):
        load_problems(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(ProblemsError, match="unknown dataset 'gsm9k': use one of gsm8k, math, gsm_symbolic"):
        load_problems("gsm9k")


def test_gsm_symbolic_is_seeded():
    pytest.importorskip("reasoning_gym", reason="gsm_symbolic needs reasoning-gym")
    first = load_problems("gsm_symbolic", limit=5, seed=3)
    assert first == load_problems("gsm_symbolic", limit=5, seed=3)  # same seed, same problems
    assert first != load_problems("gsm_symbolic", limit=5, seed=4)
    assert all(p.question and p.answer for p in first)
    assert len({p.id for p in first}) == 5


def test_gsm_symbolic_without_reasoning_gym(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # as if not installed: import raises ImportError
    with pytest.raises(ProblemsError, match="needs reasoning-gym: pip install reasoning-gym"):
        load_problems("gsm_symbolic", limit=2)


def test_hub_dataset_offline_gives_one_sentence(tmp_path):
    """With no network (simulated: offline mode, an empty cache), the user is told how to use a local file."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"), JAX_PLATFORMS="cpu")  # fmt: skip
    env.pop("JAXPATIENCE_DEBUG", None)
    run = subprocess.run(
        [sys.executable, "-m", "jaxpatience.cli", "eval", "--model", str(tmp_path / "unused"), "--dataset", "gsm8k",
         "--out", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    message = run.stderr.strip()
    assert "\n" not in message  # one line, no traceback
    assert "openai/gsm8k" in message and "--dataset path/to/gsm8k_test.jsonl" in message


def test_prompt_styles():
    tokenizer = make_tokenizer()
    problem = Problem("p", "Tom has 3 apples and buys 4 more. How many?", "7")
    zero = build_prompt(problem, tokenizer, "zero_shot")
    assert zero.startswith("<|im_start|>system") and zero.endswith("<|im_start|>assistant\n")
    assert problem.question in zero and "The answer is N" in zero
    assert "\\boxed{}" in build_prompt(Problem("m", "Simplify.", "\\frac{\\pi}{2}"), tokenizer, "zero_shot")
    few = build_prompt(problem, tokenizer, "few_shot")
    assert few.count("<|im_start|>assistant") == 9  # 8 exemplar answers + the open turn
    assert all(q in few and a in few for q, a in GSM8K_COT_EXEMPLARS)
    plain = build_prompt(problem, tokenizer, "few_shot_plain")
    assert "<|im_start|>" not in plain and plain.count("Q: ") == 9 and plain.endswith(f"Q: {problem.question}\nA:")
    bare = build_prompt(problem, tokenizer, "question")
    assert bare.endswith(f"<|im_start|>user\n{problem.question}<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt(problem, tokenizer, lambda p: f"<<{p.question}>>") == f"<<{problem.question}>>"
    with pytest.raises(ProblemsError, match="unknown prompt style 'one_shot'"):
        build_prompt(problem, tokenizer, "one_shot")


def test_as_problem_accepts_records_and_objects():
    @dataclasses.dataclass
    class ToyLike:  # like data/toy.py's ToyProblem: an int answer and extra fields
        id: str
        question: str
        answer: int
        steps: tuple = ()

    assert as_problem(ToyLike("t1", "Tom has 3 apples.", 72)) == Problem("t1", "Tom has 3 apples.", "72")
    assert as_problem({"id": 5, "question": "q", "answer": " 7 "}) == Problem("5", "q", "7")
    with pytest.raises(ProblemsError, match="a problem lacks answer"):
        as_problem({"id": "x", "question": "q"})


def test_exemplars_are_correct():
    """Each exemplar's stated answer is the result of its last computation (a typo would teach the model wrong)."""
    from jaxpatience.data.answers import extract_strict

    expected = ["6", "5", "39", "8", "9", "29", "33", "8"]
    assert [extract_strict(answer) for _, answer in GSM8K_COT_EXEMPLARS] == expected


def test_cut_at_stop_strings():
    assert cut_at_stop_strings(" 3 + 4 = 7. The answer is 7.\n\nQ: Another question?") == " 3 + 4 = 7. The answer is 7."
    assert cut_at_stop_strings("no stop here") == "no stop here"
