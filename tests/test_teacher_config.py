"""`jaxpatience pairs` reads its config like every command: YAML < flags < key=value; bad settings are one line."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from jaxpatience import cli
from jaxpatience.teacher import run as teacher

MODEL = "teacher-test"

# Every setting, as the flags of earlier versions spell it (each differs from its default) ...
FLAGS = [
    *("--problems", "p.jsonl", "--out", "pairs.jsonl", "--base-url", "http://127.0.0.1:9/v1", "--model", MODEL),
    *("--concurrency", "3", "--limit", "7", "--max-retries", "2", "--timeout", "0.5", "--temperature", "0.7"),
    *("--prompts", "my_prompts.yaml", "--retry-dropped", "--price-in", "1.5", "--price-out", "6", "--backoff", "0.25"),
    *("--max-tokens", "512"),
]
# ... and as a config file.
SETTINGS = {
    "problems": "p.jsonl",
    "out": "pairs.jsonl",
    "base_url": "http://127.0.0.1:9/v1",
    "model": MODEL,
    "concurrency": 3,
    "limit": 7,
    "max_retries": 2,
    "timeout": 0.5,
    "temperature": 0.7,
    "prompts": "my_prompts.yaml",
    "retry_dropped": True,
    "price_in": 1.5,
    "price_out": 6.0,
    "backoff": 0.25,
    "max_tokens": 512,
}


def test_config_file_and_flags_give_the_same_config(tmp_path):
    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump(SETTINGS))
    from_flags, options = teacher.parse_command([*FLAGS, "--no-progress"])
    from_file, _ = teacher.parse_command(["--config", str(path)])
    assert from_flags == from_file == teacher.TeacherConfig(**SETTINGS)
    assert all(getattr(from_flags, f.name) != f.default for f in dataclasses.fields(teacher.TeacherConfig))
    assert options.no_progress and not options.dry_run  # command options, not config keys
    # A flag beats the file, and key=value beats both.
    config, _ = teacher.parse_command(["--config", str(path), "--model", "flag-model", "--limit", "2", "limit=4"])
    assert (config.model, config.limit, config.concurrency) == ("flag-model", 4, 3)
    assert not teacher.parse_command([*FLAGS, "retry_dropped=false"])[0].retry_dropped


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["colour=blue"], "unknown key 'colour'"),
        (["--config", "{yaml}"], "unknown key 'colour'"),
        (["--concurrency", "many"], "concurrency must be an integer, not 'many'"),
        (["--concurrency", "0"], "concurrency must be an integer >= 1, not 0"),
        (["model="], "model is not set"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, capsys, extra, message):
    path = tmp_path / "bad.yaml"
    path.write_text("colour: blue\n")
    argv = ["pairs", *FLAGS, *(item.replace("{yaml}", str(path)) for item in extra)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
