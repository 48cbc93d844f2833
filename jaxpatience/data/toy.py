"""The toy world of the demo: seeded multi-step arithmetic word problems with two renderings of each solution.

A problem chains a few operations on one quantity (add, subtract, "buys A bags with B each", double), every
value in [1, max_value] (the demo: 20). Answering in one shot needs all the arithmetic done "in the head" — hard
for a tiny transformer — while writing one operation per line makes each step a single easy sum: the gap the
Patience paper relies on (the demo's base: about 24% concise against 71-79% with the patient format started for
it; docs/RESULTS.md).

    concise: The answer is 72.
    patient: Start with 23.
             4 * 7 = 28. 23 + 28 = 51.
             51 - 15 = 36.
             36 * 2 = 72.
             Check: 72 / 2 = 36.
             The answer is 72.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

NAMES = ("Tom", "Ann", "Raj", "Mia", "Leo", "Zoe", "Sam", "Ivy")
ITEMS = ("apples", "coins", "books", "cards", "shells", "stamps")


@dataclass(frozen=True)
class Step:
    kind: str  # add, sub, bags, double
    before: int
    after: int
    a: int = 0  # the operand (bags: the number of bags)
    b: int = 0  # bags: items per bag


@dataclass(frozen=True)
class ToyProblem:
    id: str
    question: str
    answer: int
    steps: tuple[Step, ...] = field(repr=False)

    def record(self) -> dict:
        """The uniform problem record ({id, question, answer}) that the evaluator and pair builders read."""
        return {"id": self.id, "question": self.question, "answer": str(self.answer)}


def make_problem(
    rng: random.Random, index: int, num_ops: int = 3, max_value: int = 99, max_operand: int | None = None
) -> ToyProblem:
    """Every quantity, first to last, stays in [1, max_value]; amounts found or given away are at most
    `max_operand` (default max_value); a bag holds 2-9 items and there are 2-9 bags (fewer if the cap says so)."""
    max_operand = max_operand or max_value
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, max_value)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(num_ops):
        room = max_value - value
        kinds = (["add"] if room >= 1 else []) + (["sub"] if value > 2 else [])
        kinds += (["bags"] if room >= 4 else []) + (["double"] if value <= room else [])
        kind = rng.choice(kinds)
        if kind == "add":
            a = rng.randint(1, min(max_operand, room))
            steps.append(Step(kind, value, value + a, a))
            sentences.append(f"{name} finds {a} more.")
        elif kind == "sub":
            a = rng.randint(1, min(max_operand, value - 1))  # never below one: no negative quantities
            steps.append(Step(kind, value, value - a, a))
            sentences.append(f"{name} gives away {a}.")
        elif kind == "bags":
            a = rng.randint(2, min(9, room // 2))
            b = rng.randint(2, min(9, room // a))
            steps.append(Step(kind, value, value + a * b, a, b))
            sentences.append(f"{name} buys {a} bags of {b}.")
        else:
            steps.append(Step(kind, value, value * 2))
            sentences.append("Then they double.")
        value = steps[-1].after
    sentences.append(f"How many {item} now?")
    return ToyProblem(f"toy-{index}", " ".join(sentences), value, tuple(steps))


def make_problems(
    count: int, seed: int, num_ops: int = 3, offset: int = 0, max_value: int = 99, max_operand: int | None = None
) -> list[ToyProblem]:
    """`count` problems from a seed; ids are toy-{offset + i}. Use different seeds for train and held-out sets."""
    rng = random.Random(seed)
    return [make_problem(rng, offset + i, num_ops, max_value, max_operand) for i in range(count)]


def make_split(
    seed: int, num_train: int, num_test: int, num_ops: int = 3, max_value: int = 99, max_operand: int | None = None
) -> tuple[list, list]:
    """Disjoint train / held-out problems: held-out questions never appear in the training set."""
    train = make_problems(num_train, seed * 2 + 1, num_ops, max_value=max_value, max_operand=max_operand)
    seen = {p.question for p in train}
    candidates = make_problems(
        num_test * 4, seed * 2 + 2, num_ops, offset=num_train, max_value=max_value, max_operand=max_operand
    )
    test = [p for p in candidates if p.question not in seen]
    if len(test) < num_test:
        raise ValueError(f"only {len(test)} held-out problems differ from the training set; use larger values.")
    return train, test[:num_test]


def render_concise(problem: ToyProblem) -> str:
    return f"The answer is {problem.answer}."


def render_patient(problem: ToyProblem) -> str:
    """One operation per line, a check of the last step, then the answer."""
    lines = [f"Start with {problem.steps[0].before}."]
    for step in problem.steps:
        if step.kind == "add":
            lines.append(f"{step.before} + {step.a} = {step.after}.")
        elif step.kind == "sub":
            lines.append(f"{step.before} - {step.a} = {step.after}.")
        elif step.kind == "bags":
            product = step.a * step.b
            lines.append(f"{step.a} * {step.b} = {product}. {step.before} + {product} = {step.after}.")
        else:
            lines.append(f"{step.before} * 2 = {step.after}.")
    last = problem.steps[-1]
    lines.append(f"Check: {last.after} {_inverse(last)} = {last.before}.")
    lines.append(f"The answer is {problem.answer}.")
    return "\n".join(lines)


def _inverse(step: Step) -> str:
    """The operation that undoes a step, as text (`after <op> = before`)."""
    return {"add": f"- {step.a}", "sub": f"+ {step.a}", "bags": f"- {step.a * step.b}", "double": "/ 2"}[step.kind]


def corpus(problems: list[ToyProblem]) -> list[str]:
    """Texts to train the toy tokenizer on: questions and both renderings."""
    return [text for p in problems for text in (p.question, render_concise(p), render_patient(p))]
