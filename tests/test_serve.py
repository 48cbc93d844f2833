"""`jaxpatience serve` (serving/: app.py, wire.py, live.py) against the `openai` client, on loopback only.

One server process (a tiny random checkpoint, 8 slots, an API key) serves most tests; a second one with a single
slot and a queue of one shows the 429. Greedy answers are compared with `generate` in this process on the same
checkpoint; the checkpoint's random weights are drawn wide (initializer_range 0.1) so greedy has no near-ties.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import make_hf_checkpoint
from test_teacher import make_problems, write_problems

from jaxpatience import generate, load_pretrained
from jaxpatience.generation.api import Request

KEY = "sk-test-3f9c1e7a-never-printed"  # recognisable: no log line may hold it
NAME = "tiny-test"


def start_server(checkpoint, *flags: str) -> tuple[subprocess.Popen, str]:
    """`jaxpatience serve --port 0` in a subprocess; returns it and its base URL (the port it announced) once
    /health answers."""
    command = [sys.executable, "-m", "jaxpatience", "serve", "--model", str(checkpoint), "--port", "0",
               "--served-model-name", NAME, *flags]  # fmt: skip
    log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a full pipe nobody reads would block the server
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    process.log = log  # what the server printed, for tests to read
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        log.seek(0)
        printed = log.read()
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}:\n{printed}")
        announced = re.search(r"serving .* at (http://127\.0\.0\.1:(\d+))/v1", printed)
        try:
            if announced and httpx.get(f"{announced.group(1)}/health", timeout=1).status_code == 200:
                return process, announced.group(1)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("serve did not answer /health within 180 s")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", initializer_range=0.1,
                              max_position_embeddings=1024)  # fmt: skip


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_pretrained(checkpoint)


@pytest.fixture(scope="module")
def server_process(checkpoint):
    process, url = start_server(checkpoint, "--slots", "8", "--api-key", KEY, "--max-queue", "64")
    yield process, url
    stop_server(process)


@pytest.fixture(scope="module")
def server(server_process):
    return server_process[1]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def wait_until_idle(url: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        facts = health(url)
        if facts["busy"] == 0 and facts["waiting"] == 0:
            return facts
        time.sleep(0.1)
    return health(url)


PROMPTS = ["The cat sat on", "Once upon a time", "1 + 2 =", "Hello there, general", "abc abc abc", "Q: why?"]


def test_models_and_health(client, server):
    assert [model.id for model in client.models.list().data] == [NAME]
    assert health(server)["status"] == "ok"


def test_completions_greedy_equal_generate_stream_or_not(client, loaded):
    model, tokenizer = loaded
    for prompt, budget in zip(PROMPTS[:3], (12, 30, 7), strict=True):
        expected = generate(model, tokenizer, [prompt], max_new_tokens=budget, temperature=0.0)[0]
        reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=budget, temperature=0, logprobs=0)
        choice = reply.choices[0]
        assert choice.text == expected.text and choice.finish_reason == expected.finish_reason
        assert reply.usage.completion_tokens == len(expected.token_ids) == len(choice.logprobs.token_logprobs)
        assert reply.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
        chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=budget, temperature=0,
                                                stream=True))  # fmt: skip
        assert "".join(c.choices[0].text for c in chunks) == expected.text
        assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_chat_greedy_equals_generate_on_the_chat_template(client, loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = generate(model, tokenizer, [text], max_new_tokens=20, temperature=0.0)[0]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert reply.choices[0].message.content == expected.text and reply.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_n_samples_and_seeds_reproduce(client):
    ask = lambda seed: client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, temperature=1.0,
                                                 top_p=0.9, n=2, seed=seed, extra_body={"top_k": 50})  # fmt: skip
    first, again, other = ask(7), ask(7), ask(8)
    texts = lambda reply: [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts(first) == texts(again)
    assert texts(first)[0] != texts(first)[1] and texts(first) != texts(other)
    streamed = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.9,
                                         n=2, seed=7, stream=True, extra_body={"top_k": 50})  # fmt: skip
    joined = ["", ""]
    for chunk in streamed:
        joined[chunk.choices[0].index] += chunk.choices[0].text
    assert joined == texts(first)


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text  # fmt: skip
    at = len(full) // 2
    stop = full[at : at + 3]
    cut = full.find(stop)
    tokens = {}
    for stream in (False, True):
        reply = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop],
                                          stream=stream, logprobs=0, extra_body={"ignore_eos": True})  # fmt: skip
        chunks = list(reply) if stream else [reply]
        text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        assert (text, reason) == (full[:cut], "stop"), stream
        logprobs = [c.choices[0].logprobs for c in chunks]
        tokens[stream] = [pair for lp in logprobs for pair in zip(lp.tokens, lp.text_offset, strict=True)]
        offsets = [o for _, o in tokens[stream]]
        assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < len(text)
    assert tokens[True] == tokens[False]  # a streamed token goes out with its text, never ahead of a cut


def test_concurrent_requests_each_answered_once_as_generate(server, loaded):
    model, tokenizer = loaded
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    budgets = [4 + (7 * i) % 29 for i in range(32)]
    requests = [Request(p, max_new_tokens=b) for p, b in zip(prompts, budgets, strict=True)]
    expected = generate(model, tokenizer, requests, temperature=0.0)

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(client.completions.create(model=NAME, prompt=p, max_tokens=b, temperature=0)
                                          for p, b in zip(prompts, budgets, strict=True)))  # fmt: skip

    replies = asyncio.run(ask_all())
    assert len({reply.id for reply in replies}) == 32
    assert [reply.choices[0].text for reply in replies] == [want.text for want in expected]
    assert wait_until_idle(server)["busy"] == 0


def test_disconnected_clients_free_their_slots(server, client):
    slots, before = health(server)["slots"], health(server)["tokens"]
    budget = 900
    body = {"model": NAME, "prompt": PROMPTS[3], "max_tokens": budget, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip

    def leave_after_the_first_chunk():
        with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60) as response:  # fmt: skip
            assert response.status_code == 200
            next(response.iter_lines())  # then the client goes away mid-stream

    clients = [threading.Thread(target=leave_after_the_first_chunk) for _ in range(slots)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=120)
    assert wait_until_idle(server)["busy"] == 0
    # Every slot was taken, and freed long before its 900 tokens: the device stopped decoding the rows.
    produced = health(server)["tokens"] - before
    assert produced < slots * budget / 4, produced
    replies = [client.completions.create(model=NAME, prompt=p, max_tokens=5, temperature=0) for p in PROMPTS]
    assert all(reply.usage.completion_tokens >= 1 for reply in replies)


def test_repeated_prompts_in_one_request_are_sampled_apart_and_big_top_k_is_fine(client):
    reply = client.completions.create(model=NAME, prompt=[PROMPTS[1], PROMPTS[1]], max_tokens=12, temperature=1.0,
                                      seed=3, extra_body={"top_k": 2**40})  # fmt: skip
    first, second = (c.text for c in sorted(reply.choices, key=lambda c: c.index))
    assert first != second
    single = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=1.0, seed=3)
    assert single.choices[0].text == first  # prompt 0 of a list draws what it draws alone


def test_echo_returns_the_prompt_with_its_log_probs_and_top_alternatives(client, loaded, checkpoint):
    """echo + logprobs + max_tokens 0 or 1, as lm-evaluation-harness's loglikelihood requests ask: the prompt's
    tokens come back with the log-probs of a transformers forward pass (no compile here: an eager JAX call would
    take ~10 s), and the N alternatives per position hold the argmax's log-prob. Every request asks for 3
    alternatives: one compiled scoring shape on the server."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = loaded[1]
    prompt = PROMPTS[0] + " the mat"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1).numpy()
    expected = [float(logprobs[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    for max_tokens in (0, 1):
        reply = client.completions.create(model=NAME, prompt=ids, max_tokens=max_tokens, temperature=0, echo=True,
                                          logprobs=3)  # fmt: skip
        choice = reply.choices[0]
        assert choice.text.startswith(prompt) and len(choice.text) > len(prompt) * max_tokens - 1
        lps = choice.logprobs
        assert len(lps.tokens) == len(ids) + max_tokens and lps.token_logprobs[0] is None
        np.testing.assert_allclose(lps.token_logprobs[1 : len(ids)], expected, rtol=1e-4, atol=1e-5)
        # Three alternatives, fewer where two ids decode to the same text (a byte of a split character).
        assert lps.top_logprobs[0] is None and all(1 <= len(top) <= 3 for top in lps.top_logprobs[1:])
        for t, top in enumerate(lps.top_logprobs[1 : len(ids)]):
            assert max(top.values()) == pytest.approx(float(logprobs[t].max()), rel=1e-4, abs=1e-5)
        if max_tokens:  # the greedy token is the likeliest alternative at its position
            assert lps.token_logprobs[-1] == max(lps.top_logprobs[-1].values())
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    assert len(plain.choices[0].logprobs.top_logprobs) == len(plain.choices[0].logprobs.tokens) <= 4
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    assert all(len(entry.top_logprobs) == 3 for entry in chat.choices[0].logprobs.content)


def test_lm_eval_local_completions_against_serve_equals_in_process(server, checkpoint, monkeypatch):
    """lm-evaluation-harness's `local-completions` model against this server on a multiple-choice task gives the
    in-process backend's log-likelihoods and metric."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the [lmeval] extra (make test installs it)")
    from lm_eval.tasks import TaskManager

    from jaxpatience.evaluation.harness import HarnessLM

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)  # the task's data_files are relative to the repository root
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    # The local tasks only (lm-eval's own index takes ~15 s); one request at a time: concurrent ones reach the
    # engine in groups of 1, 2 or 4 prompts, each group size a prefill shape to compile (~30 s more here).
    tasks = TaskManager(include_path=str(root / "tests/data/lm_eval"), include_defaults=False)
    common = dict(tasks=["tiny_mc"], limit=8, log_samples=True, task_manager=tasks)
    args = (f"model={NAME},base_url={server}/v1/completions,tokenizer={checkpoint},tokenizer_backend=huggingface,"
            "num_concurrent=1,max_retries=1,max_length=1024")  # fmt: skip
    remote = lm_eval.simple_evaluate(model="local-completions", model_args=args, **common)
    local = lm_eval.simple_evaluate(model=HarnessLM.from_checkpoint(str(checkpoint), progress=False), **common)
    answers = lambda results: [s["resps"] for s in sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])]
    for doc_remote, doc_local in zip(answers(remote), answers(local), strict=True):
        for ((lp_remote, greedy_remote),), ((lp_local, greedy_local),) in zip(doc_remote, doc_local, strict=True):
            assert lp_remote == pytest.approx(lp_local, rel=1e-4) and greedy_remote == greedy_local
    assert remote["results"]["tiny_mc"]["acc,none"] == local["results"]["tiny_mc"]["acc,none"]


@pytest.mark.parametrize(
    "payload, status, words",
    [
        ("{not json", 400, "not valid JSON"),
        ([1, 2], 400, "JSON object"),
        ({"model": "other", "prompt": "a"}, 404, "does not exist"),
        ({"prompt": "a", "temperature": "hot"}, 400, "'temperature' must be a number"),
        ({"prompt": "a", "max_tokens": 2.5}, 400, "'max_tokens' must be an integer"),
        ({"prompt": "a", "stream": "yes"}, 400, "'stream' must be true or false"),
        ({"prompt": "a", "n": 0}, 400, "'n' must be in"),
        ({"prompt": "a", "top_p": 0}, 400, "'top_p' must be in (0, 1]"),
        ({"prompt": "a", "max_tokens": 5000}, 400, "more than the context of 1024"),
        ({"prompt": [1, 99999]}, 400, "outside the vocabulary"),
        ({"prompt": ""}, 400, "prompt 0 is empty"),
        ({"messages": [{"role": "user", "content": "a"}], "echo": True}, 400, "'echo' is for /v1/completions"),
        ({"prompt": "a", "echo": True, "logprobs": 1, "stream": True}, 400, "not streamed"),
        ({"prompt": "a", "logprobs": 6}, 400, "'logprobs' must be in [0, 5]"),
        ({"prompt": "a", "max_tokens": -1}, 400, "'max_tokens' must be >= 0"),
        ({"prompt": "a", "stop": ["a"] * 17}, 400, "at most 16 strings"),
        ({"messages": "hi"}, 400, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "wizard", "content": "a"}]}, 400, "messages[0].role is 'wizard'; a role is one of"),
        ({"messages": [{"role": "system", "content": "a"}, {"role": "usr", "content": "b"}]}, 400, "messages[1].role"),
        ("[" * 100000, 400, "not valid JSON"),
        ('{"prompt": "a", "seed": ' + "9" * 5000 + "}", 400, "not valid JSON"),
        ({"prompt": "a\ud800"}, 400, "'prompt' holds '\\ud800', a lone surrogate"),
        ({"prompt": ["ok", [1, 2], "b\udfff"]}, 400, "'prompt[2]' holds '\\udfff'"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, 400, "'messages[0].content' holds '\\ud800'"),
        (
            {"prompt": "a", "max_tokns": 3},
            400,
            "unknown field 'max_tokns' for /v1/completions (did you mean 'max_tokens'",
        ),
        ({"messages": [{"role": "user", "content": "a"}], "prompt": "a"}, 400, "unknown field 'prompt'"),
        (
            {"prompt": "a", "stream": True, "stream_options": {"include_usge": True}},
            400,
            "'stream_options.include_usge'",
        ),
        ({"prompt": "a", "frequency_penalty": 0.5}, 400, "'frequency_penalty' = 0.5 is not supported"),
        (
            {"prompt": "a", "user": "u1", "frequency_penalty": 0, "max_tokens": 0},
            200,
            None,
        ),  # fields that change nothing
    ],
)
def test_bad_requests_get_their_status_and_one_sentence(server, payload, status, words):
    endpoint = "chat/completions" if isinstance(payload, dict) and "messages" in payload else "completions"
    data = payload if isinstance(payload, str) else json.dumps(payload)
    response = httpx.post(f"{server}/v1/{endpoint}", content=data, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == status, response.text
    assert words is None or words in response.json()["error"]["message"]


def test_hostile_clients_get_400_or_leave_without_a_traceback_and_each_request_is_logged(server_process, client):
    """A 10 MB prompt is refused by its length before it is tokenized; a client that leaves mid-body and
    lower-case `bearer` are handled; the log has one access line
    per request (method, path, status, tokens, time) and no traceback."""
    process, url = server_process
    headers = {"Authorization": f"bearer {KEY}", "Content-Type": "application/json"}  # the scheme in lower case
    start = time.monotonic()
    huge = httpx.post(f"{url}/v1/completions", json={"prompt": "7 " * 5_000_000}, headers=headers, timeout=60)
    assert huge.status_code == 400 and "characters, more than the context can hold" in huge.json()["error"]["message"]
    assert time.monotonic() - start < 10  # tokenizing it would take far longer
    reply = httpx.post(f"{url}/v1/completions", json={"prompt": "Q: why?", "max_tokens": 3, "temperature": 0},
                       headers=headers, timeout=60)  # fmt: skip
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # 1000 bytes promised, 20 sent
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nAuthorization: Bearer "
        sock.sendall(head + KEY.encode() + b'\r\n\r\n{"prompt": "aaaaaa')
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        process.log.seek(0)
        log = process.log.read()
        if '"POST /v1/completions" 499' in log:
            break
        time.sleep(0.1)
    assert '"POST /v1/completions" 499 - tokens' in log and "the client left while sending its body" in log
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]
    lines = [line for line in log.splitlines() if '"POST /v1/completions" 200' in line]
    assert lines and all(re.search(r'^127\.0\.0\.1:\d+ "POST /v1/completions" 200 \d+\+\d+ tokens \d+\.\d+s$', line)
                         for line in lines), lines[:3]  # fmt: skip
    assert re.search(r'"POST /v1/completions" 400 - tokens', log)


def test_a_port_in_use_or_an_unknown_host_is_one_sentence_before_serving(checkpoint, capsys):
    from jaxpatience import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--model", str(checkpoint), "--port", str(port)]) == 2
    printed = capsys.readouterr()
    assert "serving" not in printed.out and "Traceback" not in printed.err
    (line,) = printed.err.strip().splitlines()
    assert f"cannot listen on 127.0.0.1:{port}" in line and "another program listens there" in line


def test_port_0_announces_the_port_it_got(server_process):
    """Every server of this file starts with --port 0 (start_server) and is reached at the port it announced."""
    process, url = server_process
    assert int(url.rsplit(":", 1)[1]) > 0 and health(url)["status"] == "ok"


def test_unknown_paths_and_methods_answer_in_openai_shape(server):
    assert httpx.get(f"{server}/v1/nothing", timeout=30).json()["error"]["message"].startswith("GET /v1/nothing")
    assert httpx.get(f"{server}/v1/completions", timeout=30).status_code == 405


def test_a_wrong_or_missing_api_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{server}/v1/completions", json={"prompt": "a"}, headers=headers, timeout=30)
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    assert httpx.get(f"{server}/v1/models", timeout=30).status_code == 401


def test_a_full_queue_answers_429_with_retry_after(checkpoint):
    """One slot and a queue of one: of 16 requests sent at once (each ~1000 tokens, a second or more), one or two
    are answered (the one running and the one waiting; when all arrive before the engine admits the first, that one
    still fills the queue) and the others are refused at once rather than left hanging."""
    process, url = start_server(checkpoint, "--slots", "1", "--max-queue", "1")
    body = {"prompt": PROMPTS[3], "max_tokens": 1000, "temperature": 0, "ignore_eos": True}

    async def send_all():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(http.post(f"{url}/v1/completions", json=body) for _ in range(16)))

    try:
        replies = asyncio.run(send_all())
    finally:
        stop_server(process)
    refused = [reply for reply in replies if reply.status_code == 429]
    assert all(reply.status_code in (200, 429) for reply in replies)
    assert refused and len(refused) < len(replies), [reply.status_code for reply in replies]
    assert all(r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"] for r in refused)
    answered = [reply.json() for reply in replies if reply.status_code == 200]
    assert all(answer["usage"]["completion_tokens"] == 1000 for answer in answered)


def test_pairs_runs_against_a_served_checkpoint(server, tmp_path):
    problems = make_problems(2)
    out = tmp_path / "pairs.jsonl"
    command = [sys.executable, "-m", "jaxpatience", "pairs", "--problems", str(write_problems(tmp_path / "p.jsonl",
               problems)), "--out", str(out), "--base-url", f"{server}/v1", "--model", NAME]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OPENAI_API_KEY": KEY})  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "pairs.summary.json").read_text())
    # A random model never reaches the gold answers: every problem is asked and dropped for its reply, none is
    # lost to a transport error.
    assert summary["written"] + sum(summary["dropped"].values()) == len(problems), summary
    assert not summary["failed"] and summary["requests"] >= len(problems), summary


def test_the_api_key_never_appears_in_the_server_log(server_process):
    """Last in this file: by now the server has answered every test's requests, refused wrong and missing keys
    (401) and served a `pairs` run; nothing it printed holds the key."""
    process, url = server_process
    httpx.post(f"{url}/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer wrong"}, timeout=30)
    process.log.seek(0)
    log = process.log.read()
    assert "serving" in log and KEY not in log
