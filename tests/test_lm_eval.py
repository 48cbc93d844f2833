"""`jaxpatience lm-eval` (evaluation/harness.py) against lm-evaluation-harness's own `hf` backend (transformers).

The same tiny checkpoint and the same three local tasks (tests/data/lm_eval: multiple choice, generation, rolling
loglikelihood) run through both backends: every request's log-likelihood agrees within 1e-4 relative, the
is-greedy flags and greedy generations are equal, and so are the metrics. The checkpoint's weights are drawn
wide (initializer_range 0.1), so greedy decoding meets no near-ties.

Kept to seconds: both backends run the tasks once for the module, on 8 documents each, with a task index of the
local tasks only (lm-eval's own index of thousands of task files takes about 15 s to build).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_hf_checkpoint

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the [lmeval] extra (make test installs it)")
from lm_eval.tasks import TaskManager  # noqa: E402

from jaxpatience import cli, sharding  # noqa: E402
from jaxpatience.evaluation import harness  # noqa: E402
from jaxpatience.evaluation.harness import HarnessLM, plan_batches, score_pairs, shape_cost  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["tiny_mc", "tiny_gen", "tiny_ppl"]  # loglikelihood, generate_until, loglikelihood_rolling
LOCAL_TASKS = functools.partial(TaskManager, include_defaults=False)  # the local tasks only: no 15 s index


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # A context of 128 tokens: the longest tiny_ppl texts need several rolling windows.
    return make_hf_checkpoint(tmp_path_factory.mktemp("lm_eval") / "ckpt", initializer_range=0.1,
                              max_position_embeddings=128)  # fmt: skip


@pytest.fixture(scope="module")
def harness_lm(checkpoint):
    return HarnessLM.from_checkpoint(str(checkpoint), progress=False)


@pytest.fixture(scope="module")
def task_manager():
    return LOCAL_TASKS(include_path=str(ROOT / "tests/data/lm_eval"))


def run_tasks(model, task_manager, **kwargs) -> dict:
    """lm-eval on the local tasks; their data_files are relative to the repository root."""
    cwd = Path.cwd()
    try:
        os.chdir(ROOT)
        return lm_eval.simple_evaluate(model=model, tasks=TASKS, limit=8, log_samples=True, task_manager=task_manager,
                                       **kwargs)  # fmt: skip
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def ours(harness_lm, task_manager):
    return run_tasks(harness_lm, task_manager)


@pytest.fixture(scope="module")
def reference(checkpoint, task_manager):
    """lm-eval's `hf` backend on the same tasks, on one torch thread (on a small shared CPU, several threads mostly
    wait on each other: 3-4x slower here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_tasks("hf", task_manager, model_args=f"pretrained={checkpoint},dtype=float32", device="cpu",
                         batch_size=8)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def responses(results: dict, task: str) -> list:
    return [sample["resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_every_request_and_metric_equals_the_hf_backend(ours, reference):
    for task in TASKS:
        mine, theirs = responses(ours, task), responses(reference, task)
        assert len(mine) == len(theirs) > 0, task
        for doc_mine, doc_theirs in zip(mine, theirs, strict=True):
            for (a,), (b,) in zip(doc_mine, doc_theirs, strict=True):
                if task == "tiny_gen":
                    assert a == b  # identical greedy text, cut at the same stop string
                elif task == "tiny_mc":
                    assert a[1] == b[1] and a[0] == pytest.approx(b[0], rel=1e-4)
                else:
                    assert a == pytest.approx(b, rel=1e-4)
        metrics = {k: v for k, v in ours["results"][task].items() if "stderr" not in k}
        expected = {k: v for k, v in reference["results"][task].items() if "stderr" not in k}
        assert metrics.keys() == expected.keys()
        for key, value in metrics.items():
            assert value == (pytest.approx(expected[key], rel=1e-4) if isinstance(value, float) else expected[key])
    # The generations are not all empty: the stop strings cut real text.
    assert sum(len(doc[0][0]) for doc in responses(ours, "tiny_gen")) > 0


def test_a_shared_context_is_scored_once_and_long_pairs_are_cut_on_the_left():
    pairs = [([1, 2, 3], [4]), ([1, 2, 3], [5, 6]), ([7], [8]), ([1, 2, 3], [9])]
    (batch,) = plan_batches(pairs, max_length=64, batch_tokens=4096)
    assert sorted(batch.contexts) == [(1, 2, 3), (7,)]  # three choices, one context row
    assert batch.rows == 4
    # 6 + 3 tokens with a context of 6: the hf backend keeps the last 7 tokens, its input the first 6 of them.
    (cut,) = plan_batches([([1, 2, 3, 4, 5, 6], [7, 8, 9])], max_length=6, batch_tokens=4096)
    assert cut.contexts == [(3, 4, 5, 6)] and cut.continuations == [[(0, [7, 8, 9])]]
    small = plan_batches([([i, i + 1], [i]) for i in range(40)], max_length=64, batch_tokens=64)
    assert len(small) > 1 and sum(b.rows for b in small) == 40
    with pytest.raises(ValueError, match="request 0: a context and a continuation"):
        plan_batches([([1], [])], max_length=8, batch_tokens=64)


def test_batches_reuse_a_planned_shape_within_twice_its_cost():
    """Questions of 100, 50 and 9 context tokens with 4 choices each: packed again into the shapes planned for
    longer ones when that costs at most twice as much, so fewer programs compile; every pair is planned once."""
    rng = np.random.default_rng(0)
    pairs = []
    for length in [100] * 24 + [50] * 40 + [9] * 3:
        context = rng.integers(1, 99, length).tolist()
        pairs += [(context, rng.integers(1, 99, int(rng.integers(1, 4))).tolist()) for _ in range(4)]
    separate = plan_batches(pairs, max_length=1024, batch_tokens=2048, reuse=0)  # every batch its smallest shape
    merged = plan_batches(pairs, max_length=1024, batch_tokens=2048)
    assert len({b.shape for b in merged}) < len({b.shape for b in separate})
    for batches in (separate, merged):
        assert sorted(i for b in batches for rows in b.continuations for i, _ in rows) == list(range(len(pairs)))
        assert all(all(o <= s for o, s in zip(b.own_shape(), b.shape, strict=True)) for b in batches)
    assert sum(shape_cost(b.shape) for b in merged) <= 2 * sum(shape_cost(b.shape) for b in separate)
    assert {b.shape for b in separate} == {b.own_shape() for b in separate}


def transformers_scores(model, pairs) -> list[tuple[float, bool]]:
    """(sum of log-probs, is greedy) of each continuation under a transformers model, one pair at a time."""
    import torch

    scores = []
    for context, continuation in pairs:
        with torch.no_grad():
            logits = model(torch.tensor([context + continuation])).logits[0, len(context) - 1 : -1]
        logprobs, target = torch.log_softmax(logits.float(), dim=-1), torch.tensor(continuation)
        chosen = logprobs[torch.arange(len(continuation)), target]
        scores.append((float(chosen.sum()), bool((logprobs.argmax(dim=-1) == target).all())))
    return scores


def test_scores_on_a_mesh_equal_transformers(checkpoint, harness_lm):
    """Weights and rows sharded over 4 devices, in two batches (a shared context's continuations, then one more
    pair): the same scores and is-greedy flags as transformers, a greedy continuation among them."""
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    vocab = harness_lm.model.config.vocab_size
    context = rng.integers(0, vocab, 20).tolist()
    with torch.no_grad():  # transformers' own greedy continuation of the context
        greedy = reference.generate(torch.tensor([context]), max_new_tokens=3, do_sample=False, min_new_tokens=3)
    pairs = [(context, rng.integers(0, vocab, n).tolist()) for n in (1, 3, 5)] + [(context, greedy[0, 20:].tolist())]
    pairs += [(rng.integers(0, vocab, 9).tolist(), rng.integers(0, vocab, 4).tolist())]
    expected = transformers_scores(reference, pairs)
    mesh = sharding.make_mesh(data=2, tensor=2)
    sharded = score_pairs(harness_lm.model, pairs, mesh=mesh, progress=False, batch_tokens=128)
    assert [g for _, g in sharded] == [g for _, g in expected] == [False] * 3 + [True, False]
    np.testing.assert_allclose([s for s, _ in sharded], [s for s, _ in expected], rtol=1e-4)


def test_the_command_writes_results_and_refuses_bad_input(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(harness, "TaskManager", LOCAL_TASKS)
    out = tmp_path / "run"
    argv = ["lm-eval", "--model", str(checkpoint), "--tasks", "tiny_mc", "--include-path", "tests/data/lm_eval",
            "--limit", "4", "--out", str(out), "--no-progress", "--log-samples"]  # fmt: skip
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["tiny_mc"]["sample_len"] == 4
    assert len((out / "samples_tiny_mc.jsonl").read_text().splitlines()) == 4
    assert "tiny_mc" in capsys.readouterr().out
    assert cli.main(argv) == 2  # results.json is never overwritten
    assert "exists" in capsys.readouterr().err
    assert cli.main(["lm-eval", "--model", str(checkpoint), "--tasks", "tiny_mc", "--batch-tokens", "0"]) == 2
    assert "--batch-tokens must be >= 1" in capsys.readouterr().err
