"""A training run: `jaxpatience train --config configs/X.yaml key=value ...`.

config -> (multi-host start) -> mesh -> model -> PairLoader -> Trainer (step.py) -> loop -> checkpoints -> export.

* The loop resumes exactly: the latest orbax checkpoint in OUT/checkpoints holds the train state (adapters or
  all weights, optimizer state, step) and, as JSON, the loader state and the config; a resumed run sees the
  batches it would have seen. Restoring reads each array straight into this run's shardings, so the mesh may
  differ from the one that wrote the checkpoint.
* Multi-host: every process runs this same program. Each reads only its rows of every global batch, and
  `batch.place_batch` (the one way a batch reaches the devices) makes them one global array. Checkpoints are
  written collectively.
* Reference log-probs, when precomputed (`precompute_reference`, or full-parameter DPO), are stored under a
  content hash of the tokenised pairs, the weight files and the dtypes (reference_cache.py; beside the data by
  default, `data.reference_cache=DIR` elsewhere) and read back by any later run with the same hash.
* Metrics: OUT/metrics.jsonl (+ TensorBoard / W&B when `report` names them), a progress bar, and at the end
  OUT/training.png (loss and chosen/rejected log-probs over steps).
* Export at the end: OUT/adapter (PEFT format) with LoRA, OUT/merged (HF checkpoint) when `export_merged`.
* OUT is claimed before anything is written (durability/outputs.py): a folder of another command, a non-empty
  folder of someone else's, or one that is the model or the data is refused; a run of this command resumes.
* A finished run is extended to more steps only when asked (`--extend`, `train(..., extend=True)`): its
  `train.max_steps` / `epochs` may then grow, and the learning-rate schedule is recomputed for the new length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxpatience import sharding
from jaxpatience.config import ConfigError, RunConfig, changed_keys, command_parser, config_from_args, load_config
from jaxpatience.config_io import positive_int
from jaxpatience.data.pairs import PairLoader
from jaxpatience.durability import identity, outputs
from jaxpatience.durability import progress as progress_bars
from jaxpatience.durability.metrics import MetricsWriter, read_metrics
from jaxpatience.evaluation.report import plot_training
from jaxpatience.model import lora
from jaxpatience.model.tokenizer import load_tokenizer
from jaxpatience.model.weights import load_pretrained, save_pretrained
from jaxpatience.training import reference_cache
from jaxpatience.training.batch import device_batch, packed_row_multiple
from jaxpatience.training.checkpoint import Checkpointer
from jaxpatience.training.dtype_check import check_backend_runs
from jaxpatience.training.preemption import Preempted, Watch
from jaxpatience.training.step import Trainer, create_trainer, make_logps_fn, make_mesh


def load_run_config(path: str | Path | None, overrides: list[str]) -> RunConfig:
    """A RunConfig from a YAML file (optional) and `section.key=value` overrides, ready to run (validated)."""
    return load_config(RunConfig, path, overrides).validate()


def precompute_reference(trainer: Trainer, loader: PairLoader) -> np.ndarray:
    """Reference log-probs [N, 2] of every pair under the *initial* model (adapters off), computed once.

    Needed for full-parameter DPO (no adapters to switch off); with LoRA it saves the reference forward in
    every step. The loader's `reference_batches` visit every pair once in its fixed shapes.
    """
    logps_fn = make_logps_fn(trainer, adapters=False)
    table = np.zeros((len(loader.pairs), 2), np.float32)
    for pair_index, batch in loader.reference_batches():
        values = logps_fn(device_batch(batch))  # [batch_size, 2], split over the devices
        if not values.is_fully_addressable:
            values = multihost_utils.process_allgather(values, tiled=True)
        real = pair_index >= 0  # the global batch's outputs that belong to a pair (once each)
        table[pair_index[real]] = np.asarray(values)[real]
    return table


def cached_reference(config: RunConfig, trainer: Trainer, loader: PairLoader, is_main: bool) -> np.ndarray:
    """`precompute_reference`, or the table a run with the same pairs, weights and dtypes stored before
    (reference_cache.py). Every process must find it, or all of them compute it (the pass is collective)."""
    data = config.data
    directory = Path(data.reference_cache) if data.reference_cache else reference_cache.default_directory(data.path)
    settings = {"param_dtype": config.param_dtype, "compute_dtype": config.compute_dtype or config.param_dtype}
    key, parts = reference_cache.cache_key(config.model, loader.pairs, settings)
    table = reference_cache.load(directory, key, len(loader.pairs))
    found = np.asarray(table is not None)
    if jax.process_count() > 1:
        found = np.all(multihost_utils.process_allgather(found))
    if found:
        if is_main:
            print(f"reference log-probs: reusing {directory / key}.npy")
        return table
    table = precompute_reference(trainer, loader)
    if is_main:
        try:
            print(f"reference log-probs: computed, saved to {reference_cache.save(directory, key, table, parts)}")
        except OSError as err:  # a read-only data directory: train anyway
            print(f"reference log-probs: computed; cannot save them to {directory} ({err.strerror})")
    return table


# What may change between a run and its resumption: where it runs and how often it logs and saves.
RESUMABLE_CHANGES = ("distributed", "log_every", "checkpoint_every", "keep_checkpoints", "report")
# What may also change when a run is extended (`--extend`): its length.
EXTENDABLE_CHANGES = ("train.max_steps", "epochs")
# Keys added in 0.3, with the values runs written before them had: such a run resumes with these overrides.
LEGACY_VALUES = {
    "train": {"scan_layers": False, "attention": "einsum"},
    "data": {"packing": False, "pack_length": None, "pack_row_multiple": 1},
}


def _check_same_run(saved: dict, current: dict, out: Path, extend: bool = False) -> None:
    """Refuse to resume a checkpoint written under another config (other data, model or hyperparameters); with
    `extend`, its length (EXTENDABLE_CHANGES) may differ."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))  # tuples -> lists
    for section, values in LEGACY_VALUES.items():
        for key, value in values.items():
            saved.setdefault(section, {}).setdefault(key, value)
    for config in (saved, current):
        for key in RESUMABLE_CHANGES:
            config.pop(key, None)
        config.get("train", {}).pop("mesh", None)
        config.get("data", {}).pop("reference_cache", None)  # where a table is kept, not what it holds
        if extend:
            config.pop("epochs", None)
            config.get("train", {}).pop("max_steps", None)
    if saved != current:
        diff = changed_keys(saved, current)
        hint = " (to train a run further, add --extend)" if set(diff) <= set(EXTENDABLE_CHANGES) else ""
        raise ConfigError(
            f"{out} holds a run with another config (differs in: {', '.join(diff)}); resume with the same config "
            f"or choose a new out_dir{hint}."
        )


@dataclasses.dataclass
class _Run:
    """The pieces of one run, built once by `_set_up` and shared by the resume, the loop and the export."""

    config: RunConfig
    out: Path
    is_main: bool  # process 0 writes the files every process would write alike
    tokenizer: Any
    loader: PairLoader
    trainer: Trainer  # its config holds the resolved max_steps (from `epochs` if set)
    reference: np.ndarray | None  # [N, 2] reference log-probs of every pair; None: computed inside the step
    checkpoints: Checkpointer
    inputs: dict  # fingerprints of the model's files and data's records (durability/identity.py), checked on resume
    shapes: set = dataclasses.field(default_factory=set)  # the batch shapes the loop has stepped on (compilations)
    # Real tokens and all token slots (padding included) since step 0, kept in checkpoints: a resumed run logs
    # the padding share an uninterrupted one would.
    tokens: dict = dataclasses.field(default_factory=lambda: {"real": 0, "slots": 0})

    @property
    def max_steps(self) -> int:
        return self.trainer.config.max_steps

    def save(self, step: int) -> None:
        """A checkpoint after `step` steps: train state, loader position and config (collective)."""
        meta = {
            "step": step,
            "loader": self.loader.state_dict(),
            "config": dataclasses.asdict(self.config),
            "inputs": self.inputs,
            "tokens": self.tokens,
        }
        self.checkpoints.save(step, self.trainer.state, meta)


def _set_up(config: RunConfig) -> _Run:
    """Start jax.distributed (before anything touches a device), then mesh, model, loader, trainer, reference."""
    distributed = config.distributed
    sharding.initialize_distributed(distributed.coordinator_address, distributed.num_processes, distributed.process_id)
    mesh = make_mesh(config.train.mesh)
    check_backend_runs(config.param_dtype, config.compute_dtype, config.train.attention, packed=config.data.packing)
    # The data is read and checked before the weights (minutes for a large model): a checkpoint directory's
    # tokenizer loads on its own; a .gguf file's comes with its weights.
    tokenizer = load_tokenizer(config.model) if Path(config.model).is_dir() else None
    loader = _make_loader(config, tokenizer, mesh) if tokenizer is not None else None
    model, loaded = load_pretrained(
        config.model,
        config.param_dtype,
        compute_dtype=config.compute_dtype,
        mesh=mesh,
        with_tokenizer=tokenizer is None,
    )
    tokenizer = tokenizer or loaded
    loader = loader or _make_loader(config, tokenizer, mesh)
    max_steps = config.train.max_steps if config.epochs is None else config.epochs * loader.steps_per_epoch
    config.check_model(model.config, max_steps)  # lora.rank vs the model (a .gguf file's shapes are known now)
    train_config = dataclasses.replace(config.train, max_steps=max_steps)
    trainer = create_trainer(model, train_config, mesh)
    needs_reference = config.precompute_reference or (train_config.lora is None and train_config.loss.dpo_weight > 0)
    is_main = jax.process_index() == 0
    reference = cached_reference(config, trainer, loader, is_main) if needs_reference else None
    out = Path(config.out_dir)
    if is_main:
        _warn_about_settings(config, model.config.max_position_embeddings)
    checkpoints = Checkpointer(out / "checkpoints", keep=config.keep_checkpoints)
    inputs = {**identity.model_inputs(config.model), "data": loader.fingerprint}
    return _Run(
        config=config,
        out=out,
        is_main=is_main,
        tokenizer=tokenizer,
        loader=loader,
        trainer=trainer,
        reference=reference,
        checkpoints=checkpoints,
        inputs=inputs,
    )


def _warn_about_settings(config: RunConfig, context: int) -> None:
    """Settings that are allowed but do not do what they seem to: said once, on stderr."""
    warnings = []
    if config.data.max_length > context:
        warnings.append(
            f"data.max_length={config.data.max_length} is past the model's context ({context} "
            "positions): the model never saw positions beyond it"
        )
    if config.keep_checkpoints == 0:
        warnings.append("keep_checkpoints=0 keeps no checkpoint: a stopped or killed run starts again from step 0")
    for warning in warnings:
        print(f"jaxpatience: warning: {warning}.", file=sys.stderr)


def _make_loader(config: RunConfig, tokenizer, mesh) -> PairLoader:
    """The run's PairLoader: this process's rows of every global batch, in shapes the mesh divides."""
    data = config.data
    return PairLoader.from_source(
        data.path,
        tokenizer,
        batch_size=config.train.batch_size,
        max_length=data.max_length,
        max_prompt_length=data.max_prompt_length,
        buckets=data.buckets,
        seed=data.seed,
        shuffle=data.shuffle,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        chat_template=data.chat_template,
        packing=data.packing,
        pack_length=data.pack_length,
        micro_batches=config.train.micro_batches,
        row_multiple=math.lcm(packed_row_multiple(config.train.micro_batches, mesh), data.pack_row_multiple),
        chosen_only=reads_chosen_only(config),
    )


def reads_chosen_only(config: RunConfig) -> bool:
    """SFT (no DPO term, no precomputed reference): the loss reads only the chosen sequences, so packed batches
    hold only those (core.model_loss)."""
    return config.train.loss.dpo_weight == 0 and not config.precompute_reference


def _resume(run: _Run, extend: bool = False) -> int:
    """Restore the latest checkpoint, if any (refused under another config); returns the step to start at.

    `extend`: the run may be longer than the checkpoint's (never shorter than its step); the optimizer state and
    step are restored as they are, and the schedule (optimizer.py) is that of the new max_steps."""
    start = 0
    if run.checkpoints.latest_step() is not None:
        run.trainer.state, meta = run.checkpoints.restore(run.trainer.state)
        _check_same_run(meta["config"], dataclasses.asdict(run.config), run.out, extend)
        identity.check_same_inputs(
            meta.get("inputs"), run.inputs, run.out, "resume with the same model and data, or choose a new out_dir"
        )
        run.loader.load_state_dict(meta["loader"])
        run.tokens = dict(meta.get("tokens", run.tokens))
        start = int(meta["step"])
        if extend:
            _check_extension(run, meta, start)
        if run.is_main:
            print(f"resuming from step {start} of {run.max_steps} ({run.checkpoints.directory})")
    if run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(dataclasses.asdict(run.config), indent=2))
        print(
            f"data: {run.loader.stats.summary()}; {run.loader.steps_per_epoch} steps per epoch, "
            f"{run.loader.dropped_per_epoch} pairs left out per epoch"
        )
    return start


def _check_extension(run: _Run, meta: dict, start: int) -> None:
    """`--extend` must make the run longer than the step it reached; says that the schedule is recomputed."""
    saved_steps = meta["config"]["train"]["max_steps"] if meta["config"].get("epochs") is None else None
    if run.max_steps <= start:
        raise ConfigError(
            f"--extend: the run in {run.out} is at step {start}; set train.max_steps (or epochs) past it, not "
            f"{run.max_steps} steps."
        )
    if run.is_main and saved_steps != run.max_steps:
        print(
            f"extending the run from step {start} to {run.max_steps}: the learning-rate schedule is recomputed for "
            f"{run.max_steps} steps (warmup {run.trainer.config.optimizer.warmup_steps}, then decay to the new end)."
        )


def _loop(run: _Run, start: int, end: int, progress: bool) -> dict[str, float]:
    """Steps [start, end): metrics every `log_every` steps, checkpoints every `checkpoint_every` (the last step's
    is left to the caller). Returns the last logged metrics ({} if none were logged).

    SIGTERM (`scancel --signal=TERM`, a VM's shutdown, `kill`) ends the loop after the current step, with a
    checkpoint of that step on every process, by raising `Preempted`."""
    config, trainer = run.config, run.trainer
    writer = MetricsWriter(  # and to the trackers config.report names (durability/trackers.py), on process 0
        run.out, resume_step=start, enabled=run.is_main, report=config.report, run_config=dataclasses.asdict(config)
    )
    bar = progress_bars.bar(run.max_steps, initial=start, enabled=progress and run.is_main, desc="train", unit="step")
    batches, t_start, last, watch = iter(run.loader), time.perf_counter(), {}, None
    tokens_seen = 0  # real tokens since `start`: this process's rate
    try:  # the metrics file is locked while written: release it however the loop ends
        watch = Watch(start)
        if watch.pending:  # SIGTERM came while the run was set up: the checkpoint of `start` (if any) stands
            raise Preempted(start, run.max_steps, saved=False)
        for step in range(start, end):
            host = next(batches)  # this process's rows of the global batch
            batch = device_batch(host)
            if run.reference is not None:
                batch["ref_logps"] = run.reference[host["pair_index"]]  # [B / P, 2]
            metrics = trainer.step(batch)
            run.shapes.add(tuple(host["input_ids"].shape))
            tokens_seen += int(host["real_tokens"])  # the global batch's (the same figure on every host)
            run.tokens["real"] += int(host["real_tokens"])
            run.tokens["slots"] += int(host["token_slots"])
            if (step + 1) % config.log_every == 0 or step + 1 == run.max_steps:
                last = {k: float(v) for k, v in metrics.items()}  # device -> host: one sync per logged step
                last["tokens_per_s"] = tokens_seen / (time.perf_counter() - t_start)  # real tokens only
                last["padding_share"] = 1.0 - run.tokens["real"] / run.tokens["slots"]  # since step 0
                writer.write(step + 1, last)
                accuracy = {"acc": f"{last['rewards/accuracies']:.2f}"} if "rewards/accuracies" in last else {}
                bar.set_postfix(loss=f"{last['loss']:.4f}", **accuracy, tok_s=f"{last['tokens_per_s']:.0f}")
            bar.update(1)
            if watch.reached(step + 1):  # every process sees it after the same step
                run.save(step + 1)
                raise Preempted(step + 1, run.max_steps)
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < run.max_steps:
                run.save(step + 1)
    finally:
        if watch is not None:
            watch.close()
        bar.close()
        writer.close()
    return last


def _export(run: _Run) -> dict[str, str]:
    """OUT/adapter (PEFT) with LoRA; OUT/merged (HF checkpoint) when export_merged or for full-parameter runs."""
    trained, exports, lora_config = run.trainer.model(), {}, run.trainer.config.lora
    if lora_config is not None:
        adapter = lora.save_peft_adapter(
            trained, lora_config, run.out / "adapter", overwrite=True, base_model_name_or_path=run.config.model
        )
        exports["adapter"] = str(adapter)
    if run.config.export_merged or lora_config is None:  # full-parameter runs always export their weights
        if lora_config is not None:
            lora.merge(trained)
        exports["merged"] = str(save_pretrained(trained, run.tokenizer, run.out / "merged", overwrite=True))
    return exports


def train(config: RunConfig, *, progress: bool = True, stop_after: int | None = None, extend: bool = False) -> dict:
    """Run (or resume) training as configured; returns a summary dict (also written to OUT/summary.json).

    `stop_after=k` ends the run after step k with a checkpoint (as a preemption would); a later call resumes.
    `extend`: continue a run (finished or not) to a larger train.max_steps / epochs; the schedule is recomputed.
    """
    config.validate()
    inputs = {"model": config.model, "data.path": config.data.path}
    output = outputs.claim_folder(config.out_dir, "train", "run", key="out_dir", inputs=inputs)  # before any write
    run = _set_up(config)
    if run.is_main:
        output.mark()
    try:
        start = _resume(run, extend)
        end = run.max_steps if stop_after is None else min(run.max_steps, stop_after)
        if end <= start and stop_after is not None:  # asked to stop at or before the step reached: nothing to do
            return {"steps": start, "resumed_from": start, "final": {}, "exports": {}, "compilations": 0}
        t_start = time.perf_counter()
        last = _loop(run, start, end, progress) or _last_logged(run.out)  # killed after its last step: read back
        if run.checkpoints.latest_step() != end:
            run.save(end)
        step_fn = run.trainer.step_fn
        compilations = step_fn._cache_size() if hasattr(step_fn, "_cache_size") else None
        summary = {
            "steps": end,
            "resumed_from": start,
            "final": last,
            "exports": {},
            "compilations": compilations,
            "batch_shapes": sorted(run.shapes),
        }
        if end < run.max_steps:  # stopped early: resume later
            return summary
        summary |= {
            "exports": _export(run),
            "truncation": dataclasses.asdict(run.loader.stats),
            "wall_s": time.perf_counter() - t_start,
        }
        if run.is_main:
            plot = plot_training(run.out / "metrics.jsonl", run.out / "training.png", title=str(config.model))
            summary["plot"] = str(plot) if plot else None
            (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        run.checkpoints.close()


def _last_logged(out: Path) -> dict[str, float]:
    """The last metrics line of a run (without its step), or {}."""
    records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    return {key: value for key, value in records[-1].items() if key != "step"} if records else {}


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        "jaxpatience train",
        "DPO / DPO+NLL / SFT training run.",
        config_help="YAML config (configs/*.yaml); keys not given keep their defaults",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument(
        "--stop-after", type=positive_int, help="stop (with a checkpoint) after this step (>= 1); rerun to resume"
    )
    parser.add_argument(
        "--extend",
        action="store_true",
        help="train the run in out_dir further, to a larger train.max_steps or epochs (the LR schedule is recomputed)",
    )
    args = parser.parse_intermixed_args(argv)
    config = config_from_args(RunConfig, args)  # train() validates it
    summary = train(config, progress=not args.no_progress, stop_after=args.stop_after, extend=args.extend)
    print(json.dumps({"steps": summary["steps"], "final": summary["final"], "exports": summary["exports"]}))
    return 0
