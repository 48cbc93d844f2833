"""The Iterative RPO loop: `jaxpatience irpo --config X.yaml key=value ...`.

    M_0 = config.model
    iteration t = 1..T:
        OUT/iter_t/samples/    N samples per training problem from M_{t-1} (the evaluator's resumable JSONL)
        OUT/iter_t/pairs.jsonl (correct, incorrect) pairs, up to K per problem (data/selfplay.py)
        OUT/iter_t/train/      DPO + NLL with LoRA on M_{t-1}; the reference is M_{t-1} itself (adapters off)
        OUT/iter_t/train/merged   M_t = M_{t-1} with the adapter merged in
        OUT/iter_t/eval/       greedy accuracy of M_t on the held-out problems
    OUT/base_eval/  the same evaluation of M_0; OUT/summary.json and OUT/irpo.png: accuracy per iteration.

Every stage writes its result where a killed run finds it: a rerun skips finished stages and resumes a
stage in progress (the evaluator resumes its JSONL, training resumes from its checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from jaxpatience.config import ConfigError, IrpoConfig, RunConfig, apply_overrides, from_dict, load_yaml


def load_irpo_config(path: str | Path | None, overrides: list[str]) -> IrpoConfig:
    data = load_yaml(path) if path else {}
    return from_dict(IrpoConfig, apply_overrides(data, overrides), where=str(path or "config"))


def _problems(source: str, split: str, limit: int | None, seed: int):
    from jaxpatience.data.problems import load_problems

    return load_problems(source, split=split, limit=limit, seed=seed)


def _evaluate(config: IrpoConfig, model_path: str, problems, out_dir: Path, *, samples: int = 1,
              temperature: float = 0.0, seed: int = 0, progress: bool = True) -> dict:  # fmt: skip
    """Run (or resume, or just read) one evaluation of a checkpoint; returns its summary."""
    summary_path = out_dir / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    from jaxpatience.evaluate import evaluate
    from jaxpatience.weights import load_pretrained

    model, tokenizer = load_pretrained(model_path, config.param_dtype, compute_dtype=config.compute_dtype)
    return evaluate(model, tokenizer, problems, out_dir=out_dir, prompt_style=config.prompt_style,
                    max_new_tokens=config.max_new_tokens, batch_size=config.generation_batch_size, samples=samples,
                    temperature=temperature, seed=seed, progress=progress, run_info={"model": model_path},
                    plots=samples == 1)  # fmt: skip


def _make_pairs(config: IrpoConfig, model_path: str, problems, iteration: int, samples_summary: dict,
                out: Path) -> dict:  # fmt: skip
    """pairs.jsonl from the iteration's samples (skipped if it exists); returns the self-play stats."""
    from jaxpatience.answers import is_numeric
    from jaxpatience.data.problems import build_prompt
    from jaxpatience.data.selfplay import pairs_from_generations, write_pairs
    from jaxpatience.evaluate import read_generations
    from jaxpatience.tokenizer import load_tokenizer

    path = out / "pairs.jsonl"
    if path.is_file():
        return json.loads(Path(str(path) + ".stats.json").read_text())
    tokenizer = load_tokenizer(model_path)
    latex = any(not is_numeric(p.answer) for p in problems)  # as the evaluator decides it, once per dataset
    prompts = {p.id: build_prompt(p, tokenizer, config.prompt_style, latex) for p in problems}
    records, _ = read_generations(out / "samples" / "generations.jsonl")
    metric = samples_summary.get("metric", "strict")
    pairs, stats = pairs_from_generations(records, prompts, metric=metric, max_pairs=config.max_pairs_per_problem,
                                          iteration=iteration, seed=config.seed)  # fmt: skip
    write_pairs(path, pairs, stats)
    print(f"iteration {iteration}: {stats.summary()}")
    return dataclasses.asdict(stats)


def run_irpo(config: IrpoConfig, *, progress: bool = True) -> dict:
    """Run (or resume) every iteration; returns the summary (also OUT/summary.json, plot OUT/irpo.png)."""
    import os

    from jaxpatience.run import train

    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("JAX_DISTRIBUTED_AUTO") == "1":
        raise ConfigError(
            "jaxpatience irpo runs on one host (sampling is single-process for now); run its train stage on a pod "
            "with jaxpatience train on each iteration's pairs.jsonl."
        )
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    train_problems = _problems(config.train_problems, config.train_split, config.train_limit, config.seed)
    eval_problems = _problems(config.eval_problems, config.eval_split, config.eval_limit, config.seed + 1)
    base = _evaluate(config, config.model, eval_problems, out / "base_eval", progress=progress)
    rows = [{"iteration": 0, "model": config.model, "accuracy": base["accuracy"],
             "accuracy_ci95": base.get("accuracy_ci95"),
             "mean_response_tokens": base["mean_response_tokens"]}]  # fmt: skip
    model_path = config.model
    for iteration in range(1, config.iterations + 1):
        step_dir = out / f"iter_{iteration}"
        samples = _evaluate(config, model_path, train_problems, step_dir / "samples",
                            samples=config.samples_per_problem, temperature=config.sample_temperature,
                            seed=config.seed + iteration, progress=progress)  # fmt: skip
        stats = _make_pairs(config, model_path, train_problems, iteration, samples, step_dir)
        if stats["pairs"] == 0:
            print(f"iteration {iteration}: no pairs (every problem all right or all wrong); stopping.")
            break
        merged = step_dir / "train" / "merged"
        if not (step_dir / "train" / "summary.json").is_file():
            run_config = RunConfig(
                model=model_path, out_dir=str(step_dir / "train"), train=config.train,
                data=dataclasses.replace(config.data, path=str(step_dir / "pairs.jsonl"), chat_template=False),
                param_dtype=config.param_dtype, compute_dtype=config.compute_dtype, epochs=config.epochs,
                checkpoint_every=config.checkpoint_every, export_merged=True,
            )  # fmt: skip
            train(run_config, progress=progress)
        model_path = str(merged)
        result = _evaluate(config, model_path, eval_problems, step_dir / "eval", progress=progress)
        rows.append({"iteration": iteration, "model": model_path, "accuracy": result["accuracy"],
                     "accuracy_ci95": result.get("accuracy_ci95"), "pairs": stats["pairs"],
                     "train_sample_accuracy": stats["sample_accuracy"],
                     "mean_response_tokens": result["mean_response_tokens"]})  # fmt: skip
    summary = {"iterations": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["plot"] = str(plot_iterations(rows, out / "irpo.png"))
    print(format_table(rows))
    return summary


def format_table(rows: list[dict]) -> str:
    lines = [f"{'iter':>4}  {'accuracy':>8}  {'95% CI':>15}  {'pairs':>6}  {'resp. tokens':>12}"]
    for row in rows:
        ci = row.get("accuracy_ci95")
        ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
        lines.append(f"{row['iteration']:>4}  {row['accuracy']:>8.3f}  {ci_text:>15}  {row.get('pairs', '-'):>6}  "
                     f"{row['mean_response_tokens']:>12.1f}")  # fmt: skip
    return "\n".join(lines)


def plot_iterations(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs = [r["iteration"] for r in rows]
    ys = [r["accuracy"] for r in rows]
    if all(r.get("accuracy_ci95") for r in rows):
        lows = [y - r["accuracy_ci95"][0] for y, r in zip(ys, rows, strict=True)]
        highs = [r["accuracy_ci95"][1] - y for y, r in zip(ys, rows, strict=True)]
        ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3)
    else:
        ax.plot(xs, ys, marker="o")
    ax.set_xlabel("iteration (0 = base model)")
    ax.set_ylabel("held-out accuracy")
    ax.set_xticks(xs)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpatience irpo", description="Iterative RPO: sample, pair, train, repeat.")
    parser.add_argument("--config", help="YAML config; keys not given keep their defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. iterations=3 train.loss.beta=0.1")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    run_irpo(load_irpo_config(args.config, args.overrides), progress=not args.no_progress)
    return 0
