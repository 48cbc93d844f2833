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
  patience_nll/  Patience, the headline row: (patient > concise) pairs from the toy teacher, DPO + NLL with LoRA
               (the NLL term on the chosen answer is Iterative RPO's), then evaluated
  patience/    the same stage with the Patience paper's plain DPO (the ablation: at toy scale it can drive the
               patient answer's own log-prob down with the rejected one's, and lose accuracy; docs/RESULTS.md)
  irpo/        Iterative RPO from the same base: sample, pair by correctness, DPO + NLL, evaluate, repeat
  summary.json, accuracy.png, response_length.png, logps.png, and a table in the terminal

The recipe is configs/toy.yaml; its results and the runs behind it: docs/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from flax import nnx

from jaxpatience.config import (
    ConfigError,
    IrpoConfig,
    ModelConfig,
    RunConfig,
    changed_keys,
    check_output_dir,
    command_parser,
    load_config,
    read_json,
)
from jaxpatience.data import toy
from jaxpatience.durability import outputs
from jaxpatience.durability.metrics import read_metrics
from jaxpatience.durability.store import read_jsonl, write_jsonl
from jaxpatience.evaluation import report
from jaxpatience.evaluation.evaluate import evaluate_checkpoint
from jaxpatience.model.qwen2 import Qwen2ForCausalLM
from jaxpatience.model.tokenizer import NUMBERS_SPLIT_REGEX, train_bpe_tokenizer
from jaxpatience.model.weights import save_pretrained
from jaxpatience.recipes.irpo import eval_config, run_irpo
from jaxpatience.training.loop import train

# The compact ChatML the toy model is trained and evaluated with (Qwen's, without the default system prompt).
TOY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PATIENT_START = "Start with"  # the first words of every patient solution (data/toy.render_patient)
# The Patience row the demo leads with: DPO + NLL held on every run measured; plain DPO fell to 22-48% on four of them
# (docs/RESULTS.md), so it is the second row, the ablation.
HEADLINE = "patience_nll"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's own settings; each stage's training and sampling are the project's own config sections.

    The recipe lives in configs/toy.yaml (`load_demo_config`); these defaults are only its top-level keys'.
    """

    seed: int = 0  # every stage's seed (data order, LoRA init, sampling)
    # the toy world (data/toy.py)
    num_ops: int = 3  # operations per problem
    max_value: int = 20  # every quantity stays in [1, max_value]
    max_operand: int = 5  # amounts found or given away
    eval_problems: int = 200  # held-out, greedy
    patience_pairs: int = 1600
    irpo_problems: int = 256
    # the tokenizer and the base model (a 0.79M-parameter Qwen2 with a vocabulary of about 410 tokens)
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 512
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    sft_patient_steps: int = 500  # phase 1: patient solutions only
    sft_mixed_steps: int = 150  # phase 2: concise-heavy mix (the default style becomes concise)
    sft_concise_share: float = 0.7
    # the headline Patience stage's NLL weight (DPO + NLL); the `patience` section as written is the plain-DPO ablation
    patience_nll_weight: float = 1.0
    # the stages: model, data path and out_dir are filled in by the demo
    sft: RunConfig = dataclasses.field(default_factory=RunConfig)
    patience: RunConfig = dataclasses.field(default_factory=RunConfig)
    irpo: IrpoConfig = dataclasses.field(default_factory=IrpoConfig)

    def __post_init__(self):
        if min(self.eval_problems, self.patience_pairs, self.irpo_problems) < 1:
            raise ConfigError("demo: eval_problems, patience_pairs and irpo_problems must be positive.")
        if min(self.sft_patient_steps, self.sft_mixed_steps) < 0 or self.sft_patient_steps + self.sft_mixed_steps < 1:
            raise ConfigError("demo: sft_patient_steps and sft_mixed_steps must be >= 0, and not both 0.")
        if not 0.0 <= self.sft_concise_share <= 1.0:
            raise ConfigError(f"demo: sft_concise_share must be in [0, 1], not {self.sft_concise_share}.")
        if not self.patience_nll_weight > 0:
            raise ConfigError(f"demo: patience_nll_weight must be > 0, not {self.patience_nll_weight}.")


# A reduced run of the same pipeline for the test suite and a quick look (about a minute on 2 CPU cores; the barely
# trained model's accuracy is whatever it is).
SMALL = (
    "eval_problems=32",
    "hidden_size=64",
    "intermediate_size=128",
    "layers=1",
    "sft_patient_steps=20",
    "sft_mixed_steps=150",
    "sft.train.batch_size=16",
    "sft.train.optimizer.warmup_steps=17",
    "patience_pairs=32",
    "irpo_problems=32",
    "irpo.sampling.num_samples=4",
    "irpo.training.epochs=1",
    "irpo.generation_batch_size=32",
    "irpo.sampling.max_new_tokens=64",
    "irpo.training.train.batch_size=8",
)
TOY_CONFIG = "configs/toy.yaml"


def load_demo_config(
    overrides: list[str] | tuple[str, ...] = (), *, small: bool = False, path: str | Path | None = None
) -> DemoConfig:
    """configs/toy.yaml, then `path` (a YAML file stating what differs from it), then SMALL when `small`, then
    `overrides` (key=value)."""
    # The repository's copy: under the working directory, or next to this package (editable installs).
    candidates = [Path(TOY_CONFIG), Path(__file__).resolve().parents[2] / TOY_CONFIG]
    recipe = next((p for p in candidates if p.is_file()), None)
    if recipe is None and path is None:
        raise ConfigError(f"the demo's recipe {TOY_CONFIG} was not found; run from a clone of the repository.")
    return load_config(DemoConfig, path, [*(SMALL if small else ()), *overrides], base=recipe)


# ---------------------------------------------------------------------------------------------------
# Stage 1: the toy world.


def make_data(config: DemoConfig, out: Path) -> dict[str, Path]:
    """Problems and pairs as JSONL files; every training problem is distinct from the held-out ones."""
    batch = config.sft.train.batch_size
    sft_count = (config.sft_patient_steps + config.sft_mixed_steps) * batch
    counts = {"sft": sft_count, "patience": config.patience_pairs, "irpo": config.irpo_problems}
    train, heldout = toy.make_split(
        config.seed, sum(counts.values()), config.eval_problems, config.num_ops, config.max_value, config.max_operand
    )
    pools, start = {}, 0
    for name, count in counts.items():
        pools[name], start = train[start : start + count], start + count

    rng = random.Random(config.seed)
    phase1 = pools["sft"][: config.sft_patient_steps * batch]
    phase2 = pools["sft"][len(phase1) :]
    sft = [_pair(p, patient_chosen=True) for p in phase1]  # the file's order is the training order
    sft += [_pair(p, patient_chosen=rng.random() >= config.sft_concise_share) for p in phase2]
    files = data_files(out)
    write_jsonl(files["sft"], sft)
    write_jsonl(files["patience"], [_pair(p, True) for p in pools["patience"]])
    write_jsonl(files["irpo"], [p.record() for p in pools["irpo"]])
    corpus = toy.corpus(train[:2000])  # the tokenizer sees training text only
    (out / "corpus.txt").write_text("\n".join(corpus) + "\n")
    write_jsonl(files["heldout"], [p.record() for p in heldout])  # written last: its presence marks the stage done
    return files


def data_files(out: Path) -> dict[str, Path]:
    """The stage's JSONL files: SFT pairs, Patience pairs, IRPO problems and the held-out problems."""
    names = {"sft": "sft_pairs", "patience": "patience_pairs", "irpo": "irpo_problems", "heldout": "heldout"}
    return {key: out / f"{name}.jsonl" for key, name in names.items()}


def _pair(problem: toy.ToyProblem, patient_chosen: bool) -> dict:
    """A pair for the train step. For SFT only `chosen` is trained on (the rejected rows are skipped)."""
    patient, concise = toy.render_patient(problem), toy.render_concise(problem)
    chosen, rejected = (patient, concise) if patient_chosen else (concise, patient)
    return {"prompt": problem.question, "chosen": chosen, "rejected": rejected}


# ---------------------------------------------------------------------------------------------------
# Stage 2: tokenizer, random model, SFT into "the instruct model".


def make_init(config: DemoConfig, data: Path, out: Path) -> Path:
    """The untrained model (init/): a BPE tokenizer trained on the toy corpus, with the toy ChatML template, and
    a random tiny Qwen2 of the configured shape, saved as an HF checkpoint."""
    # Whole numbers as tokens: with Qwen2's digit-by-digit split the tiny model learnt two-digit arithmetic far
    # more slowly (32% vs 77% of patient solutions right after 400 patient-only steps; docs/RESULTS.md).
    texts = (data / "corpus.txt").read_text().splitlines()
    tokenizer = train_bpe_tokenizer(texts, vocab_size=config.vocab_size, split_regex=NUMBERS_SPLIT_REGEX)
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    model_config = ModelConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    model = Qwen2ForCausalLM(model_config, rngs=nnx.Rngs(config.seed))
    return save_pretrained(model, tokenizer, out, overwrite=True)


def _seeded(run: RunConfig, seed: int, data_path: Path | None = None, **changes) -> RunConfig:
    """A stage's RunConfig from its template: the demo's seed for data order and LoRA init, its pairs file
    (`data_path`), plus `changes` (model, out_dir)."""
    data = dataclasses.replace(run.data, seed=seed, **({"path": str(data_path)} if data_path else {}))
    return dataclasses.replace(run, data=data, train=dataclasses.replace(run.train, seed=seed), **changes)


def sft_config(config: DemoConfig, init: Path, pairs: Path, out: Path) -> RunConfig:
    """Full-parameter NLL on the chosen responses, in file order (phase 1 then phase 2), one cosine schedule."""
    return _seeded(config.sft, config.seed, pairs, model=str(init), out_dir=str(out))


# ---------------------------------------------------------------------------------------------------
# Stage 3: Patience (DPO + LoRA on teacher pairs) and Iterative RPO.


def patience_config(config: DemoConfig, base: Path, pairs: Path, out: Path, *, nll: bool = False) -> RunConfig:
    """The Patience stage as configured, or (`nll`) the same with `patience_nll_weight` on the chosen answer."""
    run = config.patience
    if nll:
        loss = dataclasses.replace(run.train.loss, nll_weight=config.patience_nll_weight)
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, loss=loss))
    return _seeded(run, config.seed, pairs, model=str(base), out_dir=str(out))


def irpo_config(config: DemoConfig, base: Path, data: dict[str, Path], out: Path) -> IrpoConfig:
    """IRPO from the base model on the toy problems; run_irpo sets each iteration's pairs file."""
    irpo = config.irpo
    return dataclasses.replace(
        irpo,
        model=str(base),
        out_dir=str(out),
        train_problems=str(data["irpo"]),
        eval_problems=str(data["heldout"]),
        sampling=dataclasses.replace(irpo.sampling, seed=config.seed),
        training=_seeded(irpo.training, config.seed),
    )


def evaluate_model(irpo: IrpoConfig, model_path: Path, out: Path, *, prefix: str = "", progress: bool = True) -> dict:
    """Greedy held-out accuracy (resumable; read back when done), exactly as IRPO evaluates its iterations
    (irpo.eval_config). `prefix` starts every answer for the model (not counted as response)."""
    config = eval_config(irpo, model_path, "eval", out, seed=irpo.sampling.seed)
    return evaluate_checkpoint(config, answer_prefix=prefix, reuse=True, progress=progress)


# ---------------------------------------------------------------------------------------------------
# The whole pipeline.


def run_demo(config: DemoConfig, out: str | Path, *, progress: bool = True) -> dict:
    """Run (or resume) every stage; returns the summary (also OUT/summary.json) and writes the plots."""
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
    irpo_run = irpo_config(config, base_model, files, out / "irpo")  # IRPO, and how every stage is evaluated

    rows = {}
    outputs.mark(out / "irpo", "irpo", "run")  # the demo's own IRPO run, begun by its base evaluation
    with timings.stage("base_eval", done=(out / "irpo" / "base_eval" / "summary.json").is_file()) as skip:
        _banner("base model: held-out accuracy", skip)
        rows["base"] = evaluate_model(irpo_run, base_model, out / "irpo" / "base_eval", progress=progress)
    with timings.stage("forced_eval", done=(out / "forced_eval" / "summary.json").is_file()) as skip:
        _banner(f"base model, answer started with {PATIENT_START!r}: the latent skill", skip)
        rows["forced"] = evaluate_model(
            irpo_run, base_model, out / "forced_eval", prefix=PATIENT_START, progress=progress
        )
    for name, nll in (("patience_nll", True), ("patience", False)):  # the headline first
        rows[name] = _patience_stage(config, base_model, files["patience"], out, irpo_run, timings, name, nll, progress)
    with timings.stage("irpo", done=(out / "irpo" / "summary.json").is_file()) as skip:
        _banner("Iterative RPO from the same base: sample, pair by correctness, DPO + NLL, evaluate", skip)
        irpo = run_irpo(irpo_run, progress=progress)
    return report_demo(config, out, rows, irpo["iterations"][1:], timings.load())


def _patience_stage(
    config: DemoConfig,
    base: Path,
    pairs: Path,
    out: Path,
    irpo_run: IrpoConfig,
    timings: _Timings,
    name: str,
    nll: bool,
    progress: bool,
) -> dict:
    """Train (OUT/NAME) and evaluate (OUT/NAME_eval) one Patience model: DPO + LoRA, with an NLL term if `nll`."""
    loss = "DPO + NLL" if nll else "DPO"
    with timings.stage(f"{name}_train", done=(out / name / "summary.json").is_file()) as skip:
        if not skip:
            _banner(f"Patience ({loss}): LoRA on (patient > concise) pairs")
            train(patience_config(config, base, pairs, out / name, nll=nll), progress=progress)
    with timings.stage(f"{name}_eval", done=(out / f"{name}_eval" / "summary.json").is_file()) as skip:
        _banner(f"Patience model ({loss}): held-out accuracy", skip)
        return evaluate_model(irpo_run, out / name / "merged", out / f"{name}_eval", progress=progress)


class _Timings:
    """Wall seconds of each stage as it ran (kept across reruns: a resumed demo reports the original times)."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, float]:
        return read_json(self.path) if self.path.is_file() else {}

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
    """Refuse an `out` that is not the demo's (durability/outputs.py), or to resume it with other settings (its
    finished stages would be reused); record them if new."""
    output = outputs.claim_folder(out, "demo", "run", key="--out")
    path = out / "demo_config.json"
    current = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists, as the file holds them
    if path.is_file():
        saved = read_json(path)
        if saved != current:
            changed = changed_keys(saved, current)
            raise ConfigError(
                f"{out} holds a demo run with other settings ({', '.join(changed)}); use another --out or --overwrite."
            )
    output.mark()
    path.write_text(json.dumps(current, indent=2))


# ---------------------------------------------------------------------------------------------------
# The report (tables and plots are drawn by evaluation/report.py).


def _row(summary: dict, generations: Path, seconds: float | None, prefix: str = "") -> dict:
    """One stage's line of the report: its evaluation's numbers, its wall time, and the share of its answers
    that are patient (start with PATIENT_START, counting the `prefix` the model was given)."""
    responses = [record["response"] for record in read_jsonl(generations)]
    patient = sum((prefix + r).lstrip().startswith(PATIENT_START) for r in responses) / max(len(responses), 1)
    return {
        "accuracy": summary["accuracy"],
        "accuracy_ci95": summary["accuracy_ci95"],
        "mean_response_tokens": summary["mean_response_tokens"],
        "patient_share": patient,
        "n": summary["n_problems"],
        "wall_s": seconds,
    }


def report_demo(config: DemoConfig, out: Path, rows: dict, irpo_rows: list[dict], times: dict) -> dict:
    """summary.json, the plots and the terminal table from every stage's results."""
    irpo_dir = out / "irpo"
    base = _row(rows["base"], irpo_dir / "base_eval" / "generations.jsonl", times.get("base_sft"))
    forced = _row(rows["forced"], out / "forced_eval" / "generations.jsonl", times.get("forced_eval"), PATIENT_START)
    patience = {
        name: _row(rows[name], out / f"{name}_eval" / "generations.jsonl", times.get(f"{name}_train"))
        for name in ("patience", "patience_nll")
    }
    irpo = []
    for row in irpo_rows:
        it = row["iteration"]
        summary = json.loads((irpo_dir / f"iter_{it}" / "eval" / "summary.json").read_text())
        entry = _row(summary, irpo_dir / f"iter_{it}" / "eval" / "generations.jsonl", None)
        entry.update(iteration=it, pairs=row["pairs"], train_sample_accuracy=row["train_sample_accuracy"])
        irpo.append(entry)
    if irpo:  # the IRPO stage's time is reported once, on its first row, for all of its iterations
        irpo[0]["wall_s"] = times.get("irpo")
    summary = {
        "seed": config.seed,
        "headline": HEADLINE,
        "base": base,
        "base_forced_patient_start": forced,
        **patience,
        "irpo": irpo,
        "stage_s": times,
        "wall_s": sum(times.values()),
        "config": dataclasses.asdict(config),
    }
    summary["plots"] = _plots(summary, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + report.demo_table(summary))
    return summary


def _plots(summary: dict, out: Path) -> dict[str, str]:
    """accuracy.png (per stage), response_length.png (base vs Patience), logps.png (the Patience runs' DPO vs
    DPO + NLL: chosen and rejected log-probs apart, so that the chosen one's scale shows; then IRPO's iterations)."""
    stages = [("base", summary["base"]), ("Patience", summary["patience_nll"]), ("plain DPO", summary["patience"])]
    stages += [(f"IRPO {r['iteration']}", r) for r in summary["irpo"]]
    folders = {
        "base": out / "irpo" / "base_eval",
        "Patience (DPO + NLL)": out / "patience_nll_eval",
        "plain DPO": out / "patience_eval",
    }
    lengths = {
        name: [r["response_tokens"] for r in read_jsonl(folder / "generations.jsonl")]
        for name, folder in folders.items()
    }
    ablation = {
        "Patience, DPO": read_metrics(out / "patience" / "metrics.jsonl"),
        "Patience, DPO + NLL": read_metrics(out / "patience_nll" / "metrics.jsonl"),
    }
    irpo = {
        f"IRPO {r['iteration']}": read_metrics(out / "irpo" / f"iter_{r['iteration']}" / "train" / "metrics.jsonl")
        for r in summary["irpo"]
    }
    max_tokens = summary["config"]["irpo"]["sampling"]["max_new_tokens"]
    return {
        "accuracy": report.plot_stage_accuracy(stages, out / "accuracy.png"),
        "response_length": report.plot_response_lengths(lengths, max_tokens, out / "response_length.png"),
        "logps": report.plot_logps(
            {
                "Patience: the chosen answer's log-prob": (ablation, ["chosen"]),
                "Patience: the rejected answer's": (ablation, ["rejected"]),
                "Iterative RPO": (irpo, ["chosen", "rejected"]),
            },
            out / "logps.png",
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        "jaxpatience demo", __doc__.split("\n")[0], config_help=f"the recipe (default: {TOY_CONFIG})"
    )
    parser.add_argument("--out", default="out/demo", help="output folder (a rerun resumes it)")
    parser.add_argument("--seed", type=int, help="every stage's seed (= seed=S)")
    parser.add_argument("--small", action="store_true", help="a reduced run (about a minute on 2 cores)")
    parser.add_argument("--overwrite", action="store_true", help="delete --out first")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_intermixed_args(argv)
    overrides = [*([f"seed={args.seed}"] if args.seed is not None else []), *args.overrides]
    config = load_demo_config(overrides, small=args.small, path=args.config)
    check_output_dir(args.out, "--out")
    outputs.claim_folder(args.out, "demo", "run", key="--out")  # --overwrite deletes only the demo's own folder
    if args.overwrite and Path(args.out).exists():
        shutil.rmtree(args.out)
    run_demo(config, args.out, progress=not args.no_progress)
    return 0
