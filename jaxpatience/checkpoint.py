"""Training checkpoints with orbax: the train state (arrays), plus a JSON side (loader state, config, step).

A checkpoint directory holds `step_N/state` (every array of the train state, written collectively: on a
multi-host run each process writes its own shards) and `step_N/meta` (plain JSON). The last `keep` steps are
kept. Restoring takes a *target* pytree — the freshly built train state of the resuming run — and reads every
array straight into the target's sharding, so a run may resume on a different mesh shape.

The train state is saved as a flat {path string: array} dict, so any pytree (flax struct dataclasses, nnx
State, optax states) round-trips without registering types with orbax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _flatten(tree: Any) -> tuple[dict[str, Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}, treedef


class Checkpointer:
    """Save / restore (train state, JSON metadata) by step under one directory."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Write one checkpoint (every process must call this; orbax coordinates the writes)."""
        flat, _ = _flatten(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state shaped and sharded like `target`, meta) of `step` (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory} holds no checkpoint to resume from.")
        flat_target, treedef = _flatten(target)
        abstract = {
            key: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
            if isinstance(leaf, jax.Array) else leaf
            for key, leaf in flat_target.items()
        }  # fmt: skip
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        flat = restored["state"]
        if flat.keys() != flat_target.keys():
            missing = sorted(flat_target.keys() - flat.keys()) or sorted(flat.keys() - flat_target.keys())
            raise ValueError(
                f"checkpoint {self.directory} step {step} does not match this run's state (first difference: "
                f"{missing[0]}); was it written with another LoRA or model config, or before 0.3 (per-layer weights: "
                "resume those with train.scan_layers=false data.packing=false train.attention=einsum)?"
            )
        state = jax.tree_util.tree_unflatten(treedef, [flat[k] for k in flat_target])
        return state, restored["meta"]

    def close(self) -> None:
        self.manager.close()
