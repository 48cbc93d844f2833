"""The config dataclasses: every knob of the project, one name each, with defaults that make sense.

Every config is frozen; a YAML file only states what differs. Reading them (YAML, `key=value`, the command
line) is config_io.py's job; its public names are re-exported here, so `from jaxpatience.config import
load_config, ConfigError` works as well.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path
from typing import Any

from jaxpatience.config_io import (  # noqa: F401 - re-exported: the one place users import configs from
    ConfigError,
    apply_overrides,
    changed_keys,
    check_output_dir,
    check_range,
    command_parser,
    config_from_args,
    from_dict,
    load_config,
    load_yaml,
    read_json,
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Qwen2 decoder (the fields of HF's `Qwen2Config` that matter here)."""

    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # N
    num_key_value_heads: int  # K (GQA: N % K == 0)
    head_dim: int | None = None  # H; defaults to D // N as in HF
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    qkv_bias: bool = True  # Qwen2 has biases on q, k, v (not on o)
    param_dtype: str = "float32"  # storage dtype of the weights
    compute_dtype: str = "float32"  # dtype of the matmuls (softmax, norms and logsumexp stay float32)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        for field in ("param_dtype", "compute_dtype"):
            if getattr(self, field) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{field} must be float32, bfloat16 or float16, not {getattr(self, field)!r}.")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict, **overrides: Any) -> ModelConfig:
        """Read an HF `config.json` (a checkpoint directory, the file itself, or its parsed dict)."""
        if isinstance(path_or_dict, dict):
            hf, where = path_or_dict, "the config dict"
        else:
            path = Path(path_or_dict)
            file = path / "config.json" if path.is_dir() else path
            if not file.is_file():
                raise ConfigError(f"{file} does not exist: expected an HF checkpoint with a config.json.")
            hf = read_json(file)
            where = str(file)
        hf = dict(hf.get("text_config", hf)) if hf.get("model_type") != "qwen2" else dict(hf)
        if hf.get("model_type") != "qwen2":
            raise ConfigError(
                f"{where} has model_type {hf.get('model_type')!r}; only 'qwen2' (Qwen2 and Qwen2.5) is supported."
            )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"{where} asks for rope_type {rope_type!r}; only the default RoPE is implemented.")
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{where} sets use_sliding_window: true, which is not implemented.")
        try:
            fields = dict(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=hf["num_attention_heads"],
                num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            )
        except KeyError as err:
            raise ConfigError(f"{where} lacks the key {err.args[0]!r}.") from None
        fields.update(
            head_dim=hf.get("head_dim"),
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict:
        """The `config.json` dict that transformers' `Qwen2ForCausalLM` loads."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "torch_dtype": self.param_dtype,
        }


# Shapes of the released checkpoints (Qwen2.5 shares Qwen2's shapes at 0.5B, 1.5B, 7B and 72B).
_QWEN2_SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064),
    "72b": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, tie_word_embeddings=False, vocab_size=152064),
}  # fmt: skip
PRESETS: dict[str, ModelConfig] = {}
for _size, _shape in _QWEN2_SHAPES.items():
    PRESETS[f"qwen2-{_size}"] = PRESETS[f"qwen2.5-{_size}"] = ModelConfig(**_shape)
# A laptop-sized model of the same architecture, for smoke runs and benchmarks of the code path.
PRESETS["tiny"] = ModelConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}.")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------------
# Numbers: the loader refuses non-finite floats; each __post_init__ states its ranges (config_io.check_range).
SEED_MAX = 2**32 - 1  # seeds become uint32 (the decoder's per-row seeds, NumPy's generators)


# ---------------------------------------------------------------------------------------------------
# Training configs (issue 3): LoRA, loss, mesh, optimizer, and the train step that combines them.

DEFAULT_LORA_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Hand-written LoRA (model/lora.py). `targets` is a regex fullmatched against HF module names such as
    `model.layers.0.self_attn.q_proj` (the default: every attention and MLP projection)."""

    rank: int = 16  # R
    alpha: float = 32.0  # scaling = alpha / rank (or alpha / sqrt(rank) with rslora)
    dropout: float = 0.0  # on the adapter's input, as PEFT does
    targets: str = DEFAULT_LORA_TARGETS
    rslora: bool = False

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ConfigError(f"lora.rank must be a positive integer, not {self.rank!r}.")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora.alpha must be positive, not {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), not {self.dropout!r}.")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """`loss = dpo_weight * DPO + nll_weight * NLL(chosen)` (training/losses.py).

    dpo_weight = 1, nll_weight = 0: DPO (Patience).  dpo_weight = 1, nll_weight = 1: Iterative RPO.
    dpo_weight = 0, nll_weight = 1: plain SFT on the chosen response.
    """

    loss_type: str = "sigmoid"  # sigmoid (DPO), ipo, hinge
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO; sigmoid only
    dpo_weight: float = 1.0
    nll_weight: float = 0.0  # alpha
    nll_normalization: str = "sequence"  # sequence: mean over pairs of NLL(w)/|w| (IRPO); token: TRL's token mean

    def __post_init__(self):
        if self.loss_type not in ("sigmoid", "ipo", "hinge"):
            raise ConfigError(f"loss.loss_type must be sigmoid, ipo or hinge, not {self.loss_type!r}.")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"loss.beta must be positive, not {self.beta!r}.")
        for key in ("dpo_weight", "nll_weight"):
            check_range(f"loss.{key}", getattr(self, key), 0)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), not {self.label_smoothing!r}.")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError("loss.label_smoothing applies only to loss_type sigmoid.")
        if self.dpo_weight < 0 or self.nll_weight < 0 or self.dpo_weight + self.nll_weight == 0:
            raise ConfigError("loss.dpo_weight and loss.nll_weight must be >= 0 and not both 0.")
        if self.nll_normalization not in ("sequence", "token"):
            raise ConfigError(f"loss.nll_normalization must be sequence or token, not {self.nll_normalization!r}.")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (sharding.py). One size may be -1: all remaining devices. A product smaller than the
    device count uses the first devices (single host only; sharding.make_mesh warns)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup, then cosine / linear decay (or constant) to min_lr_ratio * learning_rate."""

    learning_rate: float = 5e-6
    warmup_steps: int = 0
    decay: str = "cosine"  # cosine, linear, constant
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0  # applied to matrices only (not to biases or norm scales)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # global-norm clipping; null disables it

    def __post_init__(self):
        check_range("optimizer.learning_rate", self.learning_rate, 0)
        check_range("optimizer.weight_decay", self.weight_decay, 0)
        check_range("optimizer.b1", self.b1, 0, 1)
        check_range("optimizer.b2", self.b2, 0, 1)
        check_range("optimizer.eps", self.eps, above=0)
        check_range("optimizer.max_grad_norm", self.max_grad_norm, above=0)
        if self.decay not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optimizer.decay must be cosine, linear or constant, not {self.decay!r}.")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("optimizer.warmup_steps must be >= 0 and optimizer.min_lr_ratio in [0, 1].")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything the train step needs (training/step.py). `lora: null` trains every parameter."""

    lora: LoraConfig | None = dataclasses.field(default_factory=LoraConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    batch_size: int = 8  # pairs per optimizer step, over all devices
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many micro-batches
    max_steps: int = 100  # length of the learning-rate schedule
    remat: str = "none"  # none, full (recompute each layer), dots (save matmul outputs), lora (base projections')
    # auto: cudnn on a GPU in bf16/fp16, splash on a TPU, else blocked; blocked (tiles a sequence spans, any
    # backend), cudnn, splash, xla (dense mask), einsum (the reference): model/attention.py
    attention: str = "auto"
    scan_layers: bool = True  # one layer scanned over stacked weights (qwen2.LayerStack), not L unrolled
    logits_chunk_size: int = 256  # tokens per chunk when turning hidden states into log-probs
    seed: int = 0  # LoRA init and dropout
    strategy: str = "gspmd"  # gspmd (XLA places the collectives) or shard_map (written by hand: training/shard_map.py)

    def __post_init__(self):
        if self.batch_size <= 0 or self.micro_batches <= 0 or self.batch_size % self.micro_batches:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a positive multiple of micro_batches ({self.micro_batches})."
            )
        if self.remat not in ("none", "full", "dots", "lora"):
            raise ConfigError(f"remat must be none, full, dots or lora, not {self.remat!r}.")
        if self.attention not in ("auto", "blocked", "cudnn", "splash", "xla", "einsum"):
            raise ConfigError(f"attention must be auto, blocked, cudnn, splash, xla or einsum, not {self.attention!r}.")
        for key in ("max_steps", "logits_chunk_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be a positive integer, not {getattr(self, key)!r}.")
        check_range("train.seed", self.seed, 0, SEED_MAX)
        if self.strategy not in ("gspmd", "shard_map"):
            raise ConfigError(f"strategy must be gspmd or shard_map, not {self.strategy!r}.")
        if self.strategy == "shard_map" and self.mesh.tensor != 1:
            raise ConfigError(
                "train.strategy=shard_map splits only the data and fsdp axes; use gspmd for tensor parallelism."
            )


# ---------------------------------------------------------------------------------------------------
# A training run (training/loop.py, `jaxpatience train`).


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Preference pairs for the PairLoader (data/pairs.py)."""

    path: str = ""  # .jsonl / .parquet file, or a hub dataset id
    max_length: int = 1024  # prompt + response tokens per sequence (the largest bucket)
    max_prompt_length: int | None = None  # default max_length // 2; longer prompts keep their end
    buckets: tuple[int, ...] | None = None  # sequence lengths; default powers of two up to max_length
    seed: int = 0  # shuffling
    shuffle: bool = True
    chat_template: bool = True  # apply the tokenizer's chat template to the prompt
    packing: bool = True  # pack several pairs per row (data/packing.py) instead of padding each sequence
    pack_length: int | None = None  # tokens per packed row; default: the largest bucket (max_length)
    # Round each packed batch's row count up to a multiple of this: fewer distinct shapes (one compilation each)
    # for some empty rows. The devices, micro-batches and hosts set a multiple of their own; this one adds to it.
    pack_row_multiple: int = 1
    reference_cache: str | None = None  # directory of precomputed reference log-probs; default: beside the data

    def __post_init__(self):
        if self.max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2 (a prompt and a response), not {self.max_length!r}.")
        if self.buckets is not None and (
            not self.buckets or min(self.buckets) < 1 or list(self.buckets) != sorted(set(self.buckets))
        ):
            raise ConfigError(f"data.buckets must be positive lengths in rising order, not {list(self.buckets)}.")
        if self.pack_length is not None and self.pack_length <= 0:
            raise ConfigError(f"data.pack_length must be positive, not {self.pack_length!r}.")
        if self.pack_row_multiple < 1:
            raise ConfigError(f"data.pack_row_multiple must be at least 1, not {self.pack_row_multiple!r}.")
        check_range("data.seed", self.seed, 0, SEED_MAX)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host start-up; unset fields fall back to JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


# `report`'s experiment trackers (durability/trackers.py) -> the package each needs (the [track] extra brings both)
TRACKERS = {"tensorboard": "tensorboardX", "wandb": "wandb"}


def _check_report(report: tuple[str, ...]) -> None:
    """Every tracker `report` names is known and its package installed: refused at the door, before any file."""
    for name in report:
        if name not in TRACKERS:
            raise ConfigError(f"report: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}.")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(
                f"report: {name} needs the {TRACKERS[name]} package, which is not installed "
                f"(pip install {TRACKERS[name]}, or the [track] extra)."
            )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run (training/loop.py). `model` and `data.path` may stay empty in a template (IrpoConfig.training,
    the demo's stages) that sets them later; `validate()` checks them before a run starts."""

    model: str = ""  # HF checkpoint directory or .gguf file
    out_dir: str = "out/train"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    param_dtype: str = "float32"  # storage dtype of the base weights (bfloat16 on accelerators)
    compute_dtype: str | None = None  # default: param_dtype
    epochs: int | None = None  # if set, train.max_steps = epochs * steps per epoch
    precompute_reference: bool = False  # reference log-probs once before training (always on for full-param DPO)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    export_merged: bool = False  # also write OUT/merged (HF checkpoint with the adapter folded in)
    report: tuple[str, ...] = ()  # experiment trackers fed with metrics.jsonl's lines: tensorboard, wandb

    def __post_init__(self):
        _check_report(self.report)
        for key in ("checkpoint_every", "log_every", "epochs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be at least 1, not {value!r}.")
        if self.keep_checkpoints < 0:
            raise ConfigError(f"keep_checkpoints must be 0 or more, not {self.keep_checkpoints!r}.")
        if self.epochs is None:  # with epochs, max_steps is known once the data is read: check_model checks it
            _check_warmup(self.train.optimizer.warmup_steps, self.train.max_steps)

    def validate(self) -> RunConfig:
        """Raise ConfigError unless the run can start (its model and data are named); returns self.

        An HF checkpoint folder's config.json is read here (a .gguf file's shapes come with its weights: the loop
        calls check_model then, before it writes a file)."""
        if not self.model:
            raise ConfigError("model is not set: give an HF checkpoint directory or .gguf file (model=PATH).")
        if not self.data.path:
            raise ConfigError("data.path is not set: give a pairs .jsonl/.parquet file (data.path=PATH).")
        check_output_dir(self.out_dir, "out_dir")
        check_lora_fits(self.train.lora, self.model)
        return self

    def check_model(self, model: ModelConfig, max_steps: int) -> None:
        """The settings that need the model's shapes, checked once the model is known (a .gguf file's at load).
        Warmup is held to `max_steps` only when the user set it: a step count that follows from `epochs` and the
        data (an IRPO iteration that found few pairs) is not refused; its schedule warms up over what there is."""
        check_lora_fits(self.train.lora, model)
        if self.epochs is None:
            _check_warmup(self.train.optimizer.warmup_steps, max_steps)


def _check_warmup(warmup_steps: int, max_steps: int) -> None:
    if warmup_steps > max_steps:
        raise ConfigError(
            f"train.optimizer.warmup_steps ({warmup_steps}) must not exceed train.max_steps ({max_steps}): "
            "the learning rate would never reach its peak."
        )


def check_lora_fits(lora: LoraConfig | None, model: ModelConfig | str | Path, key: str = "train.lora.rank") -> None:
    """`lora.rank` at most the model's hidden size (a larger rank is no longer low-rank). `model`: its config, or
    an HF checkpoint folder whose config.json is read (anything else, e.g. a .gguf file, is checked later)."""
    if lora is None:
        return
    if not isinstance(model, ModelConfig):
        file = Path(model) / "config.json"
        if not file.is_file():
            return
        try:
            model = ModelConfig.from_hf(file)
        except ConfigError:  # not a Qwen2 checkpoint: the model loader says so in its own words
            return
    if lora.rank > model.hidden_size:
        raise ConfigError(f"{key} ({lora.rank}) must not exceed the model's hidden size ({model.hidden_size}).")


# ---------------------------------------------------------------------------------------------------
# Generation and evaluation (generation/api.py, evaluation/evaluate.py, `jaxpatience eval`).


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How solutions are drawn: the one set of sampling knobs of generate, evaluate, irpo, demo and eval."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    num_samples: int = 1  # solutions per prompt (maj@k, IRPO's N)
    max_new_tokens: int = 512
    seed: int = 0
    stop: tuple[int | str, ...] | None = None  # stop token ids or single-token strings; None: EOS and <|im_end|>

    def __post_init__(self):
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ConfigError(f"sampling.max_new_tokens must be a positive integer, not {self.max_new_tokens!r}.")
        if not (isinstance(self.num_samples, int) and self.num_samples >= 1):
            raise ConfigError(f"sampling.num_samples must be a positive integer, not {self.num_samples!r}.")
        check_range("sampling.temperature", self.temperature, 0)
        if not 0.0 < self.top_p <= 1.0:  # nan fails this too
            raise ConfigError(f"sampling.top_p must be in (0, 1], not {self.top_p!r}.")
        check_range("sampling.top_k", self.top_k, 0)
        check_range("sampling.seed", self.seed, 0, SEED_MAX)

    def generate_kwargs(self) -> dict:
        """The keyword arguments of `generate` (generation/api.py) (sample j of prompt i is result[i][j])."""
        return dict(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            num_samples=self.num_samples,
            seed=self.seed,
            stop_tokens=None if self.stop is None else list(self.stop),
        )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`jaxpatience eval`: a checkpoint (and adapter) on a problem set; OUT gets generations and a summary."""

    model: str = ""  # HF checkpoint directory or .gguf file
    adapter: str | None = None  # a PEFT LoRA adapter directory applied on top of `model`
    dataset: str = ""  # gsm8k, math, gsm_symbolic, or a .jsonl/.json/.parquet file
    split: str = "test"  # hub dataset split
    limit: int | None = None  # the first N problems
    out_dir: str = ""  # rerunning into it resumes
    prompt_style: str = "zero_shot"  # see data/problems.build_prompt
    metric: str = "auto"  # the answer reading behind accuracy: auto, strict, flexible, math_verify
    generation_batch_size: int = 16  # problems decoded at once (the decoder's slots / num_samples)
    param_dtype: str = "float32"
    compute_dtype: str | None = None
    mesh: MeshConfig | None = None  # None: one device
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)

    def validate(self) -> EvalConfig:
        for key in ("model", "dataset", "out_dir"):
            if not getattr(self, key):
                raise ConfigError(f"eval: {key} is not set ({key}=... or --{key.replace('_dir', '')} ...).")
        check_output_dir(self.out_dir, "out_dir")
        return self


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """`jaxpatience serve`: a checkpoint (and adapter) behind an OpenAI-compatible HTTP API (serving/app.py)."""

    model: str = ""  # HF checkpoint directory or .gguf file
    adapter: str | None = None  # a PEFT LoRA adapter directory applied on top of `model`
    served_model_name: str | None = None  # None: the checkpoint folder's name
    host: str = "127.0.0.1"  # this machine only; 0.0.0.0 opens the port to the network
    port: int = 8000
    api_key: str | None = None  # None: $JAXPATIENCE_API_KEY, else no key
    slots: int = 16  # rows decoded at once (rounded up to a power of two)
    max_model_len: int | None = None  # prompt + max_tokens per slot; None: the model's context
    max_queue: int = 256  # requests waiting for a slot before the server answers 429
    chunk_steps: int = 8  # decode steps between two looks from the host (a new request waits at most this)
    param_dtype: str = "float32"
    compute_dtype: str | None = None
    mesh: MeshConfig | None = None  # None: one device

    def validate(self) -> ServeConfig:
        if not self.model:
            raise ConfigError("serve: model is not set (model=... or --model ...).")
        for key, low in (("port", 0), ("slots", 1), ("max_queue", 1), ("chunk_steps", 1), ("max_model_len", 2)):
            value = getattr(self, key)
            if value is not None and value < low:
                raise ConfigError(f"serve: {key} must be >= {low}, not {value}.")
        if self.port > 65535:
            raise ConfigError(f"serve: port must be <= 65535, not {self.port}.")
        return self


# ---------------------------------------------------------------------------------------------------
# Iterative RPO (recipes/irpo.py, `jaxpatience irpo`).


def _irpo_training() -> RunConfig:
    return RunConfig(epochs=1, train=TrainConfig(loss=LossConfig(dpo_weight=1.0, nll_weight=1.0)))


@dataclasses.dataclass(frozen=True)
class IrpoConfig:
    """sample -> pairs -> DPO+NLL (reference = this iteration's start model) -> evaluate -> merge, repeated.

    `training` is every iteration's train run; its model, out_dir and data.path are set per iteration.
    Its param_dtype / compute_dtype also load the models for sampling and evaluation.
    """

    model: str = ""  # M_0: HF checkpoint directory or .gguf file
    out_dir: str = "out/irpo"
    train_problems: str = ""  # a problems file (.jsonl/.parquet) or a dataset name known to data/problems.py
    eval_problems: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    train_limit: int | None = None
    eval_limit: int | None = None
    iterations: int = 2
    max_pairs_per_problem: int = 10  # K
    prompt_style: str = "zero_shot"  # see data/problems.build_prompt
    generation_batch_size: int = 16  # problems decoded at once (the decoder's slots / num_samples)
    # Self-sampling: N = num_samples solutions per training problem (the paper: 30). The held-out evaluation is
    # greedy with the same max_new_tokens; the seed also draws the pairs.
    sampling: SamplingConfig = dataclasses.field(
        default_factory=lambda: SamplingConfig(temperature=0.8, num_samples=8, max_new_tokens=512)
    )
    training: RunConfig = dataclasses.field(default_factory=_irpo_training)

    def __post_init__(self):
        if self.iterations < 1 or self.sampling.num_samples < 2 or self.max_pairs_per_problem < 1:
            raise ConfigError(
                "irpo: iterations >= 1, sampling.num_samples >= 2 and max_pairs_per_problem >= 1 are needed."
            )
        if self.sampling.temperature <= 0:
            raise ConfigError("irpo: sampling.temperature must be > 0 (greedy samples would all be the same).")
        # iteration i samples with seed + i, and the held-out problems are drawn with seed + 1
        check_range("sampling.seed", self.sampling.seed, 0, SEED_MAX - max(self.iterations, 1))

    def validate(self) -> IrpoConfig:
        for key in ("model", "train_problems", "eval_problems"):
            if not getattr(self, key):
                raise ConfigError(f"irpo: {key} is not set ({key}=PATH).")
        for key in ("train_limit", "eval_limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"irpo: {key} must be at least 1, not {getattr(self, key)!r}.")
        check_output_dir(self.out_dir, "out_dir")
        check_lora_fits(self.training.train.lora, self.model, "training.train.lora.rank")
        return self
