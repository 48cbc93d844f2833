"""The embedded default: both papers' effects, end to end, at toy scale on a laptop CPU (`jaxpatience demo`).

    jaxpatience demo --out out/demo [--seed S] [--small] [key=value ...]

Stages (each skipped on a rerun once its output exists, and resumed if it was interrupted):
  data/        the toy world (data/toy.py): SFT pairs, Patience pairs, IRPO training problems, held-out problems
  init/        a BPE tokenizer trained on the toy corpus (ChatML, no system prompt) and a random tiny Qwen2
  base/        "the instruct model": full-parameter SFT with the project's train step, first on patient
               solutions only, then on a concise-heavy mix, so that it answers concisely by default
               (base/merged is an ordinary HF checkpoint)
  irpo/base_eval/    the base model on the held-out problems (greedy); also iteration 0 of IRPO
  forced_eval/ the base model with its answer started for it ("Start with"): the latent patient skill
  patience/    Patience: (patient > concise) pairs from the toy teacher, DPO + LoRA, then evaluated
  irpo/        Iterative RPO from the same base: sample, pair by correctness, DPO + NLL, evaluate, repeat
  summary.json, accuracy.png, response_length.png, logps.png, and a table in the terminal

Facts behind the recipe (two SFT phases, DPO with β 0.1, sizes): shared/notes/toy-findings.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from jaxpatience.config import (
    ConfigError,
    DataConfig,
    IrpoConfig,
    LoraConfig,
    LossConfig,
    OptimizerConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
)
from jaxpatience.data import toy

# The compact ChatML the toy model is trained and evaluated with (Qwen's, without the default system prompt).
TOY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PATIENT_START = "Start with"  # the first words of every patient solution (data/toy.render_patient)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    num_ops: int = 3  # operations per problem
    max_value: int = 30  # every quantity stays in [1, max_value]
    max_operand: int = 9  # amounts found or given away
    eval_problems: int = 300  # held-out, greedy
    max_length: int = 96  # prompt + response tokens (one bucket)
    max_new_tokens: int = 96
    # tokenizer and base model (a 0.79M-parameter Qwen2 with a 432-token vocabulary)
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 512
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    sft_patient_steps: int = 400  # phase 1: patient solutions only
    sft_mixed_steps: int = 200  # phase 2: concise-heavy mix (the default style becomes concise)
    sft_concise_share: float = 0.8
    sft_batch_size: int = 32
    sft_learning_rate: float = 6e-3
    # Patience: DPO + LoRA on teacher pairs
    patience_pairs: int = 1600
    patience_batch_size: int = 16
    patience_learning_rate: float = 1e-3
    patience_beta: float = 0.1
    patience_nll_weight: float = 0.0  # the Patience paper's loss is plain DPO
    lora_rank: int = 16
    # Iterative RPO: self-sampling, DPO + NLL + LoRA
    irpo_iterations: int = 2
    irpo_problems: int = 256
    irpo_samples: int = 8
    irpo_max_pairs: int = 8
    irpo_temperature: float = 1.0
    irpo_batch_size: int = 16
    irpo_learning_rate: float = 3e-3
    irpo_epochs: int = 2
    generation_batch_size: int = 128  # problems per generation batch

    def __post_init__(self):
        if min(self.eval_problems, self.sft_batch_size, self.patience_pairs, self.irpo_problems) < 1:
            raise ConfigError("demo: problem counts and batch sizes must be positive.")
        if self.irpo_iterations < 1 or self.irpo_samples < 2:
            raise ConfigError("demo: irpo_iterations >= 1 and irpo_samples >= 2.")
        if not 0.0 <= self.sft_concise_share <= 1.0:
            raise ConfigError(f"demo: sft_concise_share must be in [0, 1], not {self.sft_concise_share}.")


# A reduced run of the same pipeline for the test suite and a quick look (about 40 s; the barely trained model's
# accuracy is whatever it is, ~16% for seed 0).
SMALL = dict(eval_problems=32, hidden_size=64, intermediate_size=128, layers=1, sft_patient_steps=20,
             sft_mixed_steps=150, sft_batch_size=16, patience_pairs=32, irpo_problems=32, irpo_samples=4,
             irpo_epochs=1, generation_batch_size=32, max_new_tokens=64)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Stage 1: the toy world.


def make_data(config: DemoConfig, out: Path) -> dict[str, Path]:
    """Problems and pairs as JSONL files; every training problem is distinct from the held-out ones."""
    sft_count = (config.sft_patient_steps + config.sft_mixed_steps) * config.sft_batch_size
    counts = {"sft": sft_count, "patience": config.patience_pairs, "irpo": config.irpo_problems}
    train, heldout = toy.make_split(
        config.seed, sum(counts.values()), config.eval_problems, config.num_ops, config.max_value, config.max_operand
    )
    pools, start = {}, 0
    for name, count in counts.items():
        pools[name], start = train[start : start + count], start + count

    rng = random.Random(config.seed)
    phase1 = pools["sft"][: config.sft_patient_steps * config.sft_batch_size]
    phase2 = pools["sft"][len(phase1) :]
    sft = [_pair(p, patient_chosen=True) for p in phase1]  # the file's order is the training order
    sft += [_pair(p, patient_chosen=rng.random() >= config.sft_concise_share) for p in phase2]
    files = data_files(out)
    _write_jsonl(files["sft"], sft)
    _write_jsonl(files["patience"], [_pair(p, True) for p in pools["patience"]])
    _write_jsonl(files["irpo"], [p.record() for p in pools["irpo"]])
    corpus = toy.corpus(train[:2000])  # the tokenizer sees training text only
    (out / "corpus.txt").write_text("\n".join(corpus) + "\n")
    _write_jsonl(files["heldout"], [p.record() for p in heldout])  # written last: its presence marks the stage done
    return files


def data_files(out: Path) -> dict[str, Path]:
    names = {"sft": "sft_pairs", "patience": "patience_pairs", "irpo": "irpo_problems", "heldout": "heldout"}
    return {key: out / f"{name}.jsonl" for key, name in names.items()}


def _pair(problem: toy.ToyProblem, patient_chosen: bool) -> dict:
    """A pair for the train step. For SFT only `chosen` is trained on (the rejected rows are skipped)."""
    patient, concise = toy.render_patient(problem), toy.render_concise(problem)
    chosen, rejected = (patient, concise) if patient_chosen else (concise, patient)
    return {"prompt": problem.question, "chosen": chosen, "rejected": rejected}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------
# Stage 2: tokenizer, random model, SFT into "the instruct model".


def make_init(config: DemoConfig, data: Path, out: Path) -> Path:
    from flax import nnx

    from jaxpatience.config import ModelConfig
    from jaxpatience.model import Qwen2ForCausalLM
    from jaxpatience.tokenizer import NUMBERS_SPLIT_REGEX, train_bpe_tokenizer
    from jaxpatience.weights import save_pretrained

    # Whole numbers as tokens: with Qwen2's digit-by-digit split the tiny model learnt two-digit arithmetic far
    # more slowly (32% vs 77% of patient solutions right after 400 patient-only steps; docs/RESULTS.md).
    texts = (data / "corpus.txt").read_text().splitlines()
    tokenizer = train_bpe_tokenizer(texts, vocab_size=config.vocab_size, split_regex=NUMBERS_SPLIT_REGEX)
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    model_config = ModelConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        tie_word_embeddings=True, max_position_embeddings=512,
    )  # fmt: skip
    model = Qwen2ForCausalLM(model_config, rngs=nnx.Rngs(config.seed))
    return save_pretrained(model, tokenizer, out, overwrite=True)


def _data(path: Path | None, config: DemoConfig, shuffle: bool = True) -> DataConfig:
    return DataConfig(path=str(path or ""), max_length=config.max_length, max_prompt_length=config.max_length // 2,
                      buckets=(config.max_length,), seed=config.seed, shuffle=shuffle)  # fmt: skip


def sft_config(config: DemoConfig, init: Path, pairs: Path, out: Path) -> RunConfig:
    """Full-parameter NLL on the chosen responses, in file order (phase 1 then phase 2), one cosine schedule."""
    steps = config.sft_patient_steps + config.sft_mixed_steps
    train = TrainConfig(
        lora=None, loss=LossConfig(dpo_weight=0.0, nll_weight=1.0, nll_normalization="token"),
        optimizer=OptimizerConfig(learning_rate=config.sft_learning_rate, warmup_steps=min(50, steps // 10),
                                  weight_decay=0.01, b2=0.95),
        batch_size=config.sft_batch_size, max_steps=steps, seed=config.seed,
    )  # fmt: skip
    return RunConfig(model=str(init), out_dir=str(out), data=_data(pairs, config, shuffle=False), train=train,
                     epochs=1, checkpoint_every=200, keep_checkpoints=1, log_every=10)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Stage 3: Patience (DPO + LoRA on teacher pairs) and Iterative RPO.


def _lora_train(config: DemoConfig, lr: float, batch_size: int, loss: LossConfig) -> TrainConfig:
    return TrainConfig(
        lora=LoraConfig(rank=config.lora_rank, alpha=2.0 * config.lora_rank), loss=loss, batch_size=batch_size,
        optimizer=OptimizerConfig(learning_rate=lr, warmup_steps=5), seed=config.seed,
    )  # fmt: skip


def patience_config(config: DemoConfig, base: Path, pairs: Path, out: Path) -> RunConfig:
    loss = LossConfig(beta=config.patience_beta, nll_weight=config.patience_nll_weight)
    train = _lora_train(config, config.patience_learning_rate, config.patience_batch_size, loss)
    return RunConfig(model=str(base), out_dir=str(out), data=_data(pairs, config), train=train, epochs=1,
                     export_merged=True, log_every=1)  # fmt: skip


def irpo_config(config: DemoConfig, base: Path, data: dict[str, Path], out: Path) -> IrpoConfig:
    loss = LossConfig(beta=0.1, nll_weight=1.0)
    return IrpoConfig(
        model=str(base), out_dir=str(out), train_problems=str(data["irpo"]), eval_problems=str(data["heldout"]),
        iterations=config.irpo_iterations, samples_per_problem=config.irpo_samples,
        max_pairs_per_problem=config.irpo_max_pairs, sample_temperature=config.irpo_temperature,
        max_new_tokens=config.max_new_tokens, generation_batch_size=config.generation_batch_size,
        prompt_style="question", seed=config.seed,
        train=_lora_train(config, config.irpo_learning_rate, config.irpo_batch_size, loss),
        data=_data(None, config), epochs=config.irpo_epochs,  # run_irpo sets each iteration's pairs file
    )  # fmt: skip


def evaluate_model(config: DemoConfig, model_path: Path, heldout: Path, out: Path, *, prefix: str = "",
                   progress: bool = True) -> dict:  # fmt: skip
    """Greedy held-out accuracy (resumable). `prefix` starts every answer for the model (not counted as response)."""
    summary_path = out / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    from jaxpatience.data.problems import load_problems
    from jaxpatience.evaluate import evaluate
    from jaxpatience.weights import load_pretrained

    model, tokenizer = load_pretrained(str(model_path))
    problems = load_problems(str(heldout))

    def prompt(problem) -> str:
        messages = [{"role": "user", "content": problem.question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix

    return evaluate(model, tokenizer, problems, out_dir=out, prompt_style=prompt if prefix else "question",
                    max_new_tokens=config.max_new_tokens, batch_size=config.generation_batch_size,
                    progress=progress, run_info={"model": str(model_path), "prefix": prefix})  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# The whole pipeline.


def run_demo(config: DemoConfig, out: str | Path, *, progress: bool = True) -> dict:
    """Run (or resume) every stage; returns the summary (also OUT/summary.json) and writes the plots."""
    from jaxpatience.irpo import run_irpo
    from jaxpatience.run import train

    out = Path(out)
    _check_same_config(config, out)
    timings = _Timings(out / "timings.json")
    data_dir, init_dir, base_dir = out / "data", out / "init", out / "base"
    files = data_files(data_dir)
    with timings.stage("data", done=files["heldout"].is_file()) as skip:
        if not skip:
            data_dir.mkdir(parents=True, exist_ok=True)
            make_data(config, data_dir)
    with timings.stage("init", done=(init_dir / "config.json").is_file()) as skip:
        if not skip:
            make_init(config, data_dir, init_dir)
    with timings.stage("base_sft", done=(base_dir / "summary.json").is_file()) as skip:
        if not skip:
            _banner("base model: full-parameter SFT, patient-only phase then concise-heavy mix")
            train(sft_config(config, init_dir, files["sft"], base_dir), progress=progress)
    base_model = base_dir / "merged"

    rows = {}
    with timings.stage("base_eval", done=(out / "irpo" / "base_eval" / "summary.json").is_file()) as skip:
        _banner("base model: held-out accuracy", skip)
        rows["base"] = evaluate_model(config, base_model, files["heldout"], out / "irpo" / "base_eval",
                                      progress=progress)  # fmt: skip
    with timings.stage("forced_eval", done=(out / "forced_eval" / "summary.json").is_file()) as skip:
        _banner(f"base model, answer started with {PATIENT_START!r}: the latent skill", skip)
        rows["forced"] = evaluate_model(config, base_model, files["heldout"], out / "forced_eval",
                                        prefix=PATIENT_START, progress=progress)  # fmt: skip
    with timings.stage("patience_train", done=(out / "patience" / "summary.json").is_file()) as skip:
        if not skip:
            _banner("Patience: DPO + LoRA on (patient > concise) pairs")
            train(patience_config(config, base_model, files["patience"], out / "patience"), progress=progress)
    with timings.stage("patience_eval", done=(out / "patience_eval" / "summary.json").is_file()) as skip:
        _banner("Patience model: held-out accuracy", skip)
        rows["patience"] = evaluate_model(config, out / "patience" / "merged", files["heldout"],
                                          out / "patience_eval", progress=progress)  # fmt: skip
    with timings.stage("irpo", done=(out / "irpo" / "summary.json").is_file()) as skip:
        _banner("Iterative RPO from the same base: sample, pair by correctness, DPO + NLL, evaluate", skip)
        irpo = run_irpo(irpo_config(config, base_model, files, out / "irpo"), progress=progress)
    return report(config, out, rows, irpo["iterations"][1:], timings.load())


class _Timings:
    """Wall seconds of each stage as it ran (kept across reruns: a resumed demo reports the original times)."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, float]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    @contextlib.contextmanager
    def stage(self, name: str, done: bool) -> Iterator[bool]:
        """Yields whether the stage was done before; records the time of a stage that ran and finished."""
        start = time.perf_counter()
        yield done
        if not done:
            times = self.load()
            times[name] = times.get(name, 0.0) + time.perf_counter() - start
            self.path.write_text(json.dumps(times, indent=2))


def _banner(text: str, done: bool = False) -> None:
    print(f"\n== {text}" + (" (done before; reading the result)" if done else ""), flush=True)


def _check_same_config(config: DemoConfig, out: Path) -> None:
    path = out / "demo_config.json"
    current = dataclasses.asdict(config)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise ConfigError(f"{out} holds a demo run with other settings ({', '.join(changed)}); "
                              f"use another --out or --overwrite.")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2))


# ---------------------------------------------------------------------------------------------------
# The report.


def _row(summary: dict, generations: Path, seconds: float | None, prefix: str = "") -> dict:
    responses = [json.loads(line)["response"] for line in generations.read_text().splitlines() if line.strip()]
    patient = sum((prefix + r).lstrip().startswith(PATIENT_START) for r in responses) / max(len(responses), 1)
    return {"accuracy": summary["accuracy"], "accuracy_ci95": summary["accuracy_ci95"],
            "mean_response_tokens": summary["mean_response_tokens"], "patient_share": patient,
            "n": summary["n_problems"], "wall_s": seconds}  # fmt: skip


def report(config: DemoConfig, out: Path, rows: dict, irpo_rows: list[dict], times: dict) -> dict:
    irpo_dir = out / "irpo"
    base = _row(rows["base"], irpo_dir / "base_eval" / "generations.jsonl", times.get("base_sft"))
    forced = _row(rows["forced"], out / "forced_eval" / "generations.jsonl", times.get("forced_eval"), PATIENT_START)
    patience = _row(rows["patience"], out / "patience_eval" / "generations.jsonl", times.get("patience_train"))
    irpo = []
    for row in irpo_rows:
        it = row["iteration"]
        summary = json.loads((irpo_dir / f"iter_{it}" / "eval" / "summary.json").read_text())
        entry = _row(summary, irpo_dir / f"iter_{it}" / "eval" / "generations.jsonl", None)
        entry.update(iteration=it, pairs=row["pairs"], train_sample_accuracy=row["train_sample_accuracy"])
        irpo.append(entry)
    if irpo:  # the IRPO stage's time is reported once, on its first row, for all of its iterations
        irpo[0]["wall_s"] = times.get("irpo")
    summary = {"seed": config.seed, "base": base, "base_forced_patient_start": forced, "patience": patience,
               "irpo": irpo, "stage_s": times, "wall_s": sum(times.values()),
               "config": dataclasses.asdict(config)}  # fmt: skip
    summary["plots"] = write_plots(summary, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + format_table(summary))
    return summary


def format_table(summary: dict) -> str:
    lines = [f"{'stage':<30} {'accuracy':>8}  {'95% CI':>13}  {'patient':>7}  {'resp. tokens':>12}  {'wall s':>7}"]
    named = [("base (SFT, concise default)", summary["base"]),
             ("base, answer started", summary["base_forced_patient_start"]),
             ("Patience (DPO + LoRA)", summary["patience"])]  # fmt: skip
    named += [(f"IRPO iteration {r['iteration']} ({r['pairs']} pairs)", r) for r in summary["irpo"]]
    for name, r in named:
        low, high = r["accuracy_ci95"]
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else ""
        lines.append(f"{name:<30} {r['accuracy']:>8.3f}  [{low:.2f}, {high:.2f}]  {r['patient_share']:>7.0%}  "
                     f"{r['mean_response_tokens']:>12.1f}  {wall:>7}")  # fmt: skip
    lines.append(f"(wall s: the stage's training, or IRPO's iterations all told; whole demo {summary['wall_s']:.0f} s)")
    return "\n".join(lines)


def write_plots(summary: dict, out: Path) -> dict[str, str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from jaxpatience.metrics import read_metrics

    def figure(width: float = 6.0) -> tuple[Figure, object]:
        fig = Figure(figsize=(width, 4))
        FigureCanvasAgg(fig)
        return fig, fig.add_subplot()

    paths = {name: str(out / f"{name}.png") for name in ("accuracy", "response_length", "logps")}
    fig, ax = figure(7)
    stages = [("base", summary["base"]), ("Patience", summary["patience"])]
    stages += [(f"IRPO {r['iteration']}", r) for r in summary["irpo"]]
    ys = [r["accuracy"] for _, r in stages]
    errors = [[y - r["accuracy_ci95"][0] for y, (_, r) in zip(ys, stages, strict=True)],
              [r["accuracy_ci95"][1] - y for y, (_, r) in zip(ys, stages, strict=True)]]  # fmt: skip
    colors = ["grey", "C0"] + ["C1"] * len(summary["irpo"])
    ax.bar([name for name, _ in stages], ys, yerr=errors, capsize=4, color=colors)
    ax.set(ylabel="held-out accuracy (95% CI)", ylim=(0, 1), title="Accuracy per stage")
    fig.savefig(paths["accuracy"], dpi=100, bbox_inches="tight")

    fig, ax = figure()
    for name, folder in (("base", out / "irpo" / "base_eval"), ("Patience", out / "patience_eval")):
        lines = (folder / "generations.jsonl").read_text().splitlines()
        lengths = [json.loads(line)["response_tokens"] for line in lines if line.strip()]
        ax.hist(lengths, bins=range(0, summary["config"]["max_new_tokens"] + 8, 4), alpha=0.6, label=name)
    ax.set(xlabel="response length (tokens)", ylabel="held-out responses", title="Response length before / after")
    ax.legend()
    fig.savefig(paths["response_length"], dpi=100, bbox_inches="tight")

    fig, ax = figure(7)
    runs = [("Patience", out / "patience")]
    runs += [(f"IRPO {r['iteration']}", out / "irpo" / f"iter_{r['iteration']}" / "train") for r in summary["irpo"]]
    for i, (name, folder) in enumerate(runs):
        records = read_metrics(folder / "metrics.jsonl")
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["logps/chosen"] for r in records], color=f"C{i}", label=f"{name}: chosen")
        ax.plot(steps, [r["logps/rejected"] for r in records], color=f"C{i}", linestyle="--", label=f"{name}: rejected")
    ax.set(xlabel="training step", ylabel="sequence log-prob (policy)", title="Chosen / rejected log-probs")
    ax.legend(fontsize=8)
    fig.savefig(paths["logps"], dpi=100, bbox_inches="tight")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpatience demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/demo", help="output folder (a rerun resumes it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="a reduced run of the same pipeline (about a minute)")
    parser.add_argument("--overwrite", action="store_true", help="delete --out first")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="DemoConfig fields, e.g. eval_problems=500")
    args = parser.parse_args(argv)
    values = apply_overrides({**(SMALL if args.small else {}), "seed": args.seed}, args.overrides)
    config = from_dict(DemoConfig, values, where="demo")
    if args.overwrite and Path(args.out).exists():
        shutil.rmtree(args.out)
    run_demo(config, args.out, progress=not args.no_progress)
    return 0
