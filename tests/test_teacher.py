"""The teacher client (`jaxpatience pairs`) against a real HTTP server speaking the OpenAI chat-completions format.

`FakeTeacher` listens on 127.0.0.1 (port 0), and answers each request according to a per-problem, per-side script:
good solutions, wrong ones, 429/500/401, replies slower than the client timeout, malformed bodies (cut-off JSON,
HTML, no choices, no text), a patient rewrite that repeats the concise text. No traffic leaves the machine; the
server thread stops itself after a deadline even if a test forgets to stop it. Failures in test_teacher_faults.py.
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
from jaxpatience.data.pairs import prompt_messages, read_records
from jaxpatience.data.problems import Problem
from jaxpatience.durability.store import JsonlStore, StoreError
from jaxpatience.teacher import run as teacher
from jaxpatience.teacher.run import side_paths

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


def completion(content: str | None, prompt_text: str) -> dict:
    """A chat completion in the OpenAI layout, with token counts that grow with the texts."""
    prompt_tokens, completion_tokens = len(prompt_text.split()), len((content or "").split())
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class FakeTeacher:
    """An OpenAI-compatible server on 127.0.0.1. `script[(id, side)]` lists an action per attempt; then: good.

    Actions: "good", "wrong", ("status", code, headers), ("slow", seconds), "malformed" (cut-off JSON),
    "no_choices" (valid JSON that is not a chat completion), "html" (a 200 text/html page), "html_json" (the same
    labelled application/json), "empty" (a message whose text is ""), "null" (content null), "echo" (the patient
    rewrite repeats the concise solution, re-wrapped); a weak or hostile teacher's: "placeholder" (copies the
    template's "The answer is N." after the right number), "short" (a bare "The answer is N." with the number),
    "no_marker" (the number, no final-answer marker), "parts" (content as a list of text parts), "bad_usage" (a
    nonsense usage block), "error_200" (a 200 with an {"error": ...} body), "huge" (a 2 MB answer), "drip" (the
    reply one byte every 0.1 s). A status reply's message (and the HTML) quotes the request's
    Authorization header, as a careless server might: the client must not pass it on.
    Every request is logged as {"t", "id", "side", "action"}.
    """

    def __init__(
        self,
        problems: list[Problem],
        script: dict | None = None,
        delay: float = 0.0,
        deadline: float = 90,
        key: str = KEY,
    ):
        self.problems = {p.id: p for p in problems}
        self.key = key  # the API key it accepts (anything else: 401)
        self.script = {key: list(actions) for key, actions in (script or {}).items()}
        self.delay = delay  # seconds before every reply (to make a run last long enough to be killed)
        self.log: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHandler)
        self._server.fake = self  # what each FakeHandler answers for
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


class FakeHandler(BaseHTTPRequestHandler):
    """One request to a FakeTeacher (`self.server.fake`): checks key, model and route, then plays the script."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake._lock:
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            self._answer(fake, body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): fine
            pass
        finally:
            with fake._lock:
                fake.in_flight -= 1

    def _action(self, fake: FakeTeacher, body: dict, problem_id: str, side: str):
        """What a real server would answer first (401, 404), else the script's next action."""
        if self.headers.get("Authorization") != f"Bearer {fake.key}":
            return ("status", 401, {})
        if body.get("model") != MODEL or self.path != "/v1/chat/completions":
            return ("status", 404, {})
        return fake.next_action(problem_id, side)

    def _answer(self, fake: FakeTeacher, body: dict) -> None:
        text = " ".join(m["content"] for m in body["messages"])
        match = re.search(r"\[(q\d+)\]", text)
        problem_id = match.group(1) if match else "?"
        side = "patient" if "«concise»" in text else "concise"
        action = self._action(fake, body, problem_id, side)
        fake.log.append({"t": time.monotonic(), "id": problem_id, "side": side, "action": action,
                         "max_tokens": body.get("max_tokens")})  # fmt: skip
        time.sleep(fake.delay)
        if isinstance(action, tuple) and action[0] == "slow":
            time.sleep(action[1])
            action = "good"
        auth = self.headers.get("Authorization")
        if action == "malformed":
            return self._send(200, b'{"id": "x", "choices": [{"index": 0, "mess', {})
        if action == "no_choices":
            return self._send(200, b'{"id": "x", "object": "chat.completion", "model": "m"}', {})
        if action in ("html", "html_json"):
            page = f"<html><body>{auth} Bad gateway</body></html>".encode()
            return self._send(200, page, {}, "text/html" if action == "html" else "application/json")
        if isinstance(action, tuple) and action[0] == "status":
            error = {"error": {"message": f"scripted {action[1]} for {auth}", "type": "test", "code": None}}
            return self._send(action[1], json.dumps(error).encode(), action[2])
        if action == "error_200":
            return self._send(200, b'{"error": {"message": "the model is overloaded, try later", "code": 503}}', {})
        problem = fake.problems[problem_id]
        content = {"empty": "", "null": None}.get(action, good_reply(problem, side, wrong=action == "wrong"))
        if action == "echo":  # the concise solution back, only re-wrapped: chosen == rejected but for whitespace
            content = "  " + good_reply(problem, "concise").replace(" ", "\n", 2) + "\n"
        weak = {
            "placeholder": lambda: f"{content}\nThe answer is N.",
            "short": lambda: f"The answer is {problem.answer}.",
            "no_marker": lambda: f"He ends with {problem.answer} apples",
            "huge": lambda: content + " pad" * 500_000,
        }
        content = weak[action]() if action in weak else content
        reply = completion(content, text)
        if action == "parts":
            reply["choices"][0]["message"]["content"] = [{"type": "text", "text": part} for part in content.split(" ")]
            reply["choices"][0]["message"]["content"][1:] = [
                {"type": "text", "text": " " + part["text"]} for part in reply["choices"][0]["message"]["content"][1:]
            ]
        if action == "bad_usage":
            reply["usage"] = {"prompt_tokens": -3, "completion_tokens": "many", "total_tokens": None}
        if action == "drip":
            return self._drip(json.dumps(reply).encode())
        self._send(200, json.dumps(reply).encode(), {})

    def _drip(self, payload: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        for byte in payload:  # the client's read timeout never trips: a byte comes every 0.1 s
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.1)

    def _send(self, status: int, payload: bytes, headers: dict, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    """httpx honours proxy variables: keep every request (and the subprocess's) on 127.0.0.1."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def serve():
    servers = []

    def start(problems, script=None, delay=0.0, key=KEY) -> FakeTeacher:
        servers.append(FakeTeacher(problems, script, delay, key=key))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def config_for(server: FakeTeacher, out: Path, **overrides) -> teacher.TeacherConfig:
    settings = dict(
        base_url=server.url, model=MODEL, out=str(out), concurrency=4, max_retries=4, timeout=5.0, backoff=0.01
    )
    return teacher.TeacherConfig(**{**settings, **overrides})


def run_pairs(problems: list[Problem], server: FakeTeacher, out: Path, **overrides) -> dict:
    """`build_pairs` against `server` with the test key, as `jaxpatience pairs --no-progress` runs it."""
    return teacher.build_pairs(problems, config_for(server, out, **overrides), api_key=KEY, progress=False)


def parsed_lines(path: Path) -> list[dict]:
    """Every line of a JSONL file, parsed strictly (a torn line fails the test)."""
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
        ("He ends with 1234 apples", "1234", False),  # no marker: no final answer (read strictly)
        ("So 1,234 apples. The answer is N.", "1234", False),  # a marker without a number: not the last number
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


# ---------------------------------------------------------------------------------------------------
# Against the server.


TRANSIENT_SCRIPT = {
    ("q1", "concise"): ["wrong"],
    ("q2", "patient"): ["wrong"],
    ("q3", "concise"): [("status", 429, {"Retry-After": "0.4"})],
    ("q4", "patient"): [("status", 500, {})],
    ("q5", "concise"): [("slow", 1.5)],  # longer than the client's 0.5 s timeout
    ("q6", "concise"): ["malformed"] * 5,  # no valid reply in 1 + max_retries attempts: a transient drop
    ("q7", "patient"): ["no_choices"],  # once, then fine
}
TRANSIENT_GOOD = {"q0", "q3", "q4", "q5", "q7", "q8", "q9"}  # the problems of TRANSIENT_SCRIPT that give a pair
RETRIES = 4  # max_retries of config_for


def test_pairs_with_wrong_answers_and_transient_failures(serve, tmp_path):
    problems = make_problems(10)
    server = serve(problems, TRANSIENT_SCRIPT)
    out = tmp_path / "pairs.jsonl"
    summary = run_pairs(problems, server, out, timeout=0.5)

    records = {r["id"]: r for r in parsed_lines(out)}
    assert set(records) == TRANSIENT_GOOD and len(parsed_lines(out)) == len(TRANSIENT_GOOD)
    by_id = {p.id: p for p in problems}
    for problem_id, record in records.items():
        assert record["chosen"] == good_reply(by_id[problem_id], "patient")
        assert record["rejected"] == good_reply(by_id[problem_id], "concise")
        assert record["prompt"] == by_id[problem_id].question and record["answer"] == by_id[problem_id].answer
        assert record["teacher_model"] == MODEL and record["usage"]["completion_tokens"] > 0

    loaded = read_records(out)  # what the pair loader sees: the question as the one user turn
    assert [prompt_messages(r) for r in loaded] == [[{"role": "user", "content": r["prompt"]}] for r in loaded]

    rejected = {r["id"]: r for r in parsed_lines(tmp_path / "pairs.rejected.jsonl")}
    assert {k: (r["reason"], r["transient"]) for k, r in rejected.items()} == {
        "q1": ("concise_wrong", False),
        "q2": ("patient_wrong", False),
        "q6": ("malformed", True),
    }
    assert summary["dropped"] == {"concise_wrong": 1, "patient_wrong": 1}
    assert summary["written"] == len(TRANSIENT_GOOD) and summary["failed"] == {"malformed": 1}
    assert_retries(server, summary)

    # Usage is summed over every completed request, including those of dropped problems.
    assert summary["usage"]["completion_tokens"] >= sum(r["usage"]["completion_tokens"] for r in records.values())
    assert summary["cost_usd"] == "unknown"
    assert json.loads((tmp_path / "pairs.summary.json").read_text())["written"] == len(TRANSIENT_GOOD)
    assert_reruns_skip_then_retry_dropped(server, problems, out)


def assert_retries(server: FakeTeacher, summary: dict) -> None:
    """The requests TRANSIENT_SCRIPT caused: bounded drops, honoured Retry-After, one retry per transient failure."""
    assert len(server.requests_for("q1")) == 1  # a wrong concise answer is not sent for rewriting
    assert len(server.requests_for("q6")) == 1 + RETRIES  # retried like a 5xx, then dropped
    first, second = server.requests_for("q3", "concise")[:2]  # 429 with Retry-After: 0.4
    assert second["t"] - first["t"] >= 0.4
    assert len(server.requests_for("q4", "patient")) == 2 and len(server.requests_for("q5", "concise")) == 2
    assert summary["retries"] == {"http_429": 1, "http_500": 1, "timeout": 1, "malformed": RETRIES + 1}  # q6, q7


def assert_reruns_skip_then_retry_dropped(server: FakeTeacher, problems: list[Problem], out: Path) -> None:
    """After the run of TRANSIENT_SCRIPT (its scripts now used up): a rerun asks again for the transient drop only,
    --retry-dropped for the wrong answers too; the rejected file loses the records of the problems asked again."""
    sent = len(server.log)
    again = run_pairs(problems, server, out)
    assert (again["written"], again["skipped_done"], again["skipped_dropped"], again["asked_again"]) == (1, 7, 2, 1)
    assert {r["id"] for r in server.log[sent:]} == {"q6"}
    assert sorted(r["id"] for r in parsed_lines(side_paths(out)[0])) == ["q1", "q2"]
    sent = len(server.log)
    retried = run_pairs(problems, server, out, retry_dropped=True)
    assert retried["written"] == 2 and {r["id"] for r in server.log[sent:]} == {"q1", "q2"}
    assert sorted(r["id"] for r in parsed_lines(out)) == sorted(p.id for p in problems)
    assert parsed_lines(side_paths(out)[0]) == []  # every problem has its pair: no drop left


def test_retries_run_out_on_transient_errors(serve, tmp_path):
    problems = make_problems(2)
    server = serve(problems, {("q1", "concise"): [("status", 503, {})] * 10})
    # concurrency 1, so q0 first: the endpoint is known to work when q1 fails.
    summary = run_pairs(problems, server, tmp_path / "pairs.jsonl", max_retries=2, concurrency=1)
    assert summary["failed"] == {"http_503": 1} and summary["written"] == 1
    assert len(server.requests_for("q1")) == 3  # bounded: the first attempt and 2 retries
    (record,) = parsed_lines(tmp_path / "pairs.rejected.jsonl")  # recorded with its reason, as transient
    assert (record["id"], record["reason"], record["transient"]) == ("q1", "http_503", True)

    # An endpoint that never answers successfully stops the run instead of going through every problem.
    server = serve(
        problems, {("q0", "concise"): [("status", 503, {})] * 10, ("q1", "concise"): [("status", 503, {})] * 10}
    )
    with pytest.raises(teacher.TeacherError, match="answered no request"):
        run_pairs(problems, server, tmp_path / "again.jsonl", max_retries=2)
    assert len(server.log) <= 2 * 3


def test_concurrency_is_bounded(serve, tmp_path):
    problems = make_problems(9)
    server = serve(problems, delay=0.1)
    summary = run_pairs(problems, server, tmp_path / "pairs.jsonl", concurrency=3)
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
    with JsonlStore(out, required=("id",)):  # as a first run holds it
        with pytest.raises(StoreError, match="another run"):
            run_pairs(problems, server, out)
    assert server.log == []


def test_unreachable_endpoint_fails_fast(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    # With max_retries=5 and a 0.2 s backoff, retrying to the end would sleep >= 0.2 * (1+2+4+8+16) / 2 = 3.1 s.
    config = teacher.TeacherConfig(
        base_url=url, model=MODEL, out=str(tmp_path / "pairs.jsonl"), max_retries=5, backoff=0.2
    )
    start = time.monotonic()
    with pytest.raises(teacher.TeacherError, match=re.escape(f"cannot reach {url}")):
        teacher.build_pairs(make_problems(3), config, progress=False)
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
        while len(parsed_lines(out)) < 3 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)  # mid-run: requests are in flight
    finally:
        process.wait(timeout=10)
    before = [r["id"] for r in parsed_lines(out)]
    assert 3 <= len(before) < len(problems), process.stderr.read().decode()[-2000:]
    with open(out, "a") as handle:  # as if the kill had landed in the middle of a write
        handle.write('{"id": "q15", "prompt": "[q15] Tom')
    sent_before_restart = len(server.log)

    server.delay = 0.0
    finished = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"pairs: {len(before)} of {len(problems)} problems already done" in finished.stdout
    ids = [r["id"] for r in parsed_lines(out)]  # every line parses: the torn one is gone
    assert sorted(ids) == sorted(p.id for p in problems) and len(ids) == len(set(ids))
    asked_again = {r["id"] for r in server.log[sent_before_restart:]}
    assert not asked_again & set(before)  # finished problems are not asked again
