"""The evaluator: scoring and summaries on scripted responses, resume after a crash, the CLI, and end to end on a
tiny random checkpoint with the real decoder."""

from __future__ import annotations

import dataclasses
import json
import sys
from types import SimpleNamespace

import pytest
from conftest import make_tokenizer

from jaxpatience.config import SamplingConfig
from jaxpatience.data import answers
from jaxpatience.data.problems import Problem, build_prompt
from jaxpatience.durability.store import StoreError
from jaxpatience.evaluation.evaluate import EvalError, evaluate, main, summarize


@dataclasses.dataclass(frozen=True)
class FakeGeneration:
    text: str
    token_ids: list[int]
    finish_reason: str = "stop"


class ScriptedGenerator:
    """Stands in for `jaxpatience.generate`: answers each prompt from a script keyed by the problem's question.

    script[question] is a list of responses, one per sample. With `seed_sensitive`, the response chosen for a
    sample also depends on the seed and the request's seed index (as real sampling does), so resume must pass
    the same ones as an uninterrupted run. It streams each problem's samples to `on_result` as the real decoder
    does; calls are recorded; `crash_after=k` raises after k problems were handed over (a simulated crash).
    """

    def __init__(self, script: dict[str, list[str]], seed_sensitive: bool = False, crash_after: int | None = None):
        self.script, self.seed_sensitive, self.crash_after = script, seed_sensitive, crash_after
        self.calls: list[list[str]] = []
        self.prompts: list[str] = []

    def __call__(self, model, tokenizer, requests, *, max_new_tokens, num_samples, seed, on_result=None, **settings):
        prompts = [getattr(r, "prompt", r) for r in requests]
        questions = [next(q for q in self.script if q in prompt) for prompt in prompts]
        self.calls.append(questions)
        self.prompts += prompts
        results = []
        for row, (request, question) in enumerate(zip(requests, questions, strict=True)):
            if self.crash_after is not None and row == self.crash_after:
                raise RuntimeError("simulated crash")
            responses = self.script[question]
            index = getattr(request, "seed_index", None)
            shift = (seed + (row if index is None else index)) % len(responses) if self.seed_sensitive else 0
            picked = [responses[(s + shift) % len(responses)] for s in range(num_samples)]
            results.append([FakeGeneration(text, list(range(len(text.split())))) for text in picked])
            for sample, generation in enumerate(results[-1]):
                if on_result is not None:
                    on_result(row, sample, generation)
        return results


def scripted_problems(n: int = 7, samples: int = 3) -> tuple[list[Problem], dict[str, list[str]]]:
    problems, script = [], {}
    for i in range(n):
        gold = str(10 + i)
        question = f"Question {i}: what is{' really' * (n - i)} {gold}?"  # lengths differ: batches are by length
        problems.append(Problem(f"q{i}", question, gold))
        wrong = str(99 + i)
        # A mix: right, wrong, no answer, verify/backtrack phrases, different lengths.
        options = [
            f"Let me check: it is {gold}. The answer is {gold}.",
            f"Wait, maybe {wrong}. The answer is {wrong}.",
            f"I think {gold}" + " and so on" * i,
        ]
        script[question] = options[:samples]
    return problems, script


def comparable(summary: dict) -> dict:
    """A summary without what legitimately differs between runs (wall time, output folder, plot paths)."""
    return {k: v for k, v in summary.items() if k not in ("timing", "out_dir", "plots")}


def test_summary_of_scripted_responses(tmp_path):
    gold = ["7", "1000", "-2", "0.5"]
    problems = [Problem(f"p{i}", f"Problem {i}?", g) for i, g in enumerate(gold)]
    script = {
        "Problem 0?": ["3 + 4 = 7. The answer is 7.", "3 + 4 = 8. The answer is 8.", "It is 7, wait, 9"],
        "Problem 1?": ["It costs $1,000 in total. #### 1,000", "The answer is 1000.", "Let me check: 999"],
        "Problem 2?": ["The answer is 2", "The answer is -2", "The answer is -2"],
        "Problem 3?": ["so \\boxed{\\frac{1}{2}}", "The answer is 0.50", "1/2"],
    }
    three = SamplingConfig(num_samples=3, temperature=1.0)
    summary = evaluate(None, make_tokenizer(), problems, out_dir=tmp_path, sampling=three,
                       generate_fn=ScriptedGenerator(script), progress=False)  # fmt: skip
    # Hand-counted strict answers: p0 [7, 8, None], p1 [1000, 1000, None], p2 [2, -2, -2], p3 [0.5, 0.5, None]
    # -> right 1/3, 2/3, 2/3, 2/3 of the samples; accuracy is their mean over problems.
    assert summary["metrics"]["strict"]["accuracy"] == pytest.approx(7 / 12)
    # Flexible (last number): p0 [7, 8, 9], p1 [1000, 1000, 999], p2 [2, -2, -2], p3 [2, 0.5, 0.5].
    assert summary["metrics"]["flexible"]["accuracy"] == pytest.approx(7 / 12)
    assert summary["metric"] == "strict" and summary["accuracy"] == summary["metrics"]["strict"]["accuracy"]
    # maj@k on strict answers: k=1 -> p2 wrong; k=2 -> p0 tie 7/8 goes to 7 (first seen, right), p2 tie 2/-2 goes
    # to 2 (wrong); k=3 -> p2's -2 wins 2 to 1 (right), p0 [7, 8, None] is still a tie won by 7.
    assert summary["maj_at_k"] == {"1": 0.75, "2": 0.75, "3": 1.0}
    assert summary["pass_at_k"] == 1.0
    low, high = summary["accuracy_ci95"]
    assert low < summary["accuracy"] < high
    assert summary["behaviour"]["verify_share"] == pytest.approx(1 / 12)
    assert summary["behaviour"]["backtrack_share"] == pytest.approx(1 / 12)
    lengths = [len(text.split()) for responses in script.values() for text in responses]
    assert summary["mean_response_tokens"] == pytest.approx(sum(lengths) / len(lengths))
    assert json.loads((tmp_path / "summary.json").read_text())["accuracy"] == summary["accuracy"]
    for plot in ("response_length.png", "maj_at_k.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["sample"]) for r in records) == [(p.id, s) for p in problems for s in range(3)]


def test_math_style_problems_use_boxed_prompts_and_math_verify(tmp_path):
    pytest.importorskip("math_verify", reason="the math_verify metric needs math-verify")
    problems = [
        Problem("m0", "Compute 1/2 + 0.", "\\frac{1}{2}"),
        Problem("m1", "Convert to polar.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        Problem("m2", "How many?", "10"),
    ]
    script = {
        "Compute 1/2 + 0.": ["It is \\boxed{0.5}.", "So \\boxed{\\dfrac{1}{2}}", "\\boxed{2}"],
        "Convert to polar.": ["\\boxed{(3, \\frac{\\pi}{2})}", "\\boxed{(3, \\pi)}", "\\boxed{(3,\\pi)}"],
        "How many?": ["\\boxed{10}", "\\boxed{10}", "\\boxed{12}"],
    }
    generator = ScriptedGenerator(script)
    three = SamplingConfig(num_samples=3, temperature=1.0)
    summary = evaluate(None, make_tokenizer(), problems, out_dir=tmp_path, sampling=three, generate_fn=generator,
                       progress=False, plots=False)  # fmt: skip
    assert summary["metric"] == "math_verify"  # auto: some gold answers are LaTeX
    # By hand: m0 right 2/3 (0.5 and 1/2 equal 1/2), m1 1/3, m2 2/3.
    assert summary["accuracy"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)
    # maj@3: m0 votes 0.5, 0.5 (\dfrac{1}{2} normalises to 0.5), 2 -> right; m1 (3,\pi) twice -> wrong; m2 -> 10.
    assert summary["maj_at_k"]["3"] == pytest.approx(2 / 3)
    assert all("\\boxed{}" in prompt for prompt in generator.prompts)  # one prompt style for the whole dataset


def test_without_math_verify_its_column_is_marked_unavailable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed
    problems = [Problem("m0", "Compute 1/2 + 0.", "\\frac{1}{2}")]
    script = {"Compute 1/2 + 0.": ["So \\boxed{\\dfrac{1}{2}}"]}
    summary = evaluate(None, make_tokenizer(), problems, out_dir=tmp_path, generate_fn=ScriptedGenerator(script),
                       progress=False, plots=False)  # fmt: skip
    assert summary["metric"] == "strict"  # auto falls back
    assert summary["metrics"]["math_verify"] == {
        "unavailable": "math-verify is not installed (pip install math-verify)"
    }
    assert summary["accuracy"] == 1.0
    with pytest.raises(EvalError, match="metric math_verify is unavailable"):
        evaluate(None, make_tokenizer(), problems, out_dir=tmp_path / "b", generate_fn=ScriptedGenerator(script),
                 metric="math_verify", progress=False)  # fmt: skip


def test_resume_after_a_crash_gives_the_uninterrupted_summary(tmp_path):
    problems, script = scripted_problems(n=7, samples=3)  # 3 possible responses, 2 drawn: the seed matters
    settings = dict(
        sampling=SamplingConfig(num_samples=2, temperature=0.8, seed=5), generation_batch_size=2, progress=False
    )
    whole = evaluate(None, make_tokenizer(), problems, out_dir=tmp_path / "whole",
                     generate_fn=ScriptedGenerator(script, seed_sensitive=True), **settings)  # fmt: skip

    crashing = ScriptedGenerator(script, seed_sensitive=True, crash_after=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(None, make_tokenizer(), problems, out_dir=tmp_path / "resumed", generate_fn=crashing, **settings)
    generations = tmp_path / "resumed" / "generations.jsonl"
    assert len(generations.read_text().splitlines()) == 4 * 2  # the four problems handed over survived the crash
    with open(generations, "a") as out:  # and a crash in the middle of a write leaves a torn line
        out.write('{"id": "q4", "sample": 0, "gold": "14", "respo')

    survived = {json.loads(line)["id"] for line in generations.read_text().splitlines()[:-1]}
    rerun = ScriptedGenerator(script, seed_sensitive=True)
    resumed = evaluate(None, make_tokenizer(), problems, out_dir=tmp_path / "resumed", generate_fn=rerun, **settings)
    assert sorted(q for call in rerun.calls for q in call) == sorted(
        p.question for p in problems if p.id not in survived
    )
    assert comparable(resumed) == comparable(whole)
    keys = [(r["id"], r["sample"]) for r in map(json.loads, generations.read_text().splitlines())]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 7 * 2  # nothing lost, nothing twice

    again = ScriptedGenerator(script, seed_sensitive=True)  # a finished folder: nothing left to generate
    assert comparable(evaluate(None, make_tokenizer(), problems, out_dir=tmp_path / "resumed", generate_fn=again,
                               **settings)) == comparable(whole)  # fmt: skip
    assert again.calls == []


def test_resume_refuses_other_settings_and_names_a_bad_line(tmp_path):
    problems, script = scripted_problems(n=2, samples=1)
    run = dict(out_dir=tmp_path, generate_fn=ScriptedGenerator(script), progress=False, plots=False)
    evaluate(None, make_tokenizer(), problems, sampling=SamplingConfig(max_new_tokens=64), **run)
    with pytest.raises(EvalError, match="made with max_new_tokens=64, not 128"):
        evaluate(None, make_tokenizer(), problems, sampling=SamplingConfig(max_new_tokens=128), **run)
    lines = (tmp_path / "generations.jsonl").read_text().splitlines()
    (tmp_path / "generations.jsonl").write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(StoreError, match=r"generations\.jsonl, line 2: not a record"):
        evaluate(None, make_tokenizer(), problems, sampling=SamplingConfig(max_new_tokens=64), **run)


def test_resume_checks_the_answer_prefix_and_reads_older_run_files(tmp_path):
    problems, script = scripted_problems(n=2, samples=3)
    two = SamplingConfig(num_samples=2, temperature=1.0)
    run = dict(out_dir=tmp_path, generate_fn=ScriptedGenerator(script), progress=False, plots=False)
    evaluate(None, make_tokenizer(), problems, sampling=two, **run)
    with pytest.raises(EvalError, match="made with answer_prefix='', not 'Start with'"):
        evaluate(None, make_tokenizer(), problems, sampling=two, answer_prefix="Start with", **run)
    # a run.json written before SamplingConfig: `samples` and `batch_size`, no answer_prefix or stop
    settings = json.loads((tmp_path / "run.json").read_text())
    settings["samples"], settings["batch_size"] = settings.pop("num_samples"), 16
    del settings["answer_prefix"], settings["stop"]
    (tmp_path / "run.json").write_text(json.dumps(settings))
    with pytest.raises(EvalError, match="made with num_samples=2, not 3"):
        evaluate(None, make_tokenizer(), problems, sampling=dataclasses.replace(two, num_samples=3), **run)
    evaluate(None, make_tokenizer(), problems, sampling=two, **run)  # the same settings under the old names
    # Samples draw from keys fixed per problem, whatever the batching: another batch size may resume.
    evaluate(None, make_tokenizer(), problems, sampling=two, generation_batch_size=4, **run)


def test_bad_settings_are_one_sentence(tmp_path):
    problems, script = scripted_problems(n=2, samples=1)
    run = dict(out_dir=tmp_path, generate_fn=ScriptedGenerator(script), progress=False)
    with pytest.raises(EvalError, match="num_samples=4 at temperature 0 would be 4 identical greedy answers"):
        evaluate(None, make_tokenizer(), problems, sampling=SamplingConfig(num_samples=4), **run)
    with pytest.raises(EvalError, match="unknown prompt style 'cot'"):
        evaluate(None, make_tokenizer(), problems, prompt_style="cot", **run)
    with pytest.raises(EvalError, match="generation_batch_size must be >= 1"):
        evaluate(None, make_tokenizer(), problems, generation_batch_size=0, **run)
    with pytest.raises(EvalError, match="problem ids must be unique"):
        evaluate(None, make_tokenizer(), problems + problems[:1], **run)
    small = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))  # before anything is generated
    with pytest.raises(EvalError, match="problem q0: its prompt has .* past the model's context of 64"):
        evaluate(small, make_tokenizer(), problems, sampling=SamplingConfig(max_new_tokens=60), **run)
    evaluate(
        None, make_tokenizer(), problems, sampling=SamplingConfig(max_new_tokens=30), **run
    )  # nothing generated yet: other settings ok


def test_plain_few_shot_cuts_the_invented_next_question(tmp_path):
    problem = Problem("p", "Tom has 3 apples and buys 4. How many?", "7")
    script = {problem.question: [" 3 + 4 = 7. The answer is 7.\n\nQ: Sam has 99 pears. How many?\nA: 99."]}
    summary = evaluate(None, make_tokenizer(), [problem], out_dir=tmp_path, prompt_style="few_shot_plain",
                       generate_fn=ScriptedGenerator(script), progress=False, plots=False)  # fmt: skip
    record = json.loads((tmp_path / "generations.jsonl").read_text())
    assert record["response"] == " 3 + 4 = 7. The answer is 7."
    assert summary["metrics"]["flexible"]["accuracy"] == 1.0  # the invented "99" is not read as the answer


def test_summarize_is_independent_of_record_order():
    problems, script = scripted_problems(n=3, samples=2)
    records = [
        {"id": p.id, "sample": s, "response": script[p.question][s], "response_tokens": 3, "batch": "b", "batch_s": 1.0}
        for p in problems
        for s in range(2)
    ]
    forward = summarize(records, problems, samples=2, metric="strict")
    assert forward == summarize(records[::-1], problems, samples=2, metric="strict")
    assert forward["timing"]["generation_s"] == 1.0  # one batch, counted once
    assert forward["timing"]["tokens_per_s"] == 6 * 3 / 1.0


def test_warm_throughput_leaves_out_each_runs_first_batch():
    problems = [Problem(f"p{i}", f"Problem {i}?", "1") for i in range(3)]
    batches = [("a", 10.0, True, 5), ("b", 1.0, False, 20), ("c", 1.0, False, 40)]  # (batch, seconds, warmup, tokens)
    records = [
        {"id": p.id, "sample": 0, "response": "1", "response_tokens": n, "generated_tokens": n, "batch": b,
         "batch_s": t, "warmup": w}
        for p, (b, t, w, n) in zip(problems, batches, strict=True)
    ]  # fmt: skip
    timing = summarize(records, problems, samples=1, metric="strict")["timing"]
    assert timing["tokens_per_s"] == pytest.approx(65 / 12)
    assert timing["tokens_per_s_warm"] == pytest.approx(60 / 2)


def test_compare_prints_a_before_after_table(tmp_path, capsys):
    problems, script = scripted_problems(n=4, samples=3)
    for name, picked in (("before", 1), ("after", 0)):  # "after" answers right, "before" wrong
        single = {q: [responses[picked]] for q, responses in script.items()}
        evaluate(None, make_tokenizer(), problems, out_dir=tmp_path / name, generate_fn=ScriptedGenerator(single),
                 progress=False, plots=False)  # fmt: skip
    assert main(["--compare", str(tmp_path / "before"), str(tmp_path / "after" / "summary.json")]) == 0
    table = capsys.readouterr().out
    assert "before" in table and "summary.json" in table
    accuracy_row = next(line for line in table.splitlines() if line.startswith("accuracy"))
    assert accuracy_row.split()[-4:] == ["0.0%", "100.0%", "+100.0", "pts"]
    with pytest.raises(EvalError, match="summary file .*missing.json does not exist"):
        main(["--compare", str(tmp_path / "missing.json"), str(tmp_path / "after")])


def test_adapter_flag_applies_a_peft_adapter(tiny_checkpoint, tmp_path):
    """--adapter puts the adapter on the base: the stored responses are the adapted model's greedy output."""
    import jax

    from jaxpatience import generate, load_pretrained
    from jaxpatience.config import LoraConfig
    from jaxpatience.data.problems import build_prompt, load_file
    from jaxpatience.model import lora

    base = tiny_checkpoint()
    model, tokenizer = load_pretrained(base)
    config = LoraConfig(rank=4, alpha=8)
    lora.apply_lora(model, config, seed=1)
    for _, adapter in lora.adapters(model):  # a non-zero adapter, so that it changes the output
        adapter.lora_B.set_value(jax.random.normal(jax.random.key(0), adapter.lora_B.get_value().shape) * 0.5)
    lora.save_peft_adapter(model, config, tmp_path / "adapter")
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"id": "q1", "question": "What is 1 + 1?", "answer": "#### 2"}) + "\n")
    args = ["--model", str(base), "--dataset", str(data), "--max-new-tokens", "8", "--no-progress"]
    assert main([*args, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "with")]) == 0
    record = json.loads((tmp_path / "with" / "generations.jsonl").read_text().splitlines()[0])
    prompt = build_prompt(load_file(data)[0], tokenizer, "zero_shot", latex=False)
    expected = generate(model, tokenizer, [prompt], max_new_tokens=8)[0].text
    assert record["response"] == expected
    plain, _ = load_pretrained(base)
    assert generate(plain, tokenizer, [prompt], max_new_tokens=8)[0].text != expected  # the adapter mattered
    from jaxpatience.model.weights import CheckpointError

    with pytest.raises(CheckpointError, match="adapter_config.json does not exist"):
        main([*args, "--adapter", str(tmp_path / "nothing"), "--out", str(tmp_path / "bad")])


# ---------------------------------------------------------------------------------------------------
# End to end with the real decoder on a tiny random checkpoint (its answers are noise: we check the plumbing).


def test_end_to_end_local_gsm8k_file(tiny_checkpoint, tmp_path):
    from jaxpatience.model.weights import load_pretrained

    rows = [{"question": f"Tom has {i} apples and buys {i + 3} more. How many apples?", "answer": f"#### {2 * i + 3}"}
            for i in range(6)]  # fmt: skip
    data = tmp_path / "gsm8k_test.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    checkpoint = tiny_checkpoint(max_position_embeddings=512)
    out = tmp_path / "out"
    # Batches of 2 problems throughout (the rerun included), so the decoder compiles one batch shape only.
    argv = ["--model", str(checkpoint), "--dataset", str(data), "--limit", "4", "--batch-size", "2",
            "--max-new-tokens", "12", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert summary["n_problems"] == 4 and len(records) == 4
    assert all(0 < r["response_tokens"] <= 12 for r in records)
    assert summary["timing"]["tokens_per_s"] > 0 and summary["timing"]["generated_tokens"] == sum(
        r["generated_tokens"] for r in records
    )
    # Accuracy is what the scoring functions say about the stored responses.
    problems = {f"gsm8k_test-{i}": str(2 * i + 3) for i in range(6)}
    expected = [answers.answers_equal(answers.extract_strict(r["response"]), problems[r["id"]]) for r in records]
    assert summary["accuracy"] == sum(expected) / 4

    # Each record holds the decoder's own output for that problem's prompt (no mix-up of rows), and a rerun
    # into the same folder with a larger limit generates only the new problem.
    model, tokenizer = load_pretrained(checkpoint)
    from jaxpatience.data.problems import load_problems
    from jaxpatience.generation.api import generate

    first_two = load_problems(str(data), limit=2)
    direct = generate(model, tokenizer, [build_prompt(p, tokenizer) for p in first_two], max_new_tokens=12)
    assert [g.text for g in direct] == [r["response"] for r in records[:2]]
    assert main([*argv[:4], "--limit", "6", *argv[6:]]) == 0
    assert len((out / "generations.jsonl").read_text().splitlines()) == 6
    # --mesh shards weights and batches over 2 devices: the same greedy responses.
    sharded = tmp_path / "sharded"
    assert main([*argv[:-2], str(sharded), "--no-progress", "--mesh", "data=2"]) == 0
    by_id = {r["id"]: r["response"] for r in records}
    for line in (sharded / "generations.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["response"] == by_id[record["id"]]


def test_end_to_end_gsm_symbolic_with_samples(tiny_checkpoint, tmp_path):
    pytest.importorskip("reasoning_gym", reason="gsm_symbolic needs reasoning-gym")
    from jaxpatience.data.problems import load_problems
    from jaxpatience.model.weights import load_pretrained

    model, tokenizer = load_pretrained(tiny_checkpoint(max_position_embeddings=512))
    problems = load_problems("gsm_symbolic", limit=2, seed=1)
    sampling = SamplingConfig(num_samples=4, temperature=1.0, max_new_tokens=8)
    out = tmp_path / "eval"  # tmp_path holds the checkpoint: not an eval folder
    summary = evaluate(model, tokenizer, problems, out_dir=out, sampling=sampling, generation_batch_size=2,
                       progress=False)  # fmt: skip
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 8 and set(summary["maj_at_k"]) == {"1", "2", "4"}
    for problem in problems:  # sampling at temperature 1 from a random model: the samples differ
        assert len({r["response"] for r in records if r["id"] == problem.id}) > 1
    assert (out / "maj_at_k.png").read_bytes()[:4] == b"\x89PNG"
