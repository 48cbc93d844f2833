"""Every user-facing command, given a bad input, says one sentence naming what is wrong, exits with status 2,
prints no traceback and writes nothing (docs/RELIABILITY.md lists these cases by their ids).

The commands run in this process (`cli.main`) inside one prepared folder: a tiny checkpoint, good and bad pair and
problem files. Each case compares the folder's listing before and after: a refused run must leave no trace.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpatience.cli import main

GOOD_PAIR = {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5. #### 5", "rejected": "#### 6"}


def _jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The folder every case runs in: `ck` (a tiny checkpoint) and the files the cases name."""
    from jaxpatience.model.weights import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("bad_inputs")
    make_tiny_checkpoint(root / "ck")
    pairs = [dict(GOOD_PAIR, prompt=f"What is {i} + 3?") for i in range(8)]
    _jsonl(root / "pairs.jsonl", pairs)
    _jsonl(root / "same.jsonl", [dict(p, rejected=p["chosen"]) for p in pairs])
    _jsonl(root / "norejected.jsonl", [{"prompt": "a", "chosen": "b"}])
    _jsonl(root / "emptychosen.jsonl", [{"prompt": "a", "chosen": "  ", "rejected": "b"}])
    _jsonl(root / "notobject.jsonl", [[1, 2]])
    _jsonl(root / "wizard.jsonl", [dict(GOOD_PAIR, prompt=[{"role": "wizard", "content": "What is 2 + 3?"}])])
    _jsonl(root / "userchosen.jsonl", [dict(GOOD_PAIR, chosen=[{"role": "user", "content": "5"}])])
    _jsonl(root / "twoprompts.jsonl", [dict(GOOD_PAIR, question="What is 2 + 4?")])
    (root / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    (root / "broken.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n{}\n')
    (root / "pairs.txt").write_text("prompt,chosen,rejected\n")
    (root / "adir").mkdir()
    (root / "afile").write_text("a file, not a folder\n")
    problems = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}. #### {i + 1}"} for i in range(4)]
    _jsonl(root / "problems.jsonl", problems)
    _jsonl(root / "blue.jsonl", [{"question": "What colour is the sky?", "answer": "It is blue. #### blue"}])
    _jsonl(root / "nomarker.jsonl", [{"question": "q?", "answer": "Add them up and you get the total of the apples."}])
    _jsonl(root / "nohash.jsonl", [{"question": "q?", "answer": "#### "}])
    _jsonl(root / "noquestion.jsonl", [{"answer": "#### 3"}])
    _jsonl(root / "dupids.jsonl", [{"id": "a", "question": "q", "answer": "#### 1"}] * 2)
    (root / "problems.json").write_text('{"question": "not a list"}')
    (root / "latin1.json").write_bytes(b'[{"question": "caf\xe9?", "answer": "#### 1"}]')
    (root / "brokenadapter").mkdir()
    (root / "brokenadapter" / "adapter_config.json").write_text('{"r": 8,')
    (root / "brokenadapter" / "adapter_model.safetensors").write_bytes(b"")
    (root / "brokenconfig").mkdir()
    (root / "brokenconfig" / "config.json").write_text('{"model_type": "qwen2",')
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "bad.yaml").write_text("train: [unclosed\n")
    (root / "typo.yaml").write_text("train:\n  mx_steps: 3\n")
    (root / "inf.yaml").write_text("train:\n  optimizer:\n    learning_rate: .inf\n")
    return root


TRAIN = "train model=ck data.path=pairs.jsonl out_dir=out"
EVAL = "eval --model ck --dataset problems.jsonl --out out"
PLAN = "plan --model tiny --batch-size 8 --seq-len 64"
IRPO = "irpo model=ck train_problems=problems.jsonl eval_problems=problems.jsonl out_dir=out"

# id -> (command line, a fragment the one-line error must hold)
CASES = {
    # train: settings (YAML, key=value, flags), files, data
    "train-type": (f"{TRAIN} train.loss.beta=abc", "command line: train.loss.beta must be a number, not 'abc'"),
    "train-float-steps": (f"{TRAIN} train.max_steps=2.5", "train.max_steps must be an integer, not 2.5"),
    "train-zero-steps": (f"{TRAIN} train.max_steps=0", "train.max_steps must be a positive integer, not 0"),
    "train-negative-beta": (f"{TRAIN} train.loss.beta=-1", "loss.beta must be positive"),
    "train-key-typo": (f"{TRAIN} trian.max_steps=3", "command line: unknown key 'trian'"),
    "train-yaml-typo": (f"{TRAIN} --config typo.yaml", "typo.yaml: unknown key 'train.mx_steps'"),
    "train-yaml-not-mapping": (f"{TRAIN} --config list.yaml", "must hold a mapping"),
    "train-yaml-broken": (f"{TRAIN} --config bad.yaml", "bad.yaml is not valid YAML"),
    "train-yaml-missing": (f"{TRAIN} --config missing.yaml", "config file missing.yaml does not exist"),
    "train-not-key-value": (f"{TRAIN} max_steps", "'max_steps' is not of the form key=value"),
    "train-lr": (f"{TRAIN} train.optimizer.learning_rate=-1", "optimizer.learning_rate must be >= 0"),
    "train-rank": (f"{TRAIN} train.lora.rank=0", "lora.rank must be a positive integer"),
    "train-dropout": (f"{TRAIN} train.lora.dropout=1.5", "lora.dropout must be in [0, 1)"),
    "train-decay": (f"{TRAIN} train.optimizer.decay=foo", "optimizer.decay must be cosine, linear or constant"),
    "train-remat": (f"{TRAIN} train.remat=all", "remat must be none, full, dots or lora"),
    "train-loss-type": (f"{TRAIN} train.loss.loss_type=kto", "loss.loss_type must be sigmoid, ipo or hinge"),
    "train-no-loss": (f"{TRAIN} train.loss.dpo_weight=0 train.loss.nll_weight=0", "not both 0"),
    "train-max-length": (f"{TRAIN} data.max_length=1", "data.max_length must be at least 2"),
    "train-prompt-length": (f"{TRAIN} data.max_length=64 data.max_prompt_length=100", "max_prompt_length (100)"),
    "train-buckets": (f"{TRAIN} data.buckets=[0,64]", "data.buckets must be positive lengths in rising order"),
    "train-batch": (f"{TRAIN} train.batch_size=0", "batch_size (0) must be a positive multiple"),
    "train-micro-batches": (f"{TRAIN} train.batch_size=6 train.micro_batches=4", "multiple of micro_batches (4)"),
    "train-epochs": (f"{TRAIN} epochs=0", "epochs must be at least 1, not 0"),
    "train-keep": (f"{TRAIN} keep_checkpoints=-1", "keep_checkpoints must be 0 or more"),
    "train-every": (f"{TRAIN} checkpoint_every=0", "checkpoint_every must be at least 1"),
    "train-dtype": (f"{TRAIN} param_dtype=float64", "param_dtype must be float32, bfloat16 or float16"),
    "train-strategy": (f"{TRAIN} train.strategy=fsdp", "strategy must be gspmd or shard_map"),
    "train-report": (f"{TRAIN} report=[tensorbored]", "report: unknown tracker 'tensorbored'; choose from"),
    "train-mesh": (f"{TRAIN} train.mesh.data=16", "needs 16 devices"),
    "train-no-model": ("train data.path=pairs.jsonl out_dir=out", "model is not set"),
    "train-no-data": ("train model=ck out_dir=out", "data.path is not set"),
    "train-model-missing": (f"{TRAIN} model=missing", "missing does not exist"),
    "train-out-is-file": (f"{TRAIN} out_dir=afile", "out_dir afile is a file, not a folder"),
    "train-out-under-file": (f"{TRAIN} out_dir=afile/run", "lies under the file"),
    "train-data-missing": (f"{TRAIN} data.path=missing.jsonl", "missing.jsonl does not exist"),
    "train-data-folder": (f"{TRAIN} data.path=adir", "pairs file adir is a folder"),
    "train-data-suffix": (f"{TRAIN} data.path=pairs.txt", "unsupported pairs file"),
    "train-data-latin1": (f"{TRAIN} data.path=latin1.jsonl", "latin1.jsonl, line 1: not UTF-8 text"),
    "train-data-broken-line": (f"{TRAIN} data.path=broken.jsonl", "broken.jsonl, line 2: not valid JSON"),
    "train-data-not-object": (f"{TRAIN} data.path=notobject.jsonl", "line 1: expected a JSON object"),
    "train-data-no-rejected": (f"{TRAIN} data.path=norejected.jsonl", "line 1: the record has no 'rejected' field"),
    "train-data-empty-chosen": (f"{TRAIN} data.path=emptychosen.jsonl", "field 'chosen' must be a non-empty string"),
    "train-data-role": (f"{TRAIN} data.path=wizard.jsonl", "line 1: prompt[0] has role 'wizard'; a role is one of"),
    "train-data-chosen-role": (f"{TRAIN} data.path=userchosen.jsonl", "the last message of 'chosen' has role 'user'"),
    "train-data-ambiguous": (f"{TRAIN} data.path=twoprompts.jsonl", "both 'prompt' and 'question' with different"),
    "train-data-identical": (f"{TRAIN} data.path=same.jsonl", "has the same chosen and rejected text"),
    "train-data-too-few": (f"{TRAIN} train.batch_size=16", "8 pairs cannot fill one batch of 16"),
    # eval
    "eval-samples": (f"{EVAL} --samples 0", "sampling.num_samples must be a positive integer, not 0"),
    "eval-samples-type": (f"{EVAL} --samples two", "sampling.num_samples must be an integer, not 'two'"),
    "eval-greedy-samples": (f"{EVAL} --samples 4", "would be 4 identical greedy answers"),
    "eval-temperature": (f"{EVAL} --temperature -1", "temperature must be >= 0"),
    "eval-top-p": (f"{EVAL} --top-p 0", "top_p must be in (0, 1]"),
    "eval-max-new-tokens": (f"{EVAL} --max-new-tokens 0", "max_new_tokens must be a positive integer"),
    "eval-past-context": (f"{EVAL} --max-new-tokens 100000", "runs past the model's context"),
    "eval-limit": (f"{EVAL} --limit 0", "limit must be positive"),
    "eval-prompt-style": (f"{EVAL} --prompt-style chatty", "unknown prompt style 'chatty'"),
    "eval-metric": (f"{EVAL} --metric exact", "unknown metric 'exact'"),
    "eval-batch": (f"{EVAL} --batch-size 0", "generation_batch_size must be >= 1"),
    "eval-model-missing": (f"{EVAL} --model missing", "missing does not exist"),
    "eval-adapter-missing": (f"{EVAL} --adapter missing", "expected a PEFT adapter directory"),
    "eval-out-is-file": (f"{EVAL} --out afile", "out_dir afile is a file"),
    "eval-dataset-unknown": (f"{EVAL} --dataset gsm9k", "unknown dataset 'gsm9k'"),
    "eval-dataset-missing": (f"{EVAL} --dataset missing.jsonl", "problem file missing.jsonl does not exist"),
    "eval-dataset-folder": (f"{EVAL} --dataset adir", "problem file adir is a folder"),
    "eval-gold-word": (f"{EVAL} --dataset blue.jsonl", "blue.jsonl, line 1: the gold answer 'blue' is neither"),
    "eval-gold-prose": (f"{EVAL} --dataset nomarker.jsonl", "nomarker.jsonl, line 1: the gold answer"),
    "eval-gold-empty": (f"{EVAL} --dataset nohash.jsonl", "the answer has nothing after '####'"),
    "eval-no-question": (f"{EVAL} --dataset noquestion.jsonl", "missing or empty field question"),
    "eval-duplicate-ids": (f"{EVAL} --dataset dupids.jsonl", "id 'a' occurs twice"),
    "eval-json-not-list": (f"{EVAL} --dataset problems.json", "expected a JSON list of records"),
    "eval-json-latin1": (f"{EVAL} --dataset latin1.json", "latin1.json: not UTF-8 text"),
    "eval-adapter-broken": (f"{EVAL} --adapter brokenadapter", "adapter_config.json is not valid JSON"),
    "eval-mesh": (f"{EVAL} --mesh data=16", "needs 16 devices"),
    # irpo
    "irpo-iterations": (f"{IRPO} iterations=0", "irpo: iterations >= 1"),
    "irpo-greedy": (f"{IRPO} sampling.temperature=0", "sampling.temperature must be > 0"),
    "irpo-limit": (f"{IRPO} train_limit=0", "irpo: train_limit must be at least 1"),
    "irpo-no-model": ("irpo train_problems=problems.jsonl eval_problems=problems.jsonl", "irpo: model is not set"),
    "irpo-problems-missing": (f"{IRPO} train_problems=missing.jsonl", "problem file missing.jsonl does not exist"),
    "irpo-gold-word": (f"{IRPO} eval_problems=blue.jsonl", "the gold answer 'blue'"),
    "irpo-out-is-file": (f"{IRPO} out_dir=afile", "out_dir afile is a file"),
    "irpo-training-type": (f"{IRPO} training.train.batch_size=x", "training.train.batch_size must be an integer"),
    # demo, info, tiny, plan, serve
    "demo-out-is-file": ("demo --out afile", "--out afile is a file"),
    "demo-key-typo": ("demo --out out colour=1", "command line: unknown key 'colour'"),
    "demo-type": ("demo --out out sft.train.max_steps=many", "sft.train.max_steps must be an integer"),
    "info-missing": ("info missing", "missing does not exist"),
    "info-config-broken": ("info brokenconfig", "brokenconfig/config.json is not valid JSON"),
    "info-folder-without-checkpoint": ("info adir", "adir"),
    "tiny-out-is-file": ("tiny --out afile", "the output folder afile is a file"),
    "tiny-out-not-empty": ("tiny --out ck", "ck exists and is not empty"),
    "plan-model": ("plan --model gpt5 --batch-size 8 --seq-len 64", "gpt5"),
    "plan-target": ("plan --model tiny --batch-size 8 --seq-len 64 --target gpu:8", "gpu:8"),
    "plan-meshes": ("plan --model tiny --batch-size 8 --seq-len 64 --meshes data=x", "data=x"),
    "plan-meshes-twice": (f"{PLAN} --meshes data=2,data=4", "mesh 'data=2,data=4' names the data axis twice"),
    "plan-packed": (f"{PLAN} --packed medium", "--packed 'medium': expected short, patience, long or three"),
    "plan-json-folder": (f"{PLAN} --json adir", "--json adir is a folder; give a file name"),
    "plan-csv-no-folder": (f"{PLAN} --csv missing/plan.csv", "--csv missing/plan.csv: its folder missing does not"),
    "plan-png-under-file": (f"{PLAN} --png afile/plan.png", "its folder afile is a file, not a folder"),
    "plan-cache-dir-file": (f"{PLAN} --cache-dir afile/cache", "--cache-dir afile/cache lies under the file "),
    "serve-port": ("serve --model ck --port 70000", "port must be <= 65535"),
    "serve-slots": ("serve --model ck --slots 0", "slots must be >= 1"),
    "serve-model-missing": ("serve --model missing", "missing does not exist"),
    "serve-unknown-host": ("serve --model ck --host no-such-host.invalid", "host 'no-such-host.invalid' is not an"),
    "serve-host-not-here": ("serve --model ck --host 203.0.113.7", "cannot listen on 203.0.113.7:8000"),
    # numbers: finite (the loader, every float of every config), in range (each config), at the door
    "number-lr-inf": (f"{TRAIN} train.optimizer.learning_rate=inf", "learning_rate must be a finite number, not inf"),
    "number-lr-nan": (f"{TRAIN} train.optimizer.learning_rate=nan", "learning_rate must be a finite number, not nan"),
    "number-lr-yaml-inf": (f"{TRAIN} --config inf.yaml", "inf.yaml: train.optimizer.learning_rate must be a finite"),
    "number-beta-inf": (f"{TRAIN} train.loss.beta=-.inf", "train.loss.beta must be a finite number, not -inf"),
    "number-huge-int": (f"{TRAIN} train.max_steps=1{'0' * 30}", "train.max_steps must be an integer of at most 63"),
    "number-weight-decay": (f"{TRAIN} train.optimizer.weight_decay=-1", "optimizer.weight_decay must be >= 0"),
    "number-warmup": (
        f"{TRAIN} train.optimizer.warmup_steps=200",
        "warmup_steps (200) must not exceed",
    ),
    "number-lora-rank": (f"{TRAIN} train.lora.rank=65", "train.lora.rank (65) must not exceed the model's hidden size"),
    "number-train-seed": (f"{TRAIN} train.seed=-1", "train.seed must be >= 0 and <= 4294967295, not -1"),
    "number-stop-after": (f"{TRAIN} --stop-after 0", "argument --stop-after: must be positive, not 0"),
    "number-eval-seed": (f"{EVAL} --seed -1 --samples 2 --temperature 0.7", "sampling.seed must be >= 0"),
    "number-eval-temperature-nan": (f"{EVAL} --temperature nan", "sampling.temperature must be a finite number"),
    "number-irpo-seed": (f"{IRPO} sampling.seed=-1", "sampling.seed must be >= 0"),
    "number-irpo-lr": (f"{IRPO} training.train.optimizer.learning_rate=inf", "learning_rate must be a finite number"),
    "number-irpo-rank": (f"{IRPO} training.train.lora.rank=65", "training.train.lora.rank (65) must not exceed"),
    "number-plan-chip-spec": (
        f"{PLAN} --chip h100 --chip-spec hbm_bytes=-1",
        "--chip-spec hbm_bytes must be a pos",
    ),
    "number-plan-chip-spec-nan": (f"{PLAN} --chip h100 --chip-spec link_bw=nan", "--chip-spec link_bw must be a pos"),
    "number-plan-seq-len": ("plan --model tiny --batch-size 8 --seq-len 100000", "exceeds the model's 1024 positions"),
    "number-plan-prompt-len": (f"{PLAN} --job decode --prompt-len 0", "--prompt-len must be positive, not 0"),
}


def _listing(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_sentence_and_exit_2(case, workspace, monkeypatch, capsys):
    line, fragment = CASES[case]
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("JAXPATIENCE_DEBUG", "0")
    before = _listing(workspace)
    try:
        status = main(shlex.split(line))
    except SystemExit as exit_:  # argparse's own errors (a flag's kind) exit 2 with its usage line
        status = exit_.code
    err = capsys.readouterr().err
    lines = [text for text in err.splitlines() if text.strip() and "warning" not in text]
    if lines and lines[0].startswith("usage: "):  # argparse's refusal: its usage lines, then the one sentence
        lines = [text for text in lines if not text.startswith(("usage: ", " "))]
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and fragment in lines[0], err
    assert lines[0].startswith(("jaxpatience: error: ", "jaxpatience ")), err
    assert _listing(workspace) == before, f"{case} wrote {_listing(workspace) - before}"
    assert not os.environ.get("JAXPATIENCE_FAULT")


# JAX_PLATFORMS naming a backend this machine cannot start: JAX fails at its first device call (a RuntimeError of
# some 80 lines, or a bare AssertionError for cuda without a GPU); the command says so in one sentence.
PLATFORMS = {
    "platforms-tpu": ("tpu", "tpu"),
    "platforms-cuda": ("cuda", "cuda"),
    "platforms-bogus": ("bogus", "'bogus' is not a JAX backend"),
}


@pytest.mark.parametrize("case", list(PLATFORMS))
def test_a_backend_that_cannot_start_is_one_sentence_and_exit_2(case, tmp_path):
    from jaxpatience import sharding

    asked, fragment = PLATFORMS[case]
    if sharding._platform_problem(asked) is None:
        pytest.skip(f"this machine can start JAX's {asked} backend")
    env = {k: v for k, v in os.environ.items() if k != "JAXPATIENCE_DEBUG"} | {"JAX_PLATFORMS": asked}
    out = tmp_path / "tiny"
    done = subprocess.run([sys.executable, "-m", "jaxpatience", "tiny", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr
    assert last.startswith(f"jaxpatience: error: JAX_PLATFORMS={asked} asks for a JAX backend"), done.stderr
    assert fragment in last and "this machine can start: cpu" in last, done.stderr
    assert "Traceback" not in done.stderr and "Unable to initialize backend" not in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["info", "tiny"])
def test_info_and_tiny_help_describe_the_command(command, capsys):
    """`--help` of the commands cli.py parses itself has a description, not only a usage line."""
    from jaxpatience.cli import _parser

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    shown = capsys.readouterr().out
    description = _parser()._subparsers._group_actions[0].choices[command].description
    assert exit_.value.code == 0 and description and len(description) > 80
    assert " ".join(description.split()[:6]) in " ".join(shown.split())


@pytest.mark.parametrize("grace, ok", [("-5", False), ("1.5", False), ("0", True), ("30", True)])
def test_launch_stop_grace_is_a_whole_number_of_seconds(grace, ok, capsys):
    """scripts/tpu/launch.py runs where jaxpatience may not be installed: its own type refuses a bad --grace."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch", Path(__file__).parents[1] / "scripts" / "tpu" / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    argv = ["stop", "--tpu", "t", "--zone", "z", "--grace", grace, "--dry-run"]
    if ok:
        assert launch.parse_args(argv).grace == int(grace)
        return
    with pytest.raises(SystemExit) as exit_:
        launch.parse_args(argv)
    assert exit_.value.code == 2 and "argument --grace: must be" in capsys.readouterr().err
