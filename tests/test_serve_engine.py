"""The live engine (serving/live.py) in-process: a failure reaches every job, none is left waiting."""

from __future__ import annotations

import threading

import pytest
from conftest import make_hf_checkpoint

from jaxpatience import load_pretrained
from jaxpatience.generation import slots as engine
from jaxpatience.serving.live import EngineFailed, Job, LiveEngine, _settled


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_pretrained(make_hf_checkpoint(tmp_path_factory.mktemp("live") / "ckpt"))


def test_a_device_error_fails_every_job_and_later_submits(loaded, monkeypatch):
    model, tokenizer = loaded
    live = LiveEngine(model, tokenizer, slots=2, max_model_len=64).start()
    ended, failed = [], threading.Event()
    live.on_failure = failed.set
    gate = threading.Event()
    real_insert = engine.insert

    def broken_insert(*args, **kwargs):
        gate.wait(timeout=30)  # let every job reach the engine first
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "insert", broken_insert)
    jobs = [Job([5, 6, 7], emit=ended.append, n=n, max_tokens=4) for n in (1, 2, 1, 2)]  # more rows than slots
    for job in jobs:
        live.submit(job)
    gate.set()
    assert failed.wait(timeout=60)
    assert sorted((d.sample, d.error) for d in ended) == sorted((s, "RuntimeError: device lost")
                                                                for job in jobs for s in range(job.n))  # fmt: skip
    with pytest.raises(EngineFailed, match="device lost"):
        live.submit(Job([5], emit=ended.append))
    assert live.busy == 0 and live.waiting == 0
    live.stop()
    monkeypatch.setattr(engine, "insert", real_insert)


def test_settled_text_holds_back_partial_characters_and_stop_prefixes_only():
    assert _settled("abc", []) == 3
    assert _settled("ab\ufffd", []) == 2  # a character whose last byte has not come yet
    assert _settled("a" + "\ufffd" * 10, []) == 8  # invalid bytes for good: the stream goes on
    assert _settled("the end. Que", ["Question:"]) == len("the end. ")  # may start a stop string
    assert _settled("the end. Q!", ["Question:"]) == len("the end. Q!")
