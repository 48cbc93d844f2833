"""Issue 33, class 7 (configs, problem sources, dtypes, adapters): each bad input is one sentence naming the file,
key or tensor, exit status 2, no traceback and nothing written; valid but unusual input (two --config files, a
YAML merge key overriding a value) simply works. docs/RELIABILITY.md section 14 lists these cases.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpatience.cli import main
from jaxpatience.config import PRESETS, ConfigError, LoraConfig, RunConfig, command_parser, config_from_args
from jaxpatience.config_io import load_config
from jaxpatience.data.problems import ProblemsError, load_problems
from jaxpatience.model import lora
from jaxpatience.model.attention import attend
from jaxpatience.model.checkpoint_files import CheckpointError
from jaxpatience.model.qwen2 import Qwen2ForCausalLM
from jaxpatience.training.dtype_check import check_backend_runs

PAIR = {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5. #### 5", "rejected": "#### 6"}


def _jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def _adapter_of(config, out: Path, targets: str = LoraConfig().targets) -> Path:
    """A PEFT adapter made on a random model of `config` (B non-zero, so applying it changes the logits)."""
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(1))
    lora.apply_lora(model, LoraConfig(rank=4, targets=targets))
    for _, adapter in lora.adapters(model):
        adapter.lora_B.set_value(jnp.full(adapter.lora_B.get_value().shape, 0.01, jnp.float32))
    return lora.save_peft_adapter(model, LoraConfig(rank=4, targets=targets), out)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from jaxpatience.model.weights import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("bad_inputs_config")
    make_tiny_checkpoint(root / "ck")
    _jsonl(root / "pairs.jsonl", [dict(PAIR, prompt=f"What is {i} + 3?") for i in range(8)])
    _jsonl(root / "problems.jsonl", [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(4)])
    os.mkfifo(root / "fifo.yaml")
    (root / "folder.yaml").mkdir()
    (root / "twice.yaml").write_text("train:\n  max_steps: 3\n  batch_size: 2\n  max_steps: 30\n")
    (root / "steps.yaml").write_text("train:\n  max_steps: 3\n")
    (root / "typo.yaml").write_text("train:\n  mx_steps: 3\n")
    _adapter_of(PRESETS["tiny"].replace(num_hidden_layers=3), root / "adapter_3_layers")
    narrow = PRESETS["tiny"].replace(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    _adapter_of(narrow, root / "adapter_d32")
    return root


TRAIN = "train model=ck data.path=pairs.jsonl out_dir=out"
EVAL = "eval --model ck --dataset problems.jsonl --out out"

# id -> (command line, a fragment the one-line error must hold, environment changes)
CASES = {
    "config-fifo": (f"{TRAIN} --config fifo.yaml", "fifo.yaml is not a regular file (a FIFO", {}),
    "config-folder": (f"{TRAIN} --config folder.yaml", "config file folder.yaml is a folder, not a file", {}),
    "config-key-twice": (f"{TRAIN} --config twice.yaml", "key 'max_steps' is written twice (lines 2 and 4)", {}),
    "config-second-file": (f"{TRAIN} --config steps.yaml --config typo.yaml", "typo.yaml: unknown key 'train.mx_", {}),
    "eval-split-local-file": (f"{EVAL} --split train", "split 'train' names a part of a hub dataset", {}),
    "eval-hub-unreachable": (
        "eval --model ck --dataset gsm8k --out out",
        "the Hugging Face hub is out of reach (127.0.0.1:9",
        {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None},
    ),
    "train-float16-cpu": (f"{TRAIN} param_dtype=float16", "param_dtype=float16 cannot run on this machine's cpu", {}),
    "eval-adapter-layers": (
        f"{EVAL} --adapter adapter_3_layers",
        "which the model lacks (it has 2 layers); the adapter was made for another base model",
        {},
    ),
    "eval-adapter-shapes": (f"{EVAL} --adapter adapter_d32", "the model and r=4 imply (64, 4); the adapter was", {}),
}


def _xla_refuses_float16_attention() -> bool:
    q = jnp.zeros((1, 4, 2, 8), jnp.float16)
    try:
        jax.jit(lambda q: attend(q, q[:, :, :1], q[:, :, :1], jnp.ones((1, 4, 4), bool), "xla")).lower(q).compile()
    except Exception:
        return True
    return False


def _listing(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_config_problem_source_dtype_or_adapter_is_one_sentence(case, workspace, monkeypatch, capsys):
    line, fragment, env = CASES[case]
    if case == "train-float16-cpu" and not (jax.default_backend() == "cpu" and _xla_refuses_float16_attention()):
        pytest.skip("this backend runs float16 attention")
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("JAXPATIENCE_DEBUG", "0")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    before = _listing(workspace)
    started = time.perf_counter()
    status = main(shlex.split(line))
    err = capsys.readouterr().err
    lines = [text for text in err.splitlines() if text.strip() and "warning" not in text]
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("jaxpatience: error: ") and fragment in lines[0], err
    assert _listing(workspace) == before, f"{case} wrote {_listing(workspace) - before}"
    if case == "eval-hub-unreachable":  # found out at once, not after `datasets`' retries (about 26 s)
        assert time.perf_counter() - started < 15


def test_offline_variable_is_one_sentence_without_retries(tmp_path):
    """HF_HUB_OFFLINE=1 and no copy in the cache: `datasets` refuses at once, without its retries (about 26 s
    offline before); the sentence says what to do. A fresh process, as `datasets` reads the variable on import."""
    env = {k: v for k, v in os.environ.items() if k != "JAXPATIENCE_DEBUG"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    script = "from jaxpatience.data.problems import load_problems; load_problems('gsm8k')"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("jaxpatience.data.problems.ProblemsError: "), done.stderr
    assert "could not load 'openai/gsm8k' (split 'test') with HF_HUB_OFFLINE=1 set and no copy in the" in last
    assert "pass --dataset path/to/gsm8k_test.jsonl" in last
    assert elapsed < 20, f"{elapsed:.1f} s: retried?"


def test_two_config_files_are_laid_over_each_other_in_order(tmp_path):
    """`--config a --config b`: both count, b's keys over a's (as layered compose files), key=value over both."""
    (tmp_path / "a.yaml").write_text("train:\n  max_steps: 3\n  batch_size: 2\n")
    (tmp_path / "b.yaml").write_text("train:\n  max_steps: 5\n")
    parser = command_parser("test", "test")

    def config(line: str) -> RunConfig:
        return config_from_args(RunConfig, parser.parse_args(shlex.split(line)))

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert (config(f"--config {a} --config {b}").train.max_steps, config(f"--config {a}").train.batch_size) == (5, 2)
    assert config(f"--config {a} --config {b}").train.batch_size == 2  # a's key that b leaves alone
    assert config(f"--config {b} --config {a}").train.max_steps == 3
    assert config(f"--config {a} --config {b} train.max_steps=7").train.max_steps == 7
    assert load_config(RunConfig, [a, b]) == config(f"--config {a} --config {b}")


def test_a_merge_key_may_override_but_a_key_written_twice_may_not(tmp_path):
    layered = tmp_path / "layered.yaml"  # as configs/toy.yaml does: a section merged from another, one key changed
    layered.write_text("data: {<<: {max_length: 96, seed: 1}, seed: 2}\n")
    assert load_config(RunConfig, layered).data.seed == 2
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  optimizer:\n    learning_rate: 1.0e-4\n    learning_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"key 'learning_rate' is written twice \(lines 3 and 4\)"):
        load_config(RunConfig, nested)


def test_check_backend_runs_agrees_with_xla():
    """The door refuses exactly what XLA refuses: float16 attention through XLA's fused op on a CPU; einsum
    attention in float16 and every float32 setting pass."""
    check_backend_runs("float32", None, "xla", packed=False)
    check_backend_runs("float16", None, "einsum", packed=False)
    refuses = jax.default_backend() == "cpu" and _xla_refuses_float16_attention()
    for attention, packed in (("xla", False), ("blocked", True)):
        if refuses:
            with pytest.raises(ConfigError, match=rf"param_dtype=float16 .* train.attention={attention} \(XLA: "):
                check_backend_runs("float16", None, attention, packed=packed)
        else:
            check_backend_runs("float16", None, attention, packed=packed)
    if refuses:
        with pytest.raises(ConfigError, match="compute_dtype=float16 cannot run"):
            check_backend_runs("bfloat16", "float16", "xla", packed=False)


def _state(model) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model))]


def test_an_adapter_that_does_not_fit_is_refused_whole(workspace, tmp_path):
    """Other layers, other shapes, a half missing, weights this code would drop, a bad rank: refused before the
    model is touched (no adapter attached, every weight as it was); a fitting one still loads."""
    from safetensors.numpy import load_file, save_file

    good = _adapter_of(PRESETS["tiny"], tmp_path / "good")
    tensors = load_file(good / "adapter_model.safetensors")
    magnitude = {"base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector": np.ones(128, np.float32)}
    variants = {
        "no_b": ({k: v for k, v in tensors.items() if k != sorted(tensors)[-1]}, None, "lacks 'base_model.model.model"),
        "dora": (tensors | magnitude, None, "which is not a LoRA lora_A / lora_B weight"),
        "rank": (tensors, {"r": 0}, "r must be a positive integer, not 0"),
        "use_dora": (tensors, {"use_dora": True}, "describes a DoRA adapter"),
    }
    for name, (weights, config_change, fragment) in variants.items():
        folder = tmp_path / name
        folder.mkdir()
        save_file(weights, str(folder / "adapter_model.safetensors"))
        config = json.loads((good / "adapter_config.json").read_text()) | (config_change or {})
        (folder / "adapter_config.json").write_text(json.dumps(config))
        variants[name] = (folder, fragment)
    variants |= {
        "layers": (workspace / "adapter_3_layers", "which the model lacks (it has 2 layers)"),
        "shapes": (workspace / "adapter_d32", "has shape (32, 4), the model and r=4 imply (64, 4)"),
    }
    model = Qwen2ForCausalLM(PRESETS["tiny"], rngs=nnx.Rngs(0))
    before = _state(model)
    for name, (folder, fragment) in variants.items():
        with pytest.raises(CheckpointError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            lora.load_adapter(model, folder)
        assert not lora.has_adapters(model), name
        assert all(np.array_equal(a, b) for a, b in zip(before, _state(model), strict=True)), name
    lora.load_adapter(model, good)
    assert len(list(lora.adapters(model))) == 2 * 7  # every projection of both layers


def test_a_split_is_refused_for_a_source_without_splits(workspace):
    problems = workspace / "problems.jsonl"
    assert len(load_problems(str(problems))) == 4  # the command's default split: nothing asked
    assert len(load_problems(str(problems), split="train", default_split="train")) == 4  # irpo's training default
    for dataset in (str(problems), "gsm_symbolic"):
        with pytest.raises(ProblemsError, match=f"split 'train' names a part of a hub dataset .* {dataset!r} has no"):
            load_problems(dataset, split="train")
