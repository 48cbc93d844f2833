"""The slot engine (slots.py): continuous batching gives the same tokens as one prompt at a time, with a fixed
set of compiled shapes, one prefill per prompt for n samples, per-request budgets and stops, and streaming.

Greedy comparisons check the top-2 logit gap along the reference rollout first (see test_decode.py), so a
near-tie fails loudly instead of flaking.
"""

from __future__ import annotations

from collections import deque

import jax
import pytest
from conftest import make_hf_checkpoint
from test_decode import MARGIN, uncached_rollout

from jaxpatience import generate, load_pretrained
from jaxpatience.generation import scheduler
from jaxpatience.generation.api import EngineStats, Request
from jaxpatience.generation.shapes import make_plan

# Mixed lengths (2..13 tokens, all in the 16-token prompt bucket) and budgets (1..16 new tokens).
PROMPTS = [[5, 9, 33, 71, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [17, 3], [8] * 13, [60, 61, 62],
           [90, 91, 92, 93, 94, 95, 96], [120, 7], [33, 34, 35, 36]]  # fmt: skip
BUDGETS = [16, 3, 11, 1, 7, 14, 5, 9]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_pretrained(make_hf_checkpoint(tmp_path_factory.mktemp("engine") / "ckpt", initializer_range=0.1))


def requests(prompts, budgets):
    return [Request(p, max_new_tokens=b) for p, b in zip(prompts, budgets, strict=True)]


def test_more_prompts_than_slots_equal_one_at_a_time(loaded, monkeypatch):
    model, tokenizer = loaded
    monkeypatch.setattr(scheduler, "MIN_TAIL_SLOTS", 1)  # a tail through 2 and 1 slots (by default: none below 8)
    monkeypatch.setattr(scheduler, "TAIL_FACTOR", 2)
    stats = EngineStats()
    together = generate(model, tokenizer, requests(PROMPTS, BUDGETS), stop_tokens=[], batch_size=4, stats=stats)
    for prompt, budget, result in zip(PROMPTS, BUDGETS, together, strict=True):
        expected, gap = uncached_rollout(model, prompt, budget)
        assert gap >= MARGIN, "near-tie in the reference rollout: pick another seed/config"
        alone = generate(model, tokenizer, [prompt], max_new_tokens=budget, stop_tokens=[])[0]
        assert result.token_ids == alone.token_ids == expected  # results come back in input order
        assert result.finish_reason == "length"
    # The slots were refilled (8 prompts through 4 slots) and the tail moved to smaller buckets.
    assert stats.inserts > 1 and stats.slot_buckets[0] == 4 and min(stats.slot_buckets) < 4
    assert stats.tokens == sum(BUDGETS)
    # Work: fewer slot-steps than static batches of 4 would spend (each batch runs to its longest budget).
    static = sum(4 * max(BUDGETS[i : i + 4]) for i in range(0, len(BUDGETS), 4))
    assert stats.slot_steps < static


def test_compilations_stay_constant_across_calls_and_queue_lengths(loaded):
    model, tokenizer = loaded
    compiles = []

    def on_event(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    def call(count: int, seed: int, temperature: float = 0.0):
        prompts = [PROMPTS[(i * 3 + seed) % len(PROMPTS)] for i in range(count)]
        budgets = [BUDGETS[(i * 5 + seed) % len(BUDGETS)] for i in range(count)]
        generate(model, tokenizer, requests(prompts, budgets), stop_tokens=[], batch_size=4,
                 temperature=temperature, seed=seed)  # fmt: skip

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        for seed in range(4):  # warm every bucket: inserts of 1 and 4 prompts, windows
            call(12, seed)
        warm = len(compiles)
        for count, seed in ((5, 11), (9, 12), (17, 13)):  # other queue lengths, prompts and budgets
            call(count, seed)
        assert len(compiles) == warm
        call(9, 1, temperature=0.7)  # sampling is another static sampler: it compiles (the listener sees it)
        assert len(compiles) > warm
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)


def test_the_tail_shrinks_by_a_factor_of_four_down_to_eight_slots(loaded):
    """Few tail buckets (each one a resize and a decode compile): 128 slots -> 32 -> 8, and a chunk ends when
    the rows fit the next one; with 3 batch shards the buckets are rounded up and still shrink."""
    model, _ = loaded
    plan = make_plan(model, dict(temperature=0.0, top_p=1.0, num_samples=1, top_k=0, seed=0), [[1]], [4], [0], 128,
                     None, 8)  # fmt: skip
    targets = {busy: scheduler._tail_target(plan, busy, 128) for busy in (100, 33, 32, 9, 8, 1)}
    assert targets == {100: 128, 33: 128, 32: 32, 9: 32, 8: 8, 1: 8}
    assert scheduler._tail_target(plan, 1, 32) == 8 and scheduler._tail_target(plan, 1, 8) == 8
    queue = scheduler._Queue([[1]], [4], [[]], [0], 1, deque(), [(0, 0)] * 128)
    assert scheduler._refill_at(plan, queue, 128) == 128 - 32  # end the chunk when 32 rows are left
    assert scheduler._refill_at(plan, queue, 8) == 9  # no smaller bucket: run to the end
    assert [scheduler.power_below(n, scheduler.INSERT_FACTOR) for n in (1, 3, 4, 15, 16, 100)] == [1, 1, 4, 4, 16, 64]


def test_num_samples_prefill_once_and_stay_batch_independent(loaded):
    model, tokenizer = loaded
    kwargs = dict(max_new_tokens=10, temperature=1.0, num_samples=3, seed=4, stop_tokens=[], batch_size=6)
    stats = EngineStats()
    results = generate(model, tokenizer, PROMPTS[:5], stats=stats, **kwargs)
    assert stats.prefill_rows == 5 and stats.rows == 15  # one prefill per prompt, not per sample
    assert all(len(samples) == 3 for samples in results)
    assert any(len({tuple(s.token_ids) for s in samples}) > 1 for samples in results)  # the samples differ
    # A sample depends on its prompt, sample index and seed only: other batch mates, other slots, same samples.
    mates = generate(model, tokenizer, PROMPTS[:1] + [[1, 2, 3]] * 6, **kwargs)
    assert mates[0] == results[0]
    assert generate(model, tokenizer, PROMPTS[:5], engine="static", **kwargs) == results
    # Request.seed_index pins a prompt's samples wherever it sits in the call.
    moved = generate(model, tokenizer, [[1, 2], Request(PROMPTS[0], seed_index=0)], **kwargs)
    assert moved[1] == results[0]


def test_per_request_stop_tokens_and_budgets(loaded):
    model, tokenizer = loaded
    full = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=12, stop_tokens=[])
    stop = full[0].token_ids[2]
    mixed = generate(model, tokenizer, [Request(PROMPTS[0], stop_tokens=[stop]), PROMPTS[1],
                                        Request(PROMPTS[2], max_new_tokens=4)], max_new_tokens=12,
                     stop_tokens=[])  # fmt: skip
    cut = full[0].token_ids.index(stop)
    assert mixed[0].token_ids == full[0].token_ids[:cut] and mixed[0].finish_reason == "stop"
    assert mixed[1] == full[1]  # the call's settings
    assert mixed[2].token_ids == full[2].token_ids[:4] and mixed[2].finish_reason == "length"


def test_on_result_streams_each_row_as_it_finishes(loaded):
    model, tokenizer = loaded
    seen = []
    record = lambda prompt, sample, generation: seen.append((prompt, sample, generation))
    results = generate(model, tokenizer, requests(PROMPTS, BUDGETS), stop_tokens=[], batch_size=4, on_result=record)
    assert sorted((p, s) for p, s, _ in seen) == [(p, 0) for p in range(len(PROMPTS))]  # each row exactly once
    assert all(results[p] == generation for p, _, generation in seen)
    order = [p for p, _, _ in seen]
    assert order.index(3) < order.index(0)  # a 1-token budget is handed over before a 16-token one


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([Request([5, 6], stop_tokens=["<|not a token|>"])], "prompt 0: stop token '<|not a token|>' is not"),
        ([[5, 6], Request([5, 6], stop_tokens=[10**6])], "prompt 1: stop token 1000000 is not a token id"),
        ([[5, 6], Request([5] * 250, max_new_tokens=10)], "prompt 1 has 250 tokens, so max_new_tokens=10"),
        ([Request([5, 6], max_new_tokens=0)], "prompt 0: max_new_tokens must be an integer >= 1"),
        ([Request([])], "prompt 0 is empty"),
    ],
)
def test_bad_requests_get_one_sentence_naming_the_request(loaded, prompts, message):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match=message) as info:
        generate(model, tokenizer, prompts, max_new_tokens=4)
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")


def test_unknown_engine_and_static_limits(loaded):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        generate(model, tokenizer, [[5, 6]], engine="fast")
    with pytest.raises(ValueError, match="static engine takes one max_new_tokens"):
        generate(model, tokenizer, [Request([5, 6], max_new_tokens=3), [7, 8]], max_new_tokens=5, engine="static")


def test_a_batch_axis_split_three_ways_finishes_like_one_device(loaded):
    """Slot counts rounded up to 3 batch shards: the tail must still end (no bucket below 6 holds 3 busy rows)."""
    from jaxpatience.sharding import make_mesh

    model, tokenizer = loaded
    with pytest.warns(UserWarning, match="uses 6 of 8 devices"):
        mesh = make_mesh(data=3, tensor=2)
    prompts = requests(PROMPTS[:6], [1, 1, 1, 9, 12, 15])
    single = generate(model, tokenizer, prompts, stop_tokens=[], batch_size=6)
    assert generate(model, tokenizer, prompts, stop_tokens=[], batch_size=6, mesh=mesh) == single
    many = requests(PROMPTS * 2, BUDGETS * 2)
    assert generate(model, tokenizer, many, stop_tokens=[], batch_size=3, mesh=mesh) == generate(
        model, tokenizer, many, stop_tokens=[], batch_size=3
    )


def test_chunk_steps_must_be_positive(loaded):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="chunk_steps must be an integer >= 1, not 0"):
        generate(model, tokenizer, [[5, 6]], max_new_tokens=4, chunk_steps=0)
