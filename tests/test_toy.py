"""The toy world: problems are seeded, held-out questions are unseen, and both renderings compute the gold answer."""

from __future__ import annotations

import random
import re

import pytest

from jaxpatience.data import toy
from jaxpatience.data.answers import extract_strict


def _replay(problem: toy.ToyProblem) -> int:
    """Recompute the answer from the question text alone (an independent reading of the wording)."""
    value = int(re.match(r"\w+ has (\d+) ", problem.question).group(1))
    for sentence in problem.question.split(". ")[1:]:
        if m := re.search(r"finds (\d+) more", sentence):
            value += int(m.group(1))
        elif m := re.search(r"gives away (\d+)", sentence):
            value -= int(m.group(1))
        elif m := re.search(r"buys (\d+) bags of (\d+)", sentence):
            value += int(m.group(1)) * int(m.group(2))
        elif "double" in sentence:
            value *= 2
    return value


@pytest.mark.parametrize(("num_ops", "max_value"), [(1, 99), (3, 30), (5, 99)])
def test_question_patient_and_concise_agree_with_the_gold_answer(num_ops, max_value):
    for problem in toy.make_problems(200, seed=num_ops, num_ops=num_ops, max_value=max_value, max_operand=9):
        assert _replay(problem) == problem.answer > 0
        patient, concise = toy.render_patient(problem), toy.render_concise(problem)
        assert extract_strict(patient) == extract_strict(concise) == str(problem.answer)
        lines = patient.splitlines()
        assert lines[0].startswith("Start with") and lines[-2].startswith("Check:")
        assert len(lines) == num_ops + 3  # start, one line per operation, check, answer
        for line in lines[1:-1]:  # every equation written out is true
            for left, right in re.findall(r"([\d+\-*/ ]+?) = (\d+)", line.replace("Check: ", "")):
                assert eval(left) == int(right), line  # noqa: S307 - digits and operators only
        assert len(concise.splitlines()) == 1


def test_seeded_and_disjoint_split():
    a_train, a_test = toy.make_split(seed=3, num_train=500, num_test=100)
    b_train, b_test = toy.make_split(seed=3, num_train=500, num_test=100)
    assert [p.question for p in a_train] == [p.question for p in b_train] and a_test == b_test
    assert not {p.question for p in a_train} & {p.question for p in a_test}
    assert len({p.id for p in a_train + a_test}) == 600
    c_train, _ = toy.make_split(seed=4, num_train=500, num_test=100)
    assert [p.question for p in c_train] != [p.question for p in a_train]
    record = a_test[0].record()
    assert set(record) == {"id", "question", "answer"} and record["answer"] == str(a_test[0].answer)


def test_too_small_a_world_for_the_split_is_an_error():
    with pytest.raises(ValueError, match="held-out"):
        toy.make_split(seed=0, num_train=5000, num_test=4000, num_ops=1, max_value=3)


@pytest.mark.parametrize(("max_value", "max_operand"), [(20, None), (30, 9), (99, 9)])
def test_every_quantity_stays_in_range(max_value, max_operand):
    rng = random.Random(0)
    for i in range(300):
        problem = toy.make_problem(rng, i, num_ops=4, max_value=max_value, max_operand=max_operand)
        assert all(1 <= s.before <= max_value and 1 <= s.after <= max_value for s in problem.steps)
        assert all(s.a <= (max_operand or max_value) for s in problem.steps if s.kind in ("add", "sub"))
        assert all(2 <= s.a <= 9 and 2 <= s.b <= 9 for s in problem.steps if s.kind == "bags")


def test_toy_tokenizer_keeps_whole_numbers_through_save_and_load(tmp_path):
    """transformers builds a Qwen2 checkpoint's tokenizer with Qwen2's digit split; load_tokenizer keeps the file's."""
    from flax import nnx

    from jaxpatience.config import preset
    from jaxpatience.model.qwen2 import Qwen2ForCausalLM
    from jaxpatience.model.tokenizer import NUMBERS_SPLIT_REGEX, load_tokenizer, train_bpe_tokenizer
    from jaxpatience.model.weights import save_pretrained

    problems = toy.make_problems(300, seed=0, max_value=30, max_operand=9)
    tokenizer = train_bpe_tokenizer(toy.corpus(problems), vocab_size=400, split_regex=NUMBERS_SPLIT_REGEX)
    text = toy.render_patient(problems[0])
    tokens = tokenizer.tokenize(text)
    assert f"Ġ{problems[0].answer}" in tokens  # " 14" is one token, not " ", "1", "4"
    config = preset("tiny").replace(vocab_size=len(tokenizer), tie_word_embeddings=True)
    save_pretrained(Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)), tokenizer, tmp_path / "ckpt")
    loaded = load_tokenizer(tmp_path / "ckpt")
    assert loaded.tokenize(text) == tokens and loaded.encode(text) == tokenizer.encode(text)
