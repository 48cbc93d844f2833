"""The config backbone: every shipped YAML loads into its class, and every command line reads YAML < flags <
key=value the same way."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from jaxpatience.config import (
    ConfigError,
    EvalConfig,
    IrpoConfig,
    RunConfig,
    SamplingConfig,
    ServeConfig,
    command_parser,
    config_from_args,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FLAGS = {
    "--model": ("model", "checkpoint"),
    "--adapter": ("adapter", "adapter directory"),
    "--temperature": ("sampling.temperature", "sampling temperature"),
    "--mesh": ("mesh", "mesh sizes"),
    "--out": ("out_dir", "output folder"),
}


def _parse(argv: list[str]) -> EvalConfig:
    return config_from_args(EvalConfig, command_parser("test", "a test command", FLAGS).parse_intermixed_args(argv))


def test_every_shipped_config_loads_into_its_class():
    from jaxpatience.recipes.demo import DemoConfig, load_demo_config

    loaded = {path.name: path for path in CONFIGS.glob("*.yaml") if path.name != "teacher_prompts.yaml"}
    assert {"toy.yaml", "irpo_gsm8k.yaml", "tiny_cpu.yaml"} <= set(loaded)
    for name, path in loaded.items():
        cls = {"toy.yaml": DemoConfig, "irpo_gsm8k.yaml": IrpoConfig}.get(name, RunConfig)
        config = load_config(cls, path)
        assert dataclasses.is_dataclass(config) and config != cls(), f"{name} states nothing"
    demo = load_demo_config()
    # the toy recipe's stages are the project's own sections, with the anchored data settings shared
    assert demo.sft.data.max_length == demo.patience.data.max_length == demo.irpo.training.data.max_length
    assert demo.sft.data.shuffle is False and demo.patience.data.shuffle is True
    assert demo.irpo.training.train.loss.nll_weight == 1.0 and demo.patience.train.loss.nll_weight == 0.0


def test_yaml_then_flags_then_key_value(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("model: from-yaml\nout_dir: yaml-out\nsampling: {temperature: 0.2, max_new_tokens: 64}\n")
    config = _parse(["--config", str(path), "--model", "from-flag", "sampling.temperature=0.9"])
    assert config.model == "from-flag"  # a flag beats the file
    assert config.out_dir == "yaml-out" and config.sampling.max_new_tokens == 64  # the file beats the defaults
    assert config.sampling.temperature == 0.9  # key=value beats both
    config = _parse(["--temperature", "0.5", "sampling.temperature=0.7"])
    assert config.sampling.temperature == 0.7


def test_flag_values_keep_their_kind():
    config = _parse(["--model", "yes", "--adapter", "7", "--out", "a=b.jsonl", "--mesh", "data=2,tensor=4"])
    assert config.model == "yes" and config.adapter == "7"  # text fields stay text (YAML would read true, 7)
    assert config.out_dir == "a=b.jsonl"  # '=' in a text value is not a section
    assert config.mesh is not None and (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (2, 1, 4)
    assert _parse(["--temperature", "1e-1"]).sampling.temperature == pytest.approx(0.1)


def test_unknown_keys_and_bad_values_are_named():
    with pytest.raises(ConfigError, match="command line: unknown key 'sampling.temprature'"):
        _parse(["sampling.temprature=0.5"])
    with pytest.raises(ConfigError, match="sampling.num_samples must be a positive integer"):
        _parse(["sampling.num_samples=0"])
    with pytest.raises(ConfigError, match="eval: model is not set"):
        EvalConfig(dataset="gsm8k", out_dir="x").validate()


def test_a_value_of_the_wrong_kind_names_its_key():
    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as caught:
            load_config(RunConfig, None, list(overrides))
        return str(caught.value)

    assert error("train.loss.beta=abc") == "command line: train.loss.beta must be a number, not 'abc'."
    assert error("train.max_steps=2.5") == "command line: train.max_steps must be an integer, not 2.5."
    assert error("data.buckets=[64,x]") == "command line: data.buckets[1] must be an integer, not 'x'."
    assert error("train.lora.rslora=maybe") == "command line: train.lora.rslora must be true or false, not 'maybe'."
    config = load_config(RunConfig, None, ["train.lora.alpha=32", "train.optimizer.learning_rate=1e-5"])
    assert config.train.lora.alpha == 32.0 and isinstance(config.train.lora.alpha, float)
    assert config.train.optimizer.learning_rate == 1e-5
    assert load_config(RunConfig, None, ["train.lora=null"]).train.lora is None
    assert error("train.lora=5") == "command line: train.lora must be a section of keys or null, not 5."
    assert error("data=null") == "command line: data must be a section of keys, not None."
    assert error("data.pack_row_multiple=0") == "data.pack_row_multiple must be at least 1, not 0."


def test_one_key_of_a_section_keeps_the_sections_own_defaults():
    """`training.train.batch_size=8` changes one key of IrpoConfig's training default (DPO + NLL, one epoch); it
    used to rebuild the section from a bare RunConfig, silently dropping the NLL term."""
    irpo = load_config(IrpoConfig, None, ["model=m", "training.train.batch_size=8", "sampling.temperature=0.5"])
    assert irpo.training.train.batch_size == 8 and irpo.training.epochs == 1
    assert irpo.training.train.loss.nll_weight == 1.0 and irpo.training.train.loss.dpo_weight == 1.0
    assert irpo.sampling.num_samples == 8 and irpo.sampling.temperature == 0.5  # IRPO's sampling default kept


def test_a_bad_key_is_blamed_on_where_it_was_written(tmp_path):
    """The YAML file's keys are named with the file, key=value ones with the command line (not the file)."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 3\n")

    def error(text: str, *overrides: str) -> str:
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_config(RunConfig, path, list(overrides))
        return str(caught.value)

    assert error("train:\n  max_steps: 3\n", "train.loss.beta=abc").startswith("command line: train.loss.beta must")
    assert error("train:\n  max_steps: 3\n", "trian.max_steps=3").startswith("command line: unknown key 'trian'")
    assert error("train:\n  max_steps: 2.5\n") == f"{path}: train.max_steps must be an integer, not 2.5."
    assert error("train:\n  mx_steps: 2\n").startswith(f"{path}: unknown key 'train.mx_steps' (known in train:")


def test_templates_validate_only_where_a_run_starts():
    template = RunConfig()  # IrpoConfig.training and the demo's stages leave model and data.path empty
    with pytest.raises(ConfigError, match="model is not set"):
        template.validate()
    assert dataclasses.replace(template, model="m", data=dataclasses.replace(template.data, path="p")).validate()
    irpo = load_config(IrpoConfig, CONFIGS / "irpo_gsm8k.yaml", ["model=m", "training.train.batch_size=8"])
    assert irpo.training.train.batch_size == 8 and irpo.sampling.num_samples == 8
    with pytest.raises(ConfigError, match="sampling.temperature must be > 0"):
        IrpoConfig(sampling=SamplingConfig(num_samples=4))


def test_changed_keys_are_dotted():
    from jaxpatience.config import changed_keys

    before = {"seed": 0, "train": {"loss": {"beta": 0.1}, "batch_size": 8}}
    after = {"seed": 0, "train": {"loss": {"beta": 0.2}, "batch_size": 8}, "epochs": 1}
    assert changed_keys(before, after) == ["epochs", "train.loss.beta"]
    assert changed_keys(before, before) == []


def test_sampling_config_is_generates_keywords():
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, top_k=5, num_samples=3, max_new_tokens=9, seed=2, stop=(7,))
    assert sampling.generate_kwargs() == dict(max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=5, num_samples=3,
                                              seed=2, stop_tokens=[7])  # fmt: skip


def _float_keys(cls, prefix=""):
    """Every float field of config dataclass `cls`, as a dotted key (sections followed)."""
    import typing

    from jaxpatience.config_io import _dataclass_in

    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint, key = hints[field.name], f"{prefix}{field.name}"
        if _dataclass_in(hint) is not None:
            yield from _float_keys(_dataclass_in(hint), key + ".")
        elif hint is float or set(typing.get_args(hint)) == {float, type(None)}:
            yield key


@pytest.mark.parametrize("cls", [RunConfig, EvalConfig, IrpoConfig, ServeConfig])
@pytest.mark.parametrize("value", ["inf", "-.inf", "nan", ".nan"])
def test_the_loader_refuses_non_finite_numbers_for_every_float_key(cls, value):
    keys = list(_float_keys(cls))
    assert keys or cls is ServeConfig
    for key in keys:
        with pytest.raises(ConfigError, match=rf"^command line: {re.escape(key)} must be a finite number"):
            load_config(cls, None, [f"{key}={value}"])


def test_ranges_hold_for_configs_built_in_python_too():
    from jaxpatience.config import OptimizerConfig

    with pytest.raises(ConfigError, match="optimizer.learning_rate must be a finite number, not inf"):
        OptimizerConfig(learning_rate=math.inf)
    with pytest.raises(ConfigError, match="sampling.temperature must be a finite number, not nan"):
        SamplingConfig(temperature=math.nan)
    with pytest.raises(ConfigError, match=r"sampling.seed must be >= 0 and <= 4294967295, not 4294967296"):
        SamplingConfig(seed=2**32)
    SamplingConfig(seed=2**32 - 1)  # the largest uint32 seed is fine
    with pytest.raises(ConfigError, match="sampling.seed must be >= 0 and <= 4294967293"):  # room for seed + 2
        load_config(IrpoConfig, None, [f"sampling.seed={2**32 - 2}"])


def test_warmup_is_checked_against_the_steps_the_user_set():
    from jaxpatience.config import PRESETS

    with pytest.raises(ConfigError, match=r"warmup_steps \(200\) must not exceed train.max_steps \(100\)"):
        load_config(RunConfig, None, ["train.optimizer.warmup_steps=200"])
    with pytest.raises(ConfigError, match=r"warmup_steps \(200\) must not exceed train.max_steps \(150\)"):
        load_config(RunConfig, None, ["train.max_steps=150", "train.optimizer.warmup_steps=200"]).check_model(
            PRESETS["tiny"], 150
        )
    # steps that follow from epochs and the data (an IRPO iteration with few pairs) are not refused
    config = load_config(RunConfig, None, ["epochs=2", "train.optimizer.warmup_steps=200"])
    config.check_model(PRESETS["tiny"], 150)
    with pytest.raises(ConfigError, match=r"train.lora.rank \(128\) must not exceed the model's hidden size \(64\)"):
        load_config(RunConfig, None, ["train.lora.rank=128"]).check_model(PRESETS["tiny"], 100)
    load_config(RunConfig, None, ["train.lora.rank=64"]).check_model(PRESETS["tiny"], 100)


def test_argparse_number_types():
    import argparse

    from jaxpatience.config_io import finite_float, non_negative_int, positive_int

    assert positive_int("3") == 3 and non_negative_int("0") == 0 and finite_float(min=0)("0.5") == 0.5
    bad = [(positive_int, "0"), (non_negative_int, "-1"), (positive_int, "1.5")]
    bad += [(finite_float(min=0), "-0.1"), (finite_float(), "nan"), (finite_float(above=0), "0")]
    for parse, text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
