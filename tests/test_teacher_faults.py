"""`jaxpatience pairs` under faults: malformed replies, what a rerun asks again, unchanged rewrites, secrets, and
bad settings. The fake server and helpers are test_teacher.py's; every test here takes seconds at most.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path

import pytest
import test_teacher
from test_teacher import KEY, MODEL, closed_port, good_reply, make_problems, parsed_lines, run_pairs, write_problems

from jaxpatience import cli
from jaxpatience.teacher import run as teacher
from jaxpatience.teacher.run import side_paths

# test_teacher's fixtures, bound here by name so that pytest finds them (an import would read as unused).
serve = test_teacher.serve
no_proxies = test_teacher.no_proxies


def rejected_by_id(out: Path) -> dict[str, dict]:
    records = parsed_lines(side_paths(out)[0])
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == len(records), "one record per id"
    return by_id


def request_gaps(server: test_teacher.FakeTeacher, problem_id: str) -> list[float]:
    times = [r["t"] for r in server.requests_for(problem_id)]
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


# ---------------------------------------------------------------------------------------------------
# Malformed replies.

MALFORMED_SCRIPT = {
    ("q1", "concise"): ["html", "html_json"],  # a proxy's error page, with and without a JSON content type
    ("q2", "patient"): ["no_choices", "null"],  # JSON that is no completion; a message whose content is null
    ("q3", "concise"): ["empty"],  # a message whose text is ""
    ("q4", "concise"): ["html"] * 10,  # never a chat completion
    ("q5", "concise"): [("status", 502, {})] * 10,  # the 5xx it must be treated like
}


def test_malformed_replies_are_retried_like_a_5xx_then_dropped_as_transient(serve, tmp_path):
    problems = make_problems(6)
    server = serve(problems, MALFORMED_SCRIPT)
    out = tmp_path / "pairs.jsonl"
    backoff = 0.05
    summary = run_pairs(problems, server, out, max_retries=3, backoff=backoff, concurrency=6)

    assert sorted(r["id"] for r in parsed_lines(out)) == ["q0", "q1", "q2", "q3"]
    rejected = rejected_by_id(out)
    assert {k: (r["reason"], r["transient"]) for k, r in rejected.items()} == {
        "q4": ("malformed", True),
        "q5": ("http_502", True),
    }
    assert summary["failed"] == {"malformed": 1, "http_502": 1} and summary["dropped"] == {}
    assert summary["retries"] == {"malformed": 2 + 2 + 1 + 3, "http_502": 3}
    for problem_id in ("q4", "q5"):  # the same bounded schedule: 1 + max_retries attempts, backing off
        gaps = request_gaps(server, problem_id)
        assert len(gaps) == 3 and all(gap >= 0.5 * backoff * 2**k for k, gap in enumerate(gaps)), gaps
    # The reason says what came back, with the key the page quoted masked.
    assert "not JSON" in rejected["q4"]["detail"] and "<html>" in rejected["q4"]["detail"]
    assert "Bearer ***" in rejected["q4"]["detail"] and KEY not in rejected["q4"]["detail"]


def test_an_endpoint_that_never_sends_a_completion_stops_the_run(serve, tmp_path):
    problems = make_problems(3)
    server = serve(problems, {(p.id, "concise"): ["html"] * 10 for p in problems})
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(teacher.TeacherError, match="answered no request.*malformed.*OpenAI-compatible endpoint"):
        run_pairs(problems, server, out, max_retries=2, concurrency=1)
    assert len(server.log) == 3 and parsed_lines(side_paths(out)[0]) == []  # nothing dropped for good


# ---------------------------------------------------------------------------------------------------
# What a rerun asks: transient drops again, content drops never (unless retry_dropped); one record per id.

RERUN_SCRIPT = {
    ("q1", "concise"): ["wrong"],  # content: never asked again
    ("q2", "patient"): ["malformed"] * 2,  # transient
    ("q3", "concise"): [("status", 503, {})] * 2,  # transient
    ("q4", "concise"): [("slow", 0.6)] * 2,  # transient: slower than the 0.3 s timeout
    ("q5", "patient"): ["echo"],  # content: the rewrite is the concise text, re-wrapped
}


def test_rerun_asks_again_for_transient_drops_only(serve, tmp_path, capsys):
    problems = make_problems(6)
    server = serve(problems, RERUN_SCRIPT)
    out = tmp_path / "pairs.jsonl"
    # concurrency 1: q0 answers first, so the endpoint is known to work when the others fail
    settings = dict(max_retries=1, timeout=0.3, concurrency=1)
    first = run_pairs(problems, server, out, **settings)
    assert first["failed"] == {"malformed": 1, "http_503": 1, "timeout": 1}
    assert first["dropped"] == {"concise_wrong": 1, "identical": 1}
    assert "already done" not in capsys.readouterr().out  # a first run has nothing to resume

    identical = rejected_by_id(out)["q5"]  # kept for inspection, never as a pair
    assert (identical["reason"], identical["transient"]) == ("identical", False)
    assert identical["patient"].split() == identical["concise"].split() == good_reply(problems[5], "concise").split()

    server.script[("q3", "concise")] = [("status", 503, {})] * 2  # q3 fails again on the rerun
    sent = len(server.log)
    second = run_pairs(problems, server, out, **settings)
    printed = capsys.readouterr().out
    assert "pairs: 1 of 6 problems already done, 3 transient drops asked again, 2 dropped for their content" in printed
    assert {r["id"] for r in server.log[sent:]} == {"q2", "q3", "q4"}
    assert (second["written"], second["asked_again"], second["failed"]) == (2, 3, {"http_503": 1})
    assert sorted(rejected_by_id(out)) == ["q1", "q3", "q5"]  # q3's new record replaced its old one

    sent = len(server.log)
    run_pairs(problems, server, out, **settings)
    assert "3 of 6 problems already done, 1 transient drops asked again" in capsys.readouterr().out
    assert {r["id"] for r in server.log[sent:]} == {"q3"} and sorted(rejected_by_id(out)) == ["q1", "q5"]

    run_pairs(problems, server, out, **settings, retry_dropped=True)
    assert "4 of 6 problems already done, 2 earlier drops asked again." in capsys.readouterr().out
    pairs = parsed_lines(out)
    assert sorted(r["id"] for r in pairs) == [p.id for p in problems] and rejected_by_id(out) == {}
    assert all(r["chosen"].split() != r["rejected"].split() for r in pairs)


def test_plan_of_a_rerun_reads_older_rejected_files():
    """A pure function of the records: files of earlier versions (no `transient` flag, "malformed" was their
    only transient reason), several records of one id, a record of an id that has its pair since."""
    problems = make_problems(6)
    pairs = [{"id": "q0"}, {"id": "q5"}]
    rejects = [
        {"id": "q1", "reason": "malformed"},  # old file: transient
        {"id": "q2", "reason": "concise_wrong"},  # old file: content
        {"id": "q3", "reason": "http_429", "transient": True},
        {"id": "q3", "reason": "patient_wrong", "transient": False},  # the latest record of q3 wins
        {"id": "q5", "reason": "timeout", "transient": True},  # has its pair since (an old --retry-dropped)
        {"id": "q9", "reason": "timeout", "transient": True},  # beyond --limit: kept as it is
    ]
    plan = teacher.plan_run(problems, pairs, rejects, retry_dropped=False)
    assert [p.id for p in plan.todo] == ["q4", "q1"]  # never asked first, then asked again
    assert (plan.done, plan.asked_again, plan.skipped) == (2, 1, 2)
    assert [(r["id"], r["reason"]) for r in plan.rejects] == [
        ("q2", "concise_wrong"),
        ("q3", "patient_wrong"),
        ("q9", "timeout"),
    ]
    everything = teacher.plan_run(problems, pairs, rejects, retry_dropped=True)
    assert [p.id for p in everything.todo] == ["q4", "q1", "q2", "q3"] and everything.skipped == 0
    assert [r["id"] for r in everything.rejects] == ["q9"]
    assert teacher.resume_line(teacher.plan_run(problems, [], [], False), 6, False) == ""


# ---------------------------------------------------------------------------------------------------
# A weak or hostile teacher: inverted and degenerate pairs, replies that drip, err, hold parts, lie about usage.

WEAK_SCRIPT = {
    ("q1", "concise"): ["placeholder"],  # the right number, then the template's "The answer is N."
    ("q2", "patient"): ["short"],  # "The answer is 1009.": shorter than the concise derivation
    ("q3", "concise"): ["no_marker"],  # the right number, but no final answer
    ("q4", "patient"): ["placeholder"],
}


def test_a_weak_teacher_never_yields_an_inverted_or_placeholder_pair(serve, tmp_path):
    problems = make_problems(5)
    server = serve(problems, WEAK_SCRIPT)
    out = tmp_path / "pairs.jsonl"
    summary = run_pairs(problems, server, out, concurrency=1)
    assert [r["id"] for r in parsed_lines(out)] == ["q0"]
    assert summary["dropped"] == {
        "concise_placeholder": 1,
        "not_more_detailed": 1,
        "concise_no_answer": 1,
        "patient_placeholder": 1,
    }
    rejected = rejected_by_id(out)
    short = len(f"The answer is {problems[2].answer}.")
    assert f"({short} characters, 1 steps) is not longer" in rejected["q2"]["detail"]
    assert "'answer is N'" in rejected["q1"]["detail"] and rejected["q1"]["transient"] is False
    for record in parsed_lines(out):
        assert len(record["chosen"]) > len(record["rejected"]) and "answer is N" not in record["chosen"]


HOSTILE_SCRIPT = {
    ("q1", "concise"): ["error_200"],  # once, then fine
    ("q2", "concise"): ["error_200"] * 5,  # every time: failed, with the server's own message
    ("q3", "concise"): ["parts"],  # content as a list of text parts: valid
    ("q4", "patient"): ["bad_usage"],  # nonsense usage: the answer is kept
    ("q5", "concise"): ["huge"],  # a 2 MB answer: refused while it arrives
    ("q6", "concise"): ["drip"] * 5,  # a byte every 0.1 s: cut at the 1 s timeout, each attempt
}


def test_a_hostile_teacher_is_bounded_and_quoted(serve, tmp_path):
    problems = make_problems(7)
    server = serve(problems, HOSTILE_SCRIPT)
    out = tmp_path / "pairs.jsonl"
    start = time.monotonic()
    summary = run_pairs(problems, server, out, concurrency=1, max_retries=1, timeout=1.0, max_tokens=64)
    elapsed = time.monotonic() - start
    assert sorted(r["id"] for r in parsed_lines(out)) == ["q0", "q1", "q3", "q4"]
    assert summary["failed"] == {"malformed": 1, "timeout": 1} and summary["dropped"] == {"oversized": 1}
    rejected = rejected_by_id(out)
    assert "the server answered with an error: the model is overloaded, try later" in rejected["q2"]["detail"]
    assert "longer than 1,048,576 bytes" in rejected["q5"]["detail"]
    # Two attempts of q6, each cut at 1 s (a whole drip would take over 30 s), and the rest quick.
    assert len(server.requests_for("q6")) == 2 and elapsed < 8, elapsed
    assert {r["max_tokens"] for r in server.log} == {64}  # the cap is sent with every request
    (q3,) = [r for r in parsed_lines(out) if r["id"] == "q3"]
    assert q3["rejected"] == test_teacher.good_reply(problems[3], "concise")  # the parts joined back


def test_a_rerun_refuses_records_made_for_another_question(serve, tmp_path):
    problems = make_problems(3)
    server = serve(problems, {("q2", "concise"): ["wrong"]})
    out = tmp_path / "pairs.jsonl"
    run_pairs(problems, server, out)
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    sent = len(server.log)
    for changed in (
        [dataclasses.replace(problems[0], question=problems[0].question + " Twice?"), *problems[1:]],  # a pair
        [*problems[:2], dataclasses.replace(problems[2], answer="7")],  # a rejected record's gold answer
    ):
        with pytest.raises(teacher.TeacherError, match=r"was made for another problem 'q[02]' \(its (question|gold)"):
            run_pairs(changed, server, out)
    assert len(server.log) == sent and {path: path.read_bytes() for path in tmp_path.iterdir()} == before


# ---------------------------------------------------------------------------------------------------
# Secrets.

SECRET = "sk-live-Recognisable0123456789abcdef"


def test_api_key_never_appears_in_files_or_output(serve, tmp_path, capsys, caplog, monkeypatch):
    """Runs that succeed, fail transiently, are refused and cannot connect, against a server that quotes the
    Authorization header in its error bodies and pages; then every byte written or printed is searched."""
    caplog.set_level(logging.DEBUG)  # the openai and httpx loggers too
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    problems = make_problems(4)
    script = {
        ("q1", "concise"): [("status", 503, {})] * 10,
        ("q2", "concise"): ["html"] * 10,
        ("q3", "concise"): ["wrong"],
    }
    server = serve(problems, script, key=SECRET)
    refusing = serve(problems, key="sk-some-other-key")
    problems_file = str(write_problems(tmp_path / "p.jsonl", problems))

    def pairs(url: str, out: str, *extra: str) -> int:
        argv = ["pairs", "--problems", problems_file, "--out", str(tmp_path / out), "--base-url", url]
        return cli.main([*argv, "--model", MODEL, "--concurrency", "1", *extra, "max_retries=1", "backoff=0.01"])

    assert pairs(server.url, "run/pairs.jsonl", "--no-progress") == 1  # q1, q2 failed after retries
    # Asked again, failed again: nothing answers this run, so it stops (a message quoting the server's body)
    assert pairs(server.url, "run/pairs.jsonl", "--no-progress") == 2
    assert pairs(server.url, "run/pairs.jsonl", "--dry-run") == 0
    assert pairs(refusing.url, "refused/pairs.jsonl", "--no-progress") == 2
    assert pairs(f"http://127.0.0.1:{closed_port()}/v1", "down/pairs.jsonl", "--no-progress") == 2
    printed = capsys.readouterr()
    assert "refused the API key (HTTP 401: scripted 401 for Bearer ***)" in printed.err  # the echo was masked
    assert (
        "answered no request (http_503 2 times in a row: Error code: 503 - scripted 503 for Bearer ***)" in printed.err
    )
    assert sorted(rejected_by_id(tmp_path / "run" / "pairs.jsonl")) == ["q3"]  # q1, q2: asked again next time

    written = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert len(written) >= 6  # pairs, rejected and summary files of the runs
    leaks = [str(path) for path, data in written.items() if SECRET.encode() in data]
    leaks += [name for name, text in (("stdout", printed.out), ("stderr", printed.err)) if SECRET in text]
    leaks += ["log"] if SECRET in caplog.text else []
    assert not leaks, leaks


def test_secrets_in_a_url_are_masked():
    url = "https://user:hunter2-pass@gateway.example/v1?api-key=abcdef123&region=eu"
    assert teacher.public_url(url) == "https://user:***@gateway.example/v1?api-key=***&region=eu"
    assert teacher.redact("key EMPTY abc", ["EMPTY", "abc"]) == "key EMPTY abc"  # placeholders, too short to mask
    with pytest.raises(ValueError, match="base_url must be an http") as refused:
        teacher.TeacherConfig(base_url="ftp://user:hunter2-pass@gateway.example/v1")
    assert "hunter2-pass" not in str(refused.value)


# ---------------------------------------------------------------------------------------------------
# Bad settings: one sentence naming the key or file, exit status 2, nothing written.


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["concurrency=-1"], "concurrency must be an integer >= 1, not -1"),
        (["--max-retries", "-1"], "max_retries must be an integer >= 0, not -1"),
        (["--limit", "0"], "limit must be an integer >= 1 or null, not 0"),
        (["timeout=.nan"], "timeout must be a finite number, not nan"),
        (["backoff=.inf"], "backoff must be a finite number, not inf"),
        (["--temperature", "-0.5"], "temperature must be a number >= 0 or null, not -0.5"),
        (["--price-in", "-1"], "price_in must be a number >= 0 or null"),
        (["--max-tokens", "0"], "max_tokens must be an integer >= 1 or null, not 0"),
        (["retry_dropped=maybe"], "retry_dropped must be true or false, not 'maybe'"),
        (["--base-url", "localhost:8000/v1"], "base_url must be an http:// or https:// URL"),
        (["--base-url", "", "env:OPENAI_BASE_URL=localhost:8000"], "OPENAI_BASE_URL must be an http:// or https://"),
        ([f"api_key={SECRET}"], "unknown key 'api_key'"),
        (["--prompts", "{tmp}/missing.yaml"], "prompts file {tmp}/missing.yaml does not exist"),
        (["--prompts", "{tmp}/folder"], "prompts file {tmp}/folder is a directory"),
        (["--prompts", "{tmp}/latin1.yaml"], "prompts file {tmp}/latin1.yaml, line 1, is not UTF-8 text (byte 0xe9)"),
        (["--problems", "{tmp}/folder"], "problem file {tmp}/folder is a"),  # problems.load_file's check
        (["--problems", "{tmp}/empty.jsonl"], "problems {tmp}/empty.jsonl holds no problems"),
        (["--out", "{tmp}/folder"], "out {tmp}/folder: {tmp}/folder is a directory"),
        (["--out", "{tmp}/plain/pairs.jsonl"], "out {tmp}/plain/pairs.jsonl: {tmp}/plain is a file, not a directory"),
    ],
)
def test_bad_setting_is_one_sentence(tmp_path, capsys, monkeypatch, extra, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "plain").write_text("a file\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "latin1.yaml").write_bytes(
        "concise: 'Solve {question} caf\xe9'\npatient: '{concise}'\n".encode("latin-1")
    )
    problems = str(write_problems(tmp_path / "p.jsonl", make_problems(2)))
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    argv = ["pairs", "--problems", problems, "--out", str(tmp_path / "out" / "pairs.jsonl"), "--model", MODEL]
    argv += ["--base-url", f"http://127.0.0.1:{closed_port()}/v1", "--no-progress"]  # nothing may reach it
    for item in extra:
        if item.startswith("env:"):
            monkeypatch.setenv(*item[4:].split("=", 1))
        else:
            argv.append(item.replace("{tmp}", str(tmp_path)))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("{tmp}", str(tmp_path)) in err[0], err
    assert "Traceback" not in err[0] and SECRET not in err[0]
    assert re.fullmatch(r"jaxpatience: error: [^\n]+[.?]", err[0]), err[0]  # one sentence
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
