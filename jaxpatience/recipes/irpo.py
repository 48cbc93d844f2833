"""The Iterative RPO loop: `jaxpatience irpo --config X.yaml key=value ...`.

    M_0 = config.model
    iteration t = 1..T:
        OUT/iter_t/samples/    N = sampling.num_samples samples per training problem from M_{t-1} (an evaluation)
        OUT/iter_t/pairs.jsonl (correct, incorrect) pairs, up to K per problem (data/selfplay.py)
        OUT/iter_t/train/      DPO + NLL with LoRA on M_{t-1} (config.training); the reference is M_{t-1} itself
        OUT/iter_t/train/merged   M_t = M_{t-1} with the adapter merged in
        OUT/iter_t/eval/       greedy accuracy of M_t on the held-out problems
    OUT/base_eval/  the same evaluation of M_0; OUT/summary.json and OUT/irpo.png: accuracy per iteration.

Every stage writes its result where a killed run finds it: a rerun skips finished stages and resumes a
stage in progress (the evaluator resumes its JSONL, training resumes from its checkpoint).

Before anything is written, OUT is claimed as an irpo run (durability/outputs.py) and the settings its stages
would refuse later are checked by irpo's own keys (`_check_settings`). An iteration with fewer pairs than one
training batch ends the loop: summary.json says where and why (`stopped`), and so does a line on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from jaxpatience import sharding
from jaxpatience.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    IrpoConfig,
    ModelConfig,
    RunConfig,
    changed_keys,
    command_parser,
    config_from_args,
    load_config,
    read_json,
)
from jaxpatience.data.answers import is_numeric
from jaxpatience.data.problems import build_prompt, load_problems
from jaxpatience.data.selfplay import pairs_from_generations, write_pairs
from jaxpatience.durability import identity, outputs
from jaxpatience.durability.store import read_jsonl
from jaxpatience.evaluation import report
from jaxpatience.evaluation.evaluate import GENERATION_KEYS, evaluate_checkpoint
from jaxpatience.model.tokenizer import load_tokenizer
from jaxpatience.training.loop import train


def load_irpo_config(path: str | Path | None, overrides: list[str]) -> IrpoConfig:
    return load_config(IrpoConfig, path, overrides).validate()


def _problems(source: str, split: str, limit: int | None, seed: int, default_split: str):
    return load_problems(source, split=split, limit=limit, seed=seed, default_split=default_split)


def eval_config(config: IrpoConfig, model_path: str | Path, which: str, out_dir: Path, seed: int) -> EvalConfig:
    """How IRPO evaluates a checkpoint: `which` = "train" draws the iteration's samples (config.sampling) from the
    training problems; "eval" is the greedy held-out evaluation with the same token budget. (The demo evaluates
    its other models this way too, so that they compare with IRPO's rows.)"""
    sampling = config.sampling
    if which == "eval":
        sampling = dataclasses.replace(sampling, temperature=0.0, num_samples=1)
    return EvalConfig(
        model=str(model_path),
        dataset=getattr(config, f"{which}_problems"),
        split=getattr(config, f"{which}_split"),
        limit=getattr(config, f"{which}_limit"),
        out_dir=str(out_dir),
        prompt_style=config.prompt_style,
        generation_batch_size=config.generation_batch_size,
        param_dtype=config.training.param_dtype,
        compute_dtype=config.training.compute_dtype,
        sampling=dataclasses.replace(sampling, seed=seed),
    )


def _evaluate(
    config: IrpoConfig, model_path: str, problems, which: str, out_dir: Path, *, seed: int, progress: bool
) -> dict:
    """One evaluation of a checkpoint (run, resumed, or read back when finished); see `eval_config`."""
    eval_config_ = eval_config(config, model_path, which, out_dir, seed)
    return evaluate_checkpoint(eval_config_, problems, reuse=True, progress=progress, plots=which == "eval")


def _make_pairs(
    config: IrpoConfig, model_path: str, problems, iteration: int, samples_summary: dict, out: Path
) -> dict:
    """pairs.jsonl from the iteration's samples (skipped if it exists); returns the self-play stats.

    Process 0 reads the samples and writes the pairs; every process gets its stats (a broadcast, after the
    pairs file is complete, so that the others' training finds it).
    """
    stats = None
    if sharding.is_main_process():
        stats = _pairs_on_main(config, model_path, problems, iteration, samples_summary, out)
    return sharding.broadcast_json(stats)


def _pairs_on_main(
    config: IrpoConfig, model_path: str, problems, iteration: int, samples_summary: dict, out: Path
) -> dict:
    """Process 0's part of `_make_pairs`: the iteration's prompts rebuilt as the evaluator built them, its samples
    paired by correctness, pairs.jsonl and its stats written."""
    path = out / "pairs.jsonl"
    if path.is_file():  # written last and atomically (selfplay.write_pairs): the stage is done
        return read_json(Path(str(path) + ".stats.json"))
    tokenizer = load_tokenizer(model_path)
    latex = any(not is_numeric(p.answer) for p in problems)  # as the evaluator decides it, once per dataset
    prompts = {p.id: build_prompt(p, tokenizer, config.prompt_style, latex) for p in problems}
    records = read_jsonl(out / "samples" / "generations.jsonl", required=GENERATION_KEYS)
    metric = samples_summary.get("metric", "strict")
    pairs, stats = pairs_from_generations(
        records,
        prompts,
        metric=metric,
        max_pairs=config.max_pairs_per_problem,
        iteration=iteration,
        seed=config.sampling.seed,
    )
    write_pairs(path, pairs, stats)
    print(f"iteration {iteration}: {stats.summary()}")
    return dataclasses.asdict(stats)


def _model_context(model: str) -> int | None:
    """The model's context (positions) from an HF folder's config.json; None for a .gguf file (checked as it loads)."""
    file = Path(model) / "config.json"
    try:
        return ModelConfig.from_hf(file).max_position_embeddings if file.is_file() else None
    except ConfigError:  # not a Qwen2 checkpoint: the loader says so in its own words
        return None


def _check_settings(config: IrpoConfig, context: int | None) -> None:
    """What irpo's stages would refuse only after config.json is written, refused first and by irpo's own keys."""
    if config.training.out_dir != RunConfig().out_dir:
        raise ConfigError(
            "irpo: training.out_dir is irpo's to set (each iteration trains in OUT/iter_N/train); remove it and "
            "set out_dir."
        )
    if not isinstance(config.generation_batch_size, int) or config.generation_batch_size < 1:
        raise ConfigError(f"irpo: generation_batch_size must be >= 1, not {config.generation_batch_size!r}.")
    if context is not None and config.sampling.max_new_tokens >= context:
        raise ConfigError(
            f"irpo: sampling.max_new_tokens={config.sampling.max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {context} positions; lower sampling.max_new_tokens."
        )


def _fitted_data(config: IrpoConfig, context: int | None, train_dir: Path) -> DataConfig:
    """The training data settings: data.max_length left at its default is fitted to the model's context (said
    once); a run already started keeps the length it was started with."""
    data = config.training.data
    saved = train_dir / "config.json"
    if saved.is_file():
        return dataclasses.replace(data, max_length=read_json(saved)["data"]["max_length"])
    if context is None or data.max_length <= context or data.max_length != DataConfig().max_length:
        return data  # fits, or the user's own choice (train warns about it)
    if sharding.is_main_process():
        default = data.max_length
        print(f"irpo: training.data.max_length={context}, the model's context (the default {default} is past it).")
    return dataclasses.replace(data, max_length=context)


def _train(config: IrpoConfig, model_path: str, step_dir: Path, progress: bool, context: int | None) -> None:
    """DPO + NLL on the iteration's pairs with LoRA on M_{t-1}; exports M_t as train/merged (skipped if done)."""
    if (step_dir / "train" / "summary.json").is_file():
        return
    data = _fitted_data(config, context, step_dir / "train")
    run_config = dataclasses.replace(
        config.training,
        model=model_path,
        out_dir=str(step_dir / "train"),
        export_merged=True,
        data=dataclasses.replace(data, path=str(step_dir / "pairs.jsonl"), chat_template=False),
    )
    train(run_config, progress=progress)


def _row(iteration: int, model_path: str, result: dict, stats: dict | None = None) -> dict:
    """One row of the summary: a model's held-out accuracy and response length, and the pairs that made it."""
    row = {
        "iteration": iteration,
        "model": model_path,
        "accuracy": result["accuracy"],
        "accuracy_ci95": result.get("accuracy_ci95"),
        "mean_response_tokens": result["mean_response_tokens"],
    }
    if stats is not None:
        row.update(pairs=stats["pairs"], train_sample_accuracy=stats["sample_accuracy"])
    return row


# What a rerun may change: its speed, where it runs, how many iterations (more extend the run), and the paths of
# its inputs (their content is compared through inputs.json).
RERUNNABLE = (
    "iterations",
    "generation_batch_size",
    "training.distributed",
    "training.log_every",
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "training.report",  # the trackers each iteration's train run reports to (durability/trackers.py)
    "training.train.mesh",
    "training.data.reference_cache",
    "out_dir",
    "model",
    "train_problems",
    "eval_problems",
)


def _check_rerun(out: Path, config: IrpoConfig, inputs: dict) -> None:
    """Refuse to continue `out` under another config or with other inputs (model files, problem sets): its
    finished stages would be reused as if they belonged to this run."""
    saved = out / "config.json"
    if not saved.is_file():
        return
    before, now = read_json(saved), json.loads(json.dumps(dataclasses.asdict(config)))
    changed = [key for key in changed_keys(before, now) if not key.startswith(RERUNNABLE)]
    if changed:
        raise ConfigError(
            f"{out} holds an IRPO run with another config (differs in: {', '.join(changed)}); rerun "
            "with the same config or choose a new out_dir."
        )
    saved_inputs = out / "inputs.json"
    identity.check_same_inputs(
        read_json(saved_inputs) if saved_inputs.is_file() else None,
        inputs,
        out,
        "rerun with the same model and problems, or choose a new out_dir",
    )


def _claim_out_dir(out: Path, config: IrpoConfig, inputs: dict, is_main: bool) -> None:
    """Make `out` this run's: process 0 checks that it is an irpo folder (or none yet; durability/outputs.py)
    holding no other run (`_check_rerun`), and records config.json and inputs.json; every process waits for that."""
    refused = None
    if is_main:  # process 0 decides; every process raises the same sentence
        try:
            sources = {key: getattr(config, key) for key in ("model", "train_problems", "eval_problems")}
            output = outputs.claim_folder(out, "irpo", "run", key="out_dir", inputs=sources)
            _check_rerun(out, config, inputs)
        except ConfigError as err:
            refused = str(err)
    refused = sharding.broadcast_json(refused)
    if refused:
        raise ConfigError(refused)
    if is_main:
        output.mark()
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        (out / "inputs.json").write_text(json.dumps(inputs, indent=2))
    sharding.barrier("irpo start")


def run_irpo(config: IrpoConfig, *, progress: bool = True) -> dict:
    """Run (or resume) every iteration; returns the summary (also OUT/summary.json, plot OUT/irpo.png)."""
    config.validate()
    # Several processes (the same variables as train): every process runs this loop alike; process 0 writes the
    # files. OUT must be a folder every host sees (each reads the pairs and the merged model process 0 wrote).
    distributed = config.training.distributed
    sharding.initialize_distributed(distributed.coordinator_address, distributed.num_processes, distributed.process_id)
    main = sharding.is_main_process()
    out = Path(config.out_dir)
    seed = config.sampling.seed
    context = _model_context(config.model)
    _check_settings(config, context)
    train_problems = _problems(config.train_problems, config.train_split, config.train_limit, seed, "train")
    eval_problems = _problems(config.eval_problems, config.eval_split, config.eval_limit, seed + 1, "test")
    inputs = {
        **identity.model_inputs(config.model),
        "train_problems": identity.problems_fingerprint(train_problems),
        "eval_problems": identity.problems_fingerprint(eval_problems),
    }
    _claim_out_dir(out, config, inputs, main)
    base = _evaluate(config, config.model, eval_problems, "eval", out / "base_eval", seed=seed, progress=progress)
    rows = [_row(0, config.model, base)]
    model_path, stopped = config.model, None
    for iteration in range(1, config.iterations + 1):
        step_dir = out / f"iter_{iteration}"
        samples = _evaluate(
            config, model_path, train_problems, "train", step_dir / "samples", seed=seed + iteration, progress=progress
        )
        stats = _make_pairs(config, model_path, train_problems, iteration, samples, step_dir)
        if stats["pairs"] < config.training.train.batch_size:  # too little to fill one training batch
            stopped = _stop_reason(config, iteration, stats)
            break
        _train(config, model_path, step_dir, progress and main, context)
        sharding.barrier(f"irpo train {iteration}")  # merged/ is written by process 0; every process loads it next
        model_path = str(step_dir / "train" / "merged")
        result = _evaluate(config, model_path, eval_problems, "eval", step_dir / "eval", seed=seed, progress=progress)
        rows.append(_row(iteration, model_path, result, stats))
    summary = {"iterations": rows} | ({"stopped": stopped} if stopped else {})
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        summary["plot"] = report.plot_irpo(rows, out / "irpo.png")
        print(report.irpo_table(rows))
        if stopped:
            print(f"jaxpatience irpo: stopped early: {stopped['reason']}.", file=sys.stderr)
    return summary


def _stop_reason(config: IrpoConfig, iteration: int, stats: dict) -> dict:
    """Why the loop ends at `iteration` (too few pairs for one batch), as summary.json records it."""
    batch = config.training.train.batch_size
    reason = (
        f"iteration {iteration} of {config.iterations} made {stats['pairs']} pairs, fewer than one training batch "
        f"of {batch} ({stats['all_correct']} problems' samples were all right, {stats['all_wrong']} all wrong): "
        "IRPO needs right and wrong samples of the same problem; try more sampling.num_samples, another "
        "sampling.temperature or other train_problems (in a new out_dir)"
    )
    return {"iteration": iteration, "pairs": stats["pairs"], "batch_size": batch, "reason": reason}


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("jaxpatience irpo", "Iterative RPO: sample, pair by correctness, train DPO+NLL, repeat.")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_intermixed_args(argv)
    run_irpo(config_from_args(IrpoConfig, args).validate(), progress=not args.no_progress)
    return 0  # a run that stopped early (summary["stopped"]) has said why on stderr; its rerun stops alike
