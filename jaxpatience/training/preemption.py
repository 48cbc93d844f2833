"""Stop a training loop cleanly on SIGTERM: every process saves the same step, then the run ends.

SIGTERM is how a job is asked to end: `scancel --signal=TERM` (the SLURM template sends it near the time limit),
the shutdown of a preempted VM, `launch.py stop`, `kill`. The default would kill the process and lose the steps
since the last checkpoint; a single process could save at once, but on several hosts the save is collective, so
all of them must agree on the step.

* Under `jax.distributed` (several processes, or one started by a launcher): JAX catches SIGTERM on every host
  for the life of the process (SIGTERM then no longer kills it), and
  `multihost_utils.reached_preemption_sync_point(step)` becomes True at the same step everywhere: one past the
  furthest step any process had reported when the notice came. A notice that came while the run was being set
  up (or during an earlier stage of the same program, irpo's sampling say) could point at a step this loop never
  passes, so before the first step every process reports its start and they agree, through process 0, whether
  such a notice is already there; if so they stop at once.
* One process without `jax.distributed`: a handler of our own sets a flag for the duration of the loop; the next
  step boundary sees it.

The loop calls `watch.reached(step)` once per step, on every process, with the step number it has just finished
(orbax's own save reports the same step numbers). Importing this module starts no JAX backend (nothing does
before `Watch` runs inside the loop), so the command-line dispatcher can catch `Preempted` at any time.
"""

from __future__ import annotations

import signal
import threading
import warnings

import jax
from jax.experimental import multihost_utils

from jaxpatience import sharding

TERMINATED_EXIT_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"  # the coordination service's key for "a process got SIGTERM"


class Preempted(Exception):
    """The run stopped after `step` of `max_steps` steps (saved: a checkpoint of that step was written, rather
    than the step being where the run had started); the same command resumes it."""

    def __init__(self, step: int, max_steps: int, saved: bool = True):
        where = f"after step {step} of {max_steps}, with a checkpoint" if saved else f"at step {step} of {max_steps}"
        super().__init__(f"stopped by SIGTERM {where}; run the same command again to resume")
        self.step, self.max_steps = step, max_steps


class Watch:
    """`pending`: SIGTERM came before the loop; `reached(step)`: stop after this step (the same on every process)."""

    def __init__(self, start: int):
        # Under jax.distributed (even one process, as in a one-node SLURM job) JAX's handler has SIGTERM.
        self._distributed = jax.distributed.is_initialized()
        self._signalled = threading.Event()
        self._previous = None
        self.pending = False
        if self._distributed:
            self.pending = _agree_on_earlier_notice(start)
        elif threading.current_thread() is threading.main_thread():  # signal handlers: main thread only
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._signalled.set())

    def reached(self, step: int) -> bool:
        if self._distributed:
            return bool(_sync_point(step))
        return self._signalled.is_set()

    def close(self) -> None:
        """Give SIGTERM back to whoever handled it before (for one process, outside the loop, it ends it at once)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _sync_point(step: int) -> bool | None:
    """jax's `reached_preemption_sync_point(step)`; None where JAX runs without its preemption service."""
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service=False: SIGTERM is then not caught either
        return None


def _agree_on_earlier_notice(start: int) -> bool:
    """Under jax.distributed, before the first step: report `start` (a notice from now on stops after step
    start + 1), then agree on whether a notice came before. Every process calls this."""
    if _sync_point(start) is None:
        return False
    sharding.barrier("preemption watch")  # every process has reported `start` before process 0 looks
    return bool(sharding.broadcast_json(_notice_received() if sharding.is_main_process() else None))


def _notice_received() -> bool:
    """Has any process of this jax.distributed program got SIGTERM? Read from the coordination service."""
    try:
        # The client holds the coordination service's key-values. Imported here, inside the `try`: a private
        # module of JAX that another version may move, and then this answers "cannot tell" instead of failing.
        from jax._src.distributed import global_state

        return global_state.client.key_value_try_get(NOTICE_KEY) is not None
    except Exception as err:  # the key is absent: no notice; anything else: this JAX cannot tell us
        if "NOT_FOUND" not in str(err):
            warnings.warn(
                f"cannot tell whether a SIGTERM came before training started ({err}); one that did is "
                "only seen at the next SIGTERM",
                stacklevel=2,
            )
        return False
