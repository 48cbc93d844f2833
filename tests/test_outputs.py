"""Whose output is this (durability/outputs.py): every command refuses a folder or file that is not its own (another
command's, someone's files, one of its inputs, an empty path, a FIFO) in one sentence, exit 2, writing nothing; its
own folders, marked or written before markers existed, are reused. Also irpo's checks at the door, its early stop,
and `train --extend` (docs/RELIABILITY.md, section "Whose output").
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
from pathlib import Path

import pytest

from jaxpatience.cli import main
from jaxpatience.config import ConfigError
from jaxpatience.durability import outputs

PAIR = {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5. The answer is 5.", "rejected": "The answer is 6."}
TRAIN_CONFIG = {"model": "ck", "out_dir": "x", "train": {}, "data": {}}  # the keys a training run's config.json has


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def _folder(path: Path, files: dict[str, object]) -> Path:
    path.mkdir()
    for name, content in files.items():
        (path / name).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def _marker(command: str, kind: str) -> dict:
    return {outputs.MARKER: {"command": command, "kind": kind}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny checkpoint `ck`, input files, and folders that are not a given command's output."""
    from jaxpatience.model.weights import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("outputs")
    make_tiny_checkpoint(root / "ck")
    _jsonl(root / "pairs.jsonl", [dict(PAIR, prompt=f"What is {i} + 3?") for i in range(8)])
    _jsonl(root / "problems.jsonl", [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(4)])
    _folder(root / "mine", {"config.json": {"lr": 0.1}, "metrics.jsonl": '{"step": 1}\n'})  # the user's own files
    _folder(root / "trainrun", {**_marker("train", "run"), "summary.json": {"steps": 2}})
    _folder(root / "oldtrain", {"config.json": TRAIN_CONFIG, "metrics.jsonl": '{"step": 1}\n'})  # before markers
    _folder(root / "irporun", {**_marker("irpo", "run"), "config.json": {"iterations": 1}})
    _folder(root / "datadir", {"pairs.jsonl": json.dumps(PAIR) + "\n"})
    _jsonl(root / "notes.jsonl", [{"note": "my own records"}])
    os.mkfifo(root / "fifo")
    return root


TRAIN = "train model=ck data.path=pairs.jsonl"
EVAL = "eval --model ck --dataset problems.jsonl"
IRPO = "irpo model=ck train_problems=problems.jsonl eval_problems=problems.jsonl"
PAIRS = "pairs --problems problems.jsonl --model m --base-url http://127.0.0.1:{port}/v1 --no-progress"

# id -> (command line, a fragment of its one-sentence refusal)
CASES = {
    "out-train-empty": (f"{TRAIN} out_dir=", "train: out_dir is empty"),
    "out-train-foreign": (f"{TRAIN} out_dir=mine", "out_dir mine is a non-empty folder holding files no jaxpatience"),
    "out-train-other-kind": (f"{TRAIN} out_dir=irporun", "out_dir irporun holds the output of jaxpatience irpo (run)"),
    "out-train-is-model": (f"{TRAIN} out_dir=ck", "out_dir ck is also model, an input"),
    "out-train-holds-data": (f"{TRAIN} out_dir=datadir data.path=datadir/pairs.jsonl", "holds data.path"),
    "out-train-fifo": (f"{TRAIN} out_dir=fifo", "out_dir fifo is a special file (a FIFO"),
    "out-eval-train-run": (f"{EVAL} --out trainrun", "eval: out_dir trainrun holds the output of jaxpatience train"),
    "out-eval-old-train-run": (
        f"{EVAL} --out oldtrain",
        "holding the output of jaxpatience train",
    ),
    "out-eval-foreign": (f"{EVAL} --out mine", "out_dir mine is a non-empty folder"),
    "out-eval-is-model": (f"{EVAL} --out ck", "eval: out_dir ck is also model, an input"),
    "out-eval-inside-model": (f"{EVAL} --out ck/eval", "lies inside model"),
    "out-demo-train-run": ("demo --small --out trainrun", "demo: --out trainrun holds the output of jaxpatience train"),
    "out-demo-overwrite-foreign": ("demo --small --out mine --overwrite", "demo: --out mine is a non-empty folder"),
    "out-demo-empty": ("demo --small --out=", "demo: --out is empty"),
    "out-tiny-overwrite-run": (
        "tiny --out trainrun --overwrite",
        "trainrun holds the output of jaxpatience train",
    ),
    "out-tiny-overwrite-foreign": ("tiny --out mine --overwrite", "tiny: --out mine is a non-empty folder"),
    "out-tiny-empty": ("tiny --out=", "tiny: --out is empty"),
    "out-irpo-train-run": (f"{IRPO} out_dir=trainrun", "irpo: out_dir trainrun holds the output of jaxpatience train"),
    "out-irpo-holds-its-model": (f"{IRPO} out_dir=.", "holds model"),
    "out-pairs-is-problems": (f"{PAIRS} --out problems.jsonl", "pairs: --out problems.jsonl is also --problems"),
    "out-pairs-foreign": (f"{PAIRS} --out notes.jsonl", "--out notes.jsonl is a file with other records"),
    "out-pairs-fifo": (f"{PAIRS} --out fifo", "pairs: --out fifo is a FIFO, not a file"),
    "irpo-training-out-dir": (f"{IRPO} out_dir=new training.out_dir=elsewhere", "irpo: training.out_dir is irpo's"),
    "irpo-generation-batch-size": (f"{IRPO} out_dir=new generation_batch_size=0", "irpo: generation_batch_size"),
    "irpo-max-new-tokens": (f"{IRPO} out_dir=new sampling.max_new_tokens=100000", "lower sampling.max_new_tokens"),
}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _state(root: Path) -> dict[str, str]:
    """Every path under `root` with its size and modification time: a refused run must change none of them."""
    return {
        str(path.relative_to(root)): f"{path.lstat().st_size}:{path.lstat().st_mtime_ns}" for path in root.rglob("*")
    }


@pytest.mark.parametrize("case", list(CASES))
def test_an_output_that_is_not_the_commands_own_is_refused(case, workspace, monkeypatch, capsys):
    line, fragment = CASES[case]
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("JAXPATIENCE_DEBUG", "0")
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    before = _state(workspace)
    try:
        status = main(shlex.split(line.format(port=_closed_port())))
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    lines = [text for text in err.splitlines() if text.strip() and "warning" not in text]
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and fragment in lines[0], err
    assert re.fullmatch(r"jaxpatience: error: [^\n]+\.", lines[0]), lines[0]  # one sentence
    assert _state(workspace) == before, f"{case} changed {set(_state(workspace).items()) ^ set(before.items())}"


# ---------------------------------------------------------------------------------------------------
# The mechanism itself: markers, folders made before markers, files identified by their records.


def test_a_claimed_folder_is_marked_on_first_write_and_then_reused(tmp_path):
    output = outputs.claim_folder(tmp_path / "run", "train", "run")
    assert not (tmp_path / "run").exists()  # the claim writes nothing
    output.mark()
    assert json.loads((tmp_path / "run" / outputs.MARKER).read_text()) == {"command": "train", "kind": "run"}
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    outputs.claim_folder(tmp_path / "run", "train", "run")  # its own: accepted
    with pytest.raises(ConfigError, match=r"holds the output of jaxpatience train \(run\), not of eval"):
        outputs.claim_folder(tmp_path / "run", "eval", "eval")
    outputs.claim_folder(tmp_path / "empty", "eval", "eval").mark()
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / outputs.MARKER).write_text("{")
    with pytest.raises(ConfigError, match="its marker is damaged"):
        outputs.claim_folder(tmp_path / "damaged", "train", "run")


@pytest.mark.parametrize(
    ("command", "kind", "files"),
    [
        ("train", "run", {"config.json": TRAIN_CONFIG, "metrics.jsonl": "", "summary.json": {}}),
        ("train", "run", {"checkpoints": None}),  # killed before its first config.json
        ("eval", "eval", {"generations.jsonl": "", "run.json": {}, "summary.json": {}}),
        ("irpo", "run", {"config.json": {"model": "m", "iterations": 2, "training": {}, "sampling": {}}}),
        ("demo", "run", {"demo_config.json": {"seed": 0, "sft": {}}, "timings.json": {}}),
        ("lm-eval", "results", {"results.json": {}, "samples_arc_easy.jsonl": ""}),
        (
            "tiny",
            "checkpoint",
            {
                "config.json": {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2},
                "model.safetensors": "",
            },
        ),  # fmt: skip
    ],
)
def test_a_folder_written_before_markers_is_its_commands_own(tmp_path, command, kind, files):
    folder = tmp_path / "old"
    folder.mkdir()
    for name, content in files.items():
        if content is None:
            (folder / name).mkdir()
        else:
            (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    outputs.claim_folder(folder, command, kind)  # accepted: an existing user's run resumes
    others = [owner for owner in outputs.LEGACY if owner != (command, kind)]
    for other_command, other_kind in others:  # and no other command takes it for its own
        with pytest.raises(ConfigError, match=rf"holding the output of jaxpatience {command} \({kind}\)"):
            outputs.claim_folder(folder, other_command, other_kind)


def test_a_jsonl_output_is_identified_by_its_records(tmp_path):
    keys = ("id", "prompt", "chosen", "rejected")
    ours = _jsonl(tmp_path / "pairs.jsonl", [dict(PAIR, id="a")])
    assert outputs.claim_file(ours, "pairs", record_keys=keys) == ours
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"id": "a", "prompt": "What is')  # a first append cut short: the store cuts it off
    outputs.claim_file(torn, "pairs", record_keys=keys)
    (tmp_path / "empty.jsonl").write_text("")
    outputs.claim_file(tmp_path / "empty.jsonl", "pairs", record_keys=keys)
    outputs.claim_file(tmp_path / "new.jsonl", "pairs", record_keys=keys)
    problems = _jsonl(tmp_path / "problems.jsonl", [{"id": "a", "question": "q", "answer": "1"}])
    with pytest.raises(ConfigError, match="is a file with other records"):
        outputs.claim_file(problems, "pairs", record_keys=keys)
    with pytest.raises(ConfigError, match="is also --problems, an input"):
        outputs.claim_file(ours, "pairs", record_keys=keys, inputs={"--problems": str(ours)})


# ---------------------------------------------------------------------------------------------------
# irpo: its own default data.max_length fitted to the model, and a loop that finds no pairs says so.


def test_irpo_fits_its_default_max_length_to_the_model_and_keeps_a_users(tmp_path, capsys):
    from jaxpatience.recipes.irpo import _fitted_data, load_irpo_config

    base = ["model=m", "train_problems=p.jsonl", "eval_problems=p.jsonl"]
    default = load_irpo_config(None, base)
    assert _fitted_data(default, 256, tmp_path / "train").max_length == 256
    assert "training.data.max_length=256, the model's context" in capsys.readouterr().out
    assert _fitted_data(default, 4096, tmp_path / "train").max_length == default.training.data.max_length
    users = load_irpo_config(None, [*base, "training.data.max_length=512"])
    assert _fitted_data(users, 256, tmp_path / "train").max_length == 512  # the user's choice: train warns
    _folder(tmp_path / "train", {"config.json": {"data": {"max_length": 1024}}})  # a run begun before: kept
    assert _fitted_data(default, 256, tmp_path / "train").max_length == 1024


def test_irpo_with_no_pairs_stops_and_says_why(workspace, tmp_path, capsys):
    """A random tiny model gets nothing right: iteration 1 has no pairs; the run says where and why it stopped,
    on stderr and in summary.json, and a rerun stops alike."""
    args = [
        "irpo", "--no-progress", f"model={workspace / 'ck'}", f"train_problems={workspace / 'problems.jsonl'}",
        f"eval_problems={workspace / 'problems.jsonl'}", f"out_dir={tmp_path / 'irpo'}", "train_limit=2",
        "eval_limit=2", "sampling.num_samples=2", "sampling.max_new_tokens=4", "generation_batch_size=2",
    ]  # fmt: skip
    for _ in range(2):
        assert main(args) == 0
        err = capsys.readouterr().err
        assert "stopped early: iteration 1 of 2 made 0 pairs, fewer than one training batch" in err, err
        summary = json.loads((tmp_path / "irpo" / "summary.json").read_text())
        assert summary["stopped"]["iteration"] == 1 and summary["stopped"]["pairs"] == 0
        assert [row["iteration"] for row in summary["iterations"]] == [0]
    marker = json.loads((tmp_path / "irpo" / outputs.MARKER).read_text())
    assert marker == {"command": "irpo", "kind": "run"}
    assert json.loads((tmp_path / "irpo" / "base_eval" / outputs.MARKER).read_text())["command"] == "eval"


# ---------------------------------------------------------------------------------------------------
# train: a run made before markers resumes; a finished run is extended only when asked.


def test_train_resumes_an_unmarked_run_and_extends_a_finished_one(workspace, tmp_path, capsys):
    from jaxpatience.durability.metrics import read_metrics

    out = tmp_path / "run"
    args = ["train", "--no-progress", f"model={workspace / 'ck'}", f"data.path={workspace / 'pairs.jsonl'}",
            f"out_dir={out}", "train.batch_size=4", "train.lora.rank=4", "data.max_length=64", "log_every=1",
            "train.optimizer.warmup_steps=1"]  # fmt: skip
    assert main([*args, "train.max_steps=2"]) == 0
    assert json.loads((out / outputs.MARKER).read_text()) == {"command": "train", "kind": "run"}
    (out / outputs.MARKER).unlink()  # as a run made before markers existed: recognised by its files below
    capsys.readouterr()
    assert main([*args, "train.max_steps=3"]) == 2  # a longer run is not a silent resume
    err = capsys.readouterr().err
    assert "differs in: train.max_steps" in err and "add --extend" in err, err
    assert main([*args, "train.max_steps=3", "--extend"]) == 0
    assert (out / outputs.MARKER).is_file()  # the unmarked run resumed, and is marked now
    said = capsys.readouterr().out
    assert "resuming from step 2 of 3" in said and "learning-rate schedule is recomputed for 3 steps" in said
    assert [record["step"] for record in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert main([*args, "train.max_steps=2", "--extend"]) == 2  # shorter than the step reached
    assert "set train.max_steps (or epochs) past it" in capsys.readouterr().err
