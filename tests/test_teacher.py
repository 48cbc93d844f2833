"""The teacher client (`jaxpatience pairs`) against a real HTTP server speaking the OpenAI chat-completions format.

`FakeTeacher` listens on 127.0.0.1 (port 0), and answers each request according to a per-problem, per-side script:
good solutions, wrong ones, 429/500/401, replies slower than the client timeout, malformed bodies. No traffic leaves
the machine; the server thread stops itself after a deadline even if a test forgets to stop it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jaxpatience import cli
from jaxpatience.data import teacher
from jaxpatience.data.pairs import prompt_messages, read_records
from jaxpatience.data.problems import Problem

MODEL = "teacher-test"
KEY = "sk-test"
REPO = Path(__file__).resolve().parents[1]


def make_problems(count: int) -> list[Problem]:
    """Problems with answers in the thousands, so replies can write them as "$1,234." and "#### 1234"."""
    return [
        Problem(
            id=f"q{i}",
            question=f"[q{i}] Tom has {1000 * (i + 1)} apples and buys {i + 7} more. How many?",
            answer=str(1000 * (i + 1) + i + 7),
        )
        for i in range(count)
    ]


def good_reply(problem: Problem, side: str, wrong: bool = False) -> str:
    """A correct (or off-by-one) solution; the concise one carries a marker that tells the two requests apart."""
    value = int(problem.answer) + (1 if wrong else 0)
    if side == "concise":
        return f"«concise» The total is {value:,}. The answer is ${value:,}."
    return f"Step 1: list what is given.\nStep 2: add.\nCheck: {value} is the sum.\n#### {value}"


class FakeTeacher:
    """An OpenAI-compatible server on 127.0.0.1. `script[(id, side)]` lists an action per attempt; then: good.

    Actions: "good", "wrong", ("status", code, headers), ("slow", seconds), "malformed" (cut-off JSON),
    "no_choices" (valid JSON that is not a chat completion).
    Every request is logged as {"t", "id", "side", "action"}.
    """

    def __init__(self, problems: list[Problem], script: dict | None = None, delay: float = 0.0, deadline: float = 90):
        self.problems = {p.id: p for p in problems}
        self.script = {key: list(actions) for key, actions in (script or {}).items()}
        self.delay = delay  # seconds before every reply (to make a run last long enough to be killed)
        self.log: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._server.timeout = 0.05
        self._stop = threading.Event()
        self._deadline = time.monotonic() + deadline
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:  # bounded: stops itself
            self._server.handle_request()
        self._server.server_close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def requests_for(self, problem_id: str, side: str | None = None) -> list[dict]:
        return [r for r in self.log if r["id"] == problem_id and side in (None, r["side"])]

    def next_action(self, problem_id: str, side: str):
        with self._lock:
            actions = self.script.get((problem_id, side), [])
            return actions.pop(0) if actions else "good"

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._answer(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): fine
                    pass
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _answer(self, body: dict) -> None:
                text = " ".join(m["content"] for m in body["messages"])
                match = re.search(r"\[(q\d+)\]", text)
                problem_id = match.group(1) if match else "?"
                side = "patient" if "«concise»" in text else "concise"
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    action = ("status", 401, {})
                elif body.get("model") != MODEL:
                    action = ("status", 404, {})
                elif self.path != "/v1/chat/completions":
                    action = ("status", 404, {})
                else:
                    action = fake.next_action(problem_id, side)
                fake.log.append({"t": time.monotonic(), "id": problem_id, "side": side, "action": action})
                time.sleep(fake.delay)
                if isinstance(action, tuple) and action[0] == "slow":
                    time.sleep(action[1])
                    action = "good"
                if action == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [{"index": 0, "mess', {})
                if action == "no_choices":
                    return self._send(200, b'{"id": "x", "object": "chat.completion", "model": "m"}', {})
                if isinstance(action, tuple) and action[0] == "status":
                    error = {"error": {"message": f"scripted {action[1]}", "type": "test", "code": None}}
                    return self._send(action[1], json.dumps(error).encode(), action[2])
                content = good_reply(fake.problems[problem_id], side, wrong=action == "wrong")
                completion = {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": MODEL,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                    ],
                    "usage": {
                        "prompt_tokens": len(text.split()),
                        "completion_tokens": len(content.split()),
                        "total_tokens": len(text.split()) + len(content.split()),
                    },
                }
                self._send(200, json.dumps(completion).encode(), {})

            def _send(self, status: int, payload: bytes, headers: dict) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        return Handler


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    """httpx honours proxy variables: keep every request (and the subprocess's) on 127.0.0.1."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def serve():
    servers = []

    def start(problems, script=None, delay=0.0) -> FakeTeacher:
        servers.append(FakeTeacher(problems, script, delay))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def config_for(server: FakeTeacher, **overrides) -> teacher.TeacherConfig:
    settings = dict(
        base_url=server.url,
        model=MODEL,
        api_key=KEY,
        concurrency=4,
        max_retries=4,
        timeout=5.0,
        backoff=0.01,
        prompts=teacher.load_prompts(),
        progress=False,
    )
    return teacher.TeacherConfig(**{**settings, **overrides})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_problems(path: Path, problems: list[Problem]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n" for p in problems)
    )
    return path


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
# Pure parts.


@pytest.mark.parametrize(
    ("text", "gold", "expected"),
    [
        ("So 1,000 + 234 = 1,234. The answer is $1,234.", "1234", True),
        ("Step 2: 5 * 3 = 15.\n#### 1,234", "1234", True),
        ("He ends with 1234 apples", "1234", True),  # no marker: the last number
        ("The answer is 12.50.", "12.5", True),
        ("The answer is 1235.", "1234", False),
        ("The answer is 1234.\nWait, 20 - 3 = 17, so the answer is 17.", "1234", False),  # the last marker wins
        ("no number at all", "3", False),
    ],
)
def test_reaches_gold(text, gold, expected):
    assert teacher.reaches_gold(text, gold) is expected


def test_cost_estimate():
    assert teacher.estimate_cost("gpt-4o", 1_000_000, 1_000_000) == pytest.approx(2.5 + 10.0)
    assert teacher.estimate_cost("gpt-4o-mini-2024-07-18", 2_000_000, 0) == pytest.approx(0.30)  # longest prefix
    assert teacher.estimate_cost("llama3", 10, 10) is None
    assert teacher.estimate_cost("llama3", 1_000_000, 1_000_000, price_in=1.0, price_out=3.0) == pytest.approx(4.0)


def test_prompts_file(tmp_path):
    prompts = teacher.load_prompts(REPO / "configs" / "teacher_prompts.yaml")
    messages = teacher.build_messages(prompts, "What is 2+3?", concise="2+3=5. The answer is 5.")
    assert "What is 2+3?" in messages[-1]["content"] and "2+3=5. The answer is 5." in messages[-1]["content"]
    cases = {
        "concise: 'Solve {questoin}'\npatient: '{concise}'": "unknown placeholder {questoin}",
        "concise: 'Solve {question}'\npatient: 'Rewrite {question}'": "must contain the placeholder {concise}",
        "concise: 'Solve {question} with {'\npatient: '{concise}'": "literal braces",
        "concise: 'Solve {question}'\npatient: '{concise}'\nsystme: hi": "unknown key",
        "concise: 'Solve {question}'": "non-empty text under 'patient'",
    }
    for text, message in cases.items():
        path = tmp_path / "prompts.yaml"
        path.write_text(text)
        with pytest.raises(teacher.TeacherError, match=re.escape(message)):
            teacher.load_prompts(path)


def test_torn_last_line_is_repaired(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "chosen": "Step 1')  # a crash mid-write
    assert teacher.read_jsonl_ids(path) == {"a", "b"}
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    path.write_text('{"id": "a"}\n{"id": "b"}')  # a whole record that only lacks its newline is kept
    assert teacher.read_jsonl_ids(path) == {"a", "b"} and path.read_text().endswith('"b"}\n')
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')  # garbage in the middle: not ours to cut
    with pytest.raises(teacher.TeacherError, match="line 2"):
        teacher.read_jsonl_ids(path)


# ---------------------------------------------------------------------------------------------------
# Against the server.


def test_pairs_with_wrong_answers_and_transient_failures(serve, tmp_path):
    problems = make_problems(10)
    script = {
        ("q1", "concise"): ["wrong"],
        ("q2", "patient"): ["wrong"],
        ("q3", "concise"): [("status", 429, {"Retry-After": "0.4"})],
        ("q4", "patient"): [("status", 500, {})],
        ("q5", "concise"): [("slow", 1.5)],  # longer than the client's 0.5 s timeout
        ("q6", "concise"): ["malformed"] * 5,  # never a valid reply: dropped as malformed
        ("q7", "patient"): ["no_choices"],  # once, then fine
    }
    server = serve(problems, script)
    out = tmp_path / "pairs.jsonl"
    summary = teacher.build_pairs(problems, out, config_for(server, timeout=0.5))

    records = {r["id"]: r for r in read_jsonl(out)}
    good = {"q0", "q3", "q4", "q5", "q7", "q8", "q9"}
    assert set(records) == good and len(read_jsonl(out)) == len(good)
    by_id = {p.id: p for p in problems}
    for problem_id, record in records.items():
        assert record["chosen"] == good_reply(by_id[problem_id], "patient")
        assert record["rejected"] == good_reply(by_id[problem_id], "concise")
        assert record["prompt"] == by_id[problem_id].question and record["answer"] == by_id[problem_id].answer
        assert record["teacher_model"] == MODEL and record["usage"]["completion_tokens"] > 0

    loaded = read_records(out)  # what the pair loader sees: the question as the one user turn
    assert [prompt_messages(r) for r in loaded] == [[{"role": "user", "content": r["prompt"]}] for r in loaded]

    rejected = {r["id"]: r for r in read_jsonl(tmp_path / "pairs.rejected.jsonl")}
    assert {k: r["reason"] for k, r in rejected.items()} == {
        "q1": "concise_wrong",
        "q2": "patient_wrong",
        "q6": "malformed",
    }
    assert summary["dropped"] == {"concise_wrong": 1, "patient_wrong": 1, "malformed": 1}
    assert summary["written"] == len(good) and summary["failed"] == {}
    assert len(server.requests_for("q1")) == 1  # a wrong concise answer is not sent for rewriting
    assert len(server.requests_for("q6")) == teacher.MALFORMED_ATTEMPTS

    first, second = server.requests_for("q3", "concise")[:2]  # 429 with Retry-After: 0.4
    assert second["t"] - first["t"] >= 0.4
    assert len(server.requests_for("q4", "patient")) == 2 and len(server.requests_for("q5", "concise")) == 2
    assert summary["retries"] == {
        "http_429": 1,
        "http_500": 1,
        "timeout": 1,
        "malformed": 2 + 1,
    }  # q6: 2 retries, q7: 1

    # Usage is summed over every completed request, including those of dropped problems.
    assert summary["usage"]["completion_tokens"] >= sum(r["usage"]["completion_tokens"] for r in records.values())
    assert summary["cost_usd"] == "unknown"
    assert json.loads((tmp_path / "pairs.summary.json").read_text())["written"] == len(good)

    # A rerun sends nothing: done and dropped problems are both skipped.
    sent = len(server.log)
    again = teacher.build_pairs(problems, out, config_for(server))
    assert again["written"] == 0 and again["skipped_done"] == len(good) and again["skipped_dropped"] == 3
    assert len(server.log) == sent
    # --retry-dropped asks again for the dropped ones only (the scripts are used up: now they succeed).
    retried = teacher.build_pairs(problems, out, config_for(server, retry_dropped=True))
    assert retried["written"] == 3 and {r["id"] for r in server.log[sent:]} == {"q1", "q2", "q6"}
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(by_id)


def test_retries_run_out_on_transient_errors(serve, tmp_path):
    problems = make_problems(2)
    server = serve(problems, {("q1", "concise"): [("status", 503, {})] * 10})
    config = config_for(server, max_retries=2, concurrency=1)  # q0 first: the endpoint is known to work
    summary = teacher.build_pairs(problems, tmp_path / "pairs.jsonl", config)
    assert summary["failed"] == {"http_503": 1} and summary["written"] == 1
    assert len(server.requests_for("q1")) == 3  # bounded: the first attempt and 2 retries
    assert not (tmp_path / "pairs.rejected.jsonl").read_text()  # not dropped for good: a rerun tries again

    # An endpoint that never answers successfully stops the run instead of going through every problem.
    server = serve(
        problems, {("q0", "concise"): [("status", 503, {})] * 10, ("q1", "concise"): [("status", 503, {})] * 10}
    )
    with pytest.raises(teacher.TeacherError, match="answered no request"):
        teacher.build_pairs(problems, tmp_path / "again.jsonl", config_for(server, max_retries=2))
    assert len(server.log) <= 2 * 3


def test_concurrency_is_bounded(serve, tmp_path):
    problems = make_problems(9)
    server = serve(problems, delay=0.1)
    summary = teacher.build_pairs(problems, tmp_path / "pairs.jsonl", config_for(server, concurrency=3))
    assert summary["written"] == 9
    assert 2 <= server.max_in_flight <= 3


def test_bad_key_is_one_clear_line(serve, tmp_path, capsys, monkeypatch):
    problems = make_problems(4)
    server = serve(problems)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    argv = [
        "pairs",
        "--problems",
        str(write_problems(tmp_path / "p.jsonl", problems)),
        "--out",
        str(tmp_path / "pairs.jsonl"),
        "--base-url",
        server.url,
        "--model",
        MODEL,
        "--concurrency",
        "1",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "API key" in err[0] and "401" in err[0] and "Traceback" not in err[0]
    assert len(server.log) <= 2


def test_unknown_model_is_one_clear_line(serve, tmp_path, capsys, monkeypatch):
    problems = make_problems(3)
    server = serve(problems)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    argv = [
        "pairs",
        "--problems",
        str(write_problems(tmp_path / "p.jsonl", problems)),
        "--out",
        str(tmp_path / "pairs.jsonl"),
        "--base-url",
        server.url,
        "--model",
        "no-such-model",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0] and "404" in err[0]
    assert len(server.log) <= len(problems)  # at most one request per worker, none retried


def test_second_run_on_the_same_output_is_refused(serve, tmp_path):
    problems = make_problems(2)
    server = serve(problems)
    out = tmp_path / "pairs.jsonl"
    holder = teacher.JsonlAppender(out)
    teacher._lock(holder)  # as a first run does
    try:
        with pytest.raises(teacher.TeacherError, match="another run"):
            teacher.build_pairs(problems, out, config_for(server))
    finally:
        holder.close()
    assert server.log == []


def test_unreachable_endpoint_fails_fast(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    # With max_retries=5 and a 0.2 s backoff, retrying to the end would sleep >= 0.2 * (1+2+4+8+16) / 2 = 3.1 s.
    config = teacher.TeacherConfig(
        base_url=url, model=MODEL, prompts=teacher.load_prompts(), max_retries=5, backoff=0.2, progress=False
    )
    start = time.monotonic()
    with pytest.raises(teacher.TeacherError, match=re.escape(f"cannot reach {url}")):
        teacher.build_pairs(make_problems(3), tmp_path / "pairs.jsonl", config)
    assert time.monotonic() - start < 2.0


def test_dry_run_sends_nothing(serve, tmp_path, capsys):
    problems = make_problems(5)
    server = serve(problems)
    out = tmp_path / "pairs.jsonl"
    argv = [
        "--problems",
        str(write_problems(tmp_path / "p.jsonl", problems)),
        "--out",
        str(out),
        "--base-url",
        server.url,
        "--model",
        MODEL,
        "--dry-run",
    ]
    assert teacher.main(argv) == 0
    printed = capsys.readouterr().out
    assert problems[0].question in printed and "<the concise solution>" in printed
    assert problems[teacher.DRY_RUN_SHOWN].question not in printed  # only the first few
    assert server.log == [] and not out.exists()


def test_killed_run_resumes_with_one_record_per_problem(serve, tmp_path):
    problems = make_problems(16)
    server = serve(problems, delay=0.1)
    out = tmp_path / "pairs.jsonl"
    command = [
        sys.executable,
        "-m",
        "jaxpatience.cli",
        "pairs",
        "--problems",
        str(write_problems(tmp_path / "p.jsonl", problems)),
        "--out",
        str(out),
        "--base-url",
        server.url,
        "--model",
        MODEL,
        "--concurrency",
        "2",
        "--backoff",
        "0.01",
        "--no-progress",
    ]
    env = {**os.environ, "OPENAI_API_KEY": KEY, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while len(read_jsonl(out)) < 3 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)  # mid-run: requests are in flight
    finally:
        process.wait(timeout=10)
    before = [r["id"] for r in read_jsonl(out)]
    assert 3 <= len(before) < len(problems), process.stderr.read().decode()[-2000:]
    with open(out, "a") as handle:  # as if the kill had landed in the middle of a write
        handle.write('{"id": "q15", "prompt": "[q15] Tom')
    sent_before_restart = len(server.log)

    server.delay = 0.0
    finished = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr[-2000:]
    ids = [r["id"] for r in read_jsonl(out)]  # every line parses: the torn one is gone
    assert sorted(ids) == sorted(p.id for p in problems) and len(ids) == len(set(ids))
    asked_again = {r["id"] for r in server.log[sent_before_restart:]}
    assert not asked_again & set(before)  # finished problems are not asked again
