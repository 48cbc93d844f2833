"""Training checkpoints with orbax: the train state (arrays), plus a JSON side (loader state, config, step).

A checkpoint directory holds `step_N/state` (every array of the train state, written collectively: on a
multi-host run each process writes its own shards) and `step_N/meta` (plain JSON). The last `keep` steps are
kept. Restoring takes a *target* pytree — the freshly built train state of the resuming run — and reads every
array straight into the target's sharding, so a run may resume on a different mesh shape.

The train state is saved as a flat {path string: array} dict, so any pytree (flax struct dataclasses, nnx
State, optax states) round-trips without registering types with orbax.

A save is atomic: orbax writes `step_N.orbax-checkpoint-tmp-*` and renames it when whole. A save killed or failed
midway leaves that directory behind; the next run's Checkpointer removes it (`cleanup_tmp_directories`) and
resumes from the last whole step. A full disk is `DiskFull` (durability/store.py), naming the step that is
intact. With a fault armed (durability/faults.py), every orbax commit passes the point `checkpoint.finalize` first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path.atomicity import AtomicRenameTemporaryPath

from jaxpatience.durability import faults
from jaxpatience.durability.store import reporting_full_disk


def _flatten(tree: Any) -> tuple[dict[str, Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}, treedef


class Checkpointer:
    """Save / restore (train state, JSON metadata) by step under one directory."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        # An armed fault (a test) swaps in orbax's local-disk commit with a fault point in front of it.
        commit = {"temporary_path_class": _FaultPointRename} if faults.armed() else {}
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True, **commit
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Write one checkpoint (every process must call this; orbax coordinates the writes)."""
        flat, _ = _flatten(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta))
        previous = self.latest_step()
        kept = "no checkpoint was written yet" if previous is None else f"the checkpoint of step {previous} is intact"
        with reporting_full_disk(f"the checkpoint of step {step} in {self.directory}", kept):
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
            if isinstance(leaf, jax.Array)
            else leaf
            for key, leaf in flat_target.items()
        }
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


class _FaultPointRename(AtomicRenameTemporaryPath):
    """Orbax's commit by rename, with the fault point `checkpoint.finalize` before it (only when a fault is armed)."""

    async def finalize(self, *args, **kwargs):
        faults.point("checkpoint.finalize", self.get())
        return await super().finalize(*args, **kwargs)
