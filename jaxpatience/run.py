"""A training run: `jaxpatience train --config configs/X.yaml key=value ...`.

config -> (multi-host start) -> mesh -> model -> PairLoader -> Trainer (train.py) -> loop -> checkpoints -> export.

* The loop resumes exactly: the latest orbax checkpoint in OUT/checkpoints holds the train state (adapters or
  all weights, optimizer state, step) and, as JSON, the loader state and the config; a resumed run sees the
  batches it would have seen. Restoring reads each array straight into this run's shardings, so the mesh may
  differ from the one that wrote the checkpoint.
* Multi-host: every process runs this same program. Each reads only its rows of every global batch; the rows
  become one global array with `jax.make_array_from_process_local_data`. Checkpoints are written collectively.
* Metrics: OUT/metrics.jsonl (+ TensorBoard when tensorboardX is installed), a progress bar, and at the end
  OUT/training.png (loss and chosen/rejected log-probs over steps).
* Export at the end: OUT/adapter (PEFT format) with LoRA, OUT/merged (HF checkpoint) when `export_merged`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from jaxpatience.config import ConfigError, RunConfig, apply_overrides, from_dict, load_yaml

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


def load_run_config(path: str | Path | None, overrides: list[str]) -> RunConfig:
    """A RunConfig from a YAML file (optional) and `section.key=value` overrides; strict about unknown keys."""
    data = load_yaml(path) if path else {}
    return from_dict(RunConfig, apply_overrides(data, overrides), where=str(path or "config"))


def _global_batch(batch: dict, mesh, process_count: int) -> dict:
    """This host's rows -> global arrays (multi-host); single-process batches stay numpy (train.py places them)."""
    if process_count == 1:
        return batch
    import jax

    from jaxpatience.train import batch_sharding

    target = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(target, v) for k, v in batch.items()}


def precompute_reference(trainer, loader) -> dict:
    """Reference log-probs [N, 2] of every pair under the *initial* model (adapters off), computed once.

    Needed for full-parameter DPO (no adapters to switch off); with LoRA it saves the reference forward in
    every step. Pairs are batched by bucket; the last batch of a bucket repeats pairs to keep shapes fixed.
    """
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxpatience.train import make_logps_fn

    logps_fn = make_logps_fn(trainer, adapters=False)
    table = np.zeros((len(loader.pairs), 2), np.float32)
    by_bucket: dict[int, list[int]] = {}
    for index, pair in enumerate(loader.pairs):
        by_bucket.setdefault(loader._bucket_of(pair.length), []).append(index)
    for bucket, indices in by_bucket.items():
        for start in range(0, len(indices), loader.batch_size):
            chunk = indices[start : start + loader.batch_size]
            padded = np.resize(np.asarray(chunk), loader.batch_size)  # repeat to a full batch
            batch = loader.make_batch(bucket, padded)
            global_batch = _global_batch({k: batch[k] for k in BATCH_KEYS}, trainer.mesh, loader.process_count)
            values = logps_fn(global_batch)
            if not values.is_fully_addressable:
                values = multihost_utils.process_allgather(values, tiled=True)
            table[padded[: len(chunk)]] = np.asarray(values)[: len(chunk)]
    return {"table": table}


# What may change between a run and its resumption: where it runs and how often it logs and saves.
RESUMABLE_CHANGES = ("distributed", "log_every", "checkpoint_every", "keep_checkpoints")


def _check_same_run(saved: dict, current: dict, out: Path) -> None:
    """Refuse to resume a checkpoint written under another config (other data, model or hyperparameters)."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))  # tuples -> lists
    for config in (saved, current):
        for key in RESUMABLE_CHANGES:
            config.pop(key, None)
        config.get("train", {}).pop("mesh", None)
    if saved != current:
        diff = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        raise ConfigError(
            f"{out} holds a run with another config (differs in: {', '.join(diff)}); resume with the same config "
            "or choose a new out_dir."
        )


def train(config: RunConfig, *, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) training as configured; returns a summary dict (also written to OUT/summary.json).

    `stop_after=k` ends the run after step k with a checkpoint (as a preemption would); a later call resumes.
    """
    from jaxpatience import sharding

    sharding.initialize_distributed(config.distributed.coordinator_address, config.distributed.num_processes,
                                    config.distributed.process_id)  # fmt: skip
    import jax
    import numpy as np
    from tqdm import tqdm

    from jaxpatience import lora
    from jaxpatience.checkpoint import Checkpointer
    from jaxpatience.data.pairs import PairLoader
    from jaxpatience.metrics import MetricsWriter, plot_training
    from jaxpatience.train import create_trainer, make_mesh
    from jaxpatience.weights import load_pretrained, save_pretrained

    out = Path(config.out_dir)
    is_main = jax.process_index() == 0
    mesh = make_mesh(config.train.mesh)
    model, tokenizer = load_pretrained(config.model, config.param_dtype, compute_dtype=config.compute_dtype, mesh=mesh)
    data = config.data
    loader = PairLoader.from_source(
        data.path, tokenizer, batch_size=config.train.batch_size, max_length=data.max_length,
        max_prompt_length=data.max_prompt_length, buckets=data.buckets, seed=data.seed, shuffle=data.shuffle,
        process_index=jax.process_index(), process_count=jax.process_count(), chat_template=data.chat_template,
    )  # fmt: skip
    max_steps = config.train.max_steps
    if config.epochs is not None:
        max_steps = config.epochs * loader.steps_per_epoch
    train_config = dataclasses.replace(config.train, max_steps=max_steps)
    trainer = create_trainer(model, train_config, mesh)
    needs_reference = config.precompute_reference or (train_config.lora is None and train_config.loss.dpo_weight > 0)
    reference = precompute_reference(trainer, loader) if needs_reference else None

    checkpoints = Checkpointer(out / "checkpoints", keep=config.keep_checkpoints)
    start = 0
    if checkpoints.latest_step() is not None:
        trainer.state, meta = checkpoints.restore(trainer.state)
        _check_same_run(meta["config"], dataclasses.asdict(config), out)
        loader.load_state_dict(meta["loader"])
        start = int(meta["step"])
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        print(f"data: {loader.stats.summary()}; {loader.steps_per_epoch} steps per epoch, "
              f"{loader.dropped_per_epoch} pairs left out per epoch")  # fmt: skip
    writer = MetricsWriter(out, resume_step=start, enabled=is_main)

    def save(step: int) -> None:
        meta = {"step": step, "loader": loader.state_dict(), "config": dataclasses.asdict(config)}
        checkpoints.save(step, trainer.state, meta)

    batches = iter(loader)
    bar = tqdm(total=max_steps, initial=start, disable=not (progress and is_main), desc="train", unit="step")
    tokens_seen, t_start, last = 0, time.perf_counter(), {}
    end = max_steps if stop_after is None else min(max_steps, stop_after)
    if stop_after is not None and end <= start:  # asked to stop at or before the step already reached: nothing to do
        checkpoints.close()
        return {"steps": start, "resumed_from": start, "final": {}, "exports": {}, "compilations": 0}
    for step in range(start, end):
        host = next(batches)
        batch = {k: host[k] for k in BATCH_KEYS}
        if reference is not None:
            batch["ref_logps"] = reference["table"][host["pair_index"]]
        metrics = trainer.step(_global_batch(batch, mesh, jax.process_count()))
        tokens_seen += int(np.sum(host["attention_mask"])) * jax.process_count()
        if (step + 1) % config.log_every == 0 or step + 1 == max_steps:
            last = {k: float(v) for k, v in metrics.items()}  # device -> host: one sync per logged step
            elapsed = time.perf_counter() - t_start
            last["tokens_per_s"] = tokens_seen / elapsed
            writer.write(step + 1, last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last.get('rewards/accuracies', float('nan')):.2f}",
                            tok_s=f"{last['tokens_per_s']:.0f}")  # fmt: skip
        bar.update(1)
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < max_steps:
            save(step + 1)
    bar.close()
    writer.close()
    if checkpoints.latest_step() != end:
        save(end)
    compilations = trainer.step_fn._cache_size() if hasattr(trainer.step_fn, "_cache_size") else None
    if end < max_steps:
        checkpoints.close()
        return {"steps": end, "resumed_from": start, "final": last, "exports": {}, "compilations": compilations}

    trained, exports = trainer.model(), {}
    if train_config.lora is not None:
        adapter = lora.save_peft_adapter(trained, train_config.lora, out / "adapter", overwrite=True,
                                         base_model_name_or_path=config.model)  # fmt: skip
        exports["adapter"] = str(adapter)
    if config.export_merged or train_config.lora is None:  # full-parameter runs always export their weights
        if train_config.lora is not None:
            lora.merge(trained)
        exports["merged"] = str(save_pretrained(trained, tokenizer, out / "merged", overwrite=True))
    summary = {"steps": max_steps, "resumed_from": start, "final": last, "exports": exports,
               "compilations": compilations,
               "truncation": dataclasses.asdict(loader.stats), "wall_s": time.perf_counter() - t_start}  # fmt: skip
    if is_main:
        plot = plot_training(out / "metrics.jsonl", out / "training.png", title=str(config.model))
        summary["plot"] = str(plot) if plot else None
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    checkpoints.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpatience train", description="DPO / DPO+NLL / SFT training run.")
    parser.add_argument("--config", help="YAML config (configs/*.yaml); keys not given keep their defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.loss.beta=0.1 out_dir=out/x")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step; rerun to resume")
    args = parser.parse_args(argv)
    config = load_run_config(args.config, args.overrides)
    summary = train(config, progress=not args.no_progress, stop_after=args.stop_after)
    print(json.dumps({"steps": summary["steps"], "final": summary["final"], "exports": summary["exports"]}))
    return 0
