"""Training runs (training/loop.py): exact resume, resume onto another mesh, fixed compilations, and `jaxpatience train`
end to end (train, checkpoint, resume, export, plot). Two processes x 2 devices against one x 4 (through the
SLURM template, with a requeue) are in test_pods.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxpatience.config import ConfigError
from jaxpatience.durability.metrics import read_metrics
from jaxpatience.training.checkpoint import Checkpointer
from jaxpatience.training.loop import load_run_config, train


def write_pairs(path: Path, count: int = 24, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(count):
        a, b = (int(x) for x in rng.integers(1, 50, 2))
        work = " ".join(["Check the sum again."] * int(rng.integers(0, 6)))
        lines.append({"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}. {work} The answer is {a + b}.",
                      "rejected": f"The answer is {a + b + int(rng.integers(1, 5))}."})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def config_args(checkpoint: Path, pairs: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model={checkpoint}", f"data.path={pairs}", f"out_dir={out}", "data.max_length=160", "data.buckets=[96,160]",
        "train.batch_size=4", "train.max_steps=8", "train.lora.rank=4", "train.optimizer.learning_rate=1e-3",
        "train.optimizer.warmup_steps=2", "train.loss.nll_weight=1.0", "checkpoint_every=3", *extra,
    ]  # fmt: skip


def losses_of(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


@pytest.fixture
def setup(tiny_checkpoint, tmp_path):
    return tiny_checkpoint(), write_pairs(tmp_path / "pairs.jsonl"), tmp_path


def test_stop_and_resume_is_bitwise_identical(setup):
    checkpoint, pairs, tmp = setup
    whole = train(load_run_config(None, config_args(checkpoint, pairs, tmp / "whole")), progress=False)
    assert whole["steps"] == 8 and whole["compilations"] == len(whole["batch_shapes"])  # one per shape, not step
    assert all(len(shape) == 2 and shape[1] == 160 for shape in whole["batch_shapes"])  # packed rows of max_length
    cut = load_run_config(None, config_args(checkpoint, pairs, tmp / "cut"))
    first = train(cut, progress=False, stop_after=5)  # stops between checkpoints: step 5 is saved on exit
    assert first["steps"] == 5 and (tmp / "cut" / "checkpoints").is_dir()
    second = train(cut, progress=False)
    assert second["resumed_from"] == 5
    assert losses_of(tmp / "cut") == losses_of(tmp / "whole")  # bitwise on CPU
    again = train(cut, progress=False, stop_after=3)  # behind the latest checkpoint: a no-op, nothing relabelled
    changed = load_run_config(None, config_args(checkpoint, pairs, tmp / "cut", "train.loss.beta=0.5"))
    with pytest.raises(ConfigError, match=r"another config \(differs in: train\.loss\.beta\)"):
        train(changed, progress=False)
    assert again["steps"] == 8 and sorted(Checkpointer(tmp / "cut" / "checkpoints").all_steps())[-1] == 8
    assert len(losses_of(tmp / "whole")) == 8
    # the loss falls on this small set, and the artifacts exist
    assert losses_of(tmp / "whole")[-1] < losses_of(tmp / "whole")[0]
    assert (tmp / "cut" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp / "cut" / "training.png").stat().st_size > 1000


def test_resume_onto_another_mesh(setup):
    checkpoint, pairs, tmp = setup
    whole = config_args(checkpoint, pairs, tmp / "whole", "train.mesh.data=4")
    train(load_run_config(None, whole), progress=False)
    first = config_args(checkpoint, pairs, tmp / "moved", "train.mesh.data=4")
    train(load_run_config(None, first), progress=False, stop_after=3)
    moved = config_args(checkpoint, pairs, tmp / "moved", "train.mesh.fsdp=2", "train.mesh.tensor=2")
    assert train(load_run_config(None, moved), progress=False)["resumed_from"] == 3
    np.testing.assert_allclose(losses_of(tmp / "moved"), losses_of(tmp / "whole"), rtol=1e-5)


def test_full_parameter_dpo_precomputes_the_reference(setup):
    checkpoint, pairs, tmp = setup
    args = config_args(checkpoint, pairs, tmp / "full", "train.lora=null", "train.max_steps=3",
                       "train.optimizer.learning_rate=1e-4")  # fmt: skip
    summary = train(load_run_config(None, args), progress=False)
    first = read_metrics(tmp / "full" / "metrics.jsonl")[0]
    # at step 1 the policy is the reference: the DPO term is log 2 and the margins are zero
    assert abs(first["rewards/margins"]) < 1e-5
    assert Path(summary["exports"]["merged"], "config.json").is_file()


def test_cli_end_to_end_and_bad_config(setup, tmp_path):
    checkpoint, pairs, tmp = setup
    config = tmp / "run.yaml"
    config.write_text("train:\n  max_steps: 4\n  lora:\n    rank: 2\n")
    cmd = [sys.executable, "-m", "jaxpatience.cli", "train", "--config", str(config), "--no-progress"]
    args = [f"model={checkpoint}", f"data.path={pairs}", f"out_dir={tmp / 'cli'}", "data.max_length=160",
            "train.batch_size=4", "checkpoint_every=2", "export_merged=true"]  # fmt: skip
    done = subprocess.run([*cmd, *args, "--stop-after", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 4 and set(result["exports"]) == {"adapter", "merged"}
    assert len(losses_of(tmp / "cli")) == 4
    bad = subprocess.run([*cmd, *args, "train.lora.rnak=3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown key 'train.lora.rnak'" in bad.stderr and "Traceback" not in bad.stderr


def test_shipped_training_configs_parse():
    from jaxpatience.recipes.demo import load_demo_config
    from jaxpatience.recipes.irpo import load_irpo_config

    configs = sorted(p for p in Path(__file__).parent.parent.glob("configs/*.yaml") if "prompt" not in p.name)
    assert len(configs) >= 4
    for path in configs:
        if path.name.startswith("irpo_"):
            trains = [load_irpo_config(path, ["model=some/checkpoint"]).training.train]
        elif path.name == "toy.yaml":  # the demo's recipe: its stages' training configs
            demo = load_demo_config(path=path)
            trains = [demo.sft.train, demo.patience.train, demo.irpo.training.train]
        else:
            trains = [load_run_config(path, ["model=some/checkpoint", "data.path=pairs.jsonl"]).train]
        for config in trains:
            assert config.batch_size % config.micro_batches == 0, path


def test_a_run_from_before_0_3_resumes_with_its_settings(tmp_path):
    """Checkpoints written before packing and scanned layers hold per-layer weights: their config lacks the new
    keys, which count as the old behaviour, so the resume is refused unless those settings are given."""
    import dataclasses

    from jaxpatience.training.loop import LEGACY_VALUES, _check_same_run

    base = config_args(Path("ckpt"), Path("pairs.jsonl"), tmp_path)
    legacy = [f"{section}.{key}={'null' if value is None else str(value).lower()}"
              for section, values in LEGACY_VALUES.items() for key, value in values.items()]  # fmt: skip
    saved = dataclasses.asdict(load_run_config(None, base))
    for section, values in LEGACY_VALUES.items():
        for key in values:
            del saved[section][key]
    _check_same_run(saved, dataclasses.asdict(load_run_config(None, base + legacy)), tmp_path)
    with pytest.raises(ConfigError, match=r"differs in: data\.packing, train\.attention, train\.scan_layers"):
        _check_same_run(saved, dataclasses.asdict(load_run_config(None, base)), tmp_path)
