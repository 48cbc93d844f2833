"""Stop a training loop cleanly on SIGTERM: every process saves the same step, then the run ends.

SIGTERM is how a cluster takes a job back: SLURM on preemption, `scancel` and at the time limit (the SLURM
template turns the limit into a requeue), a TPU VM before maintenance. The default would kill the process and
lose the steps since the last checkpoint; a single process could save at once, but on several hosts the save is
collective, so all of them must agree on the step.

* Several processes: `jax.distributed` already catches SIGTERM on every host (it then no longer kills the
  process) and `multihost_utils.reached_preemption_sync_point(step)` becomes True at the same step everywhere.
* One process: a handler of our own sets a flag; the next step boundary sees it.

The loop calls `watch.reached(step)` once per step, on every process, with the step number it has just finished.
JAX is imported only by `Watch`, so the command-line dispatcher can catch `Preempted` without starting it.
"""

from __future__ import annotations

import signal
import threading

TERMINATED_EXIT_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Preempted(Exception):
    """The run stopped after `step` of `max_steps` steps, with a checkpoint: the same command resumes it."""

    def __init__(self, step: int, max_steps: int):
        super().__init__(f"stopped by SIGTERM after step {step} of {max_steps}, with a checkpoint; run the same "
                         "command again to resume")  # fmt: skip
        self.step, self.max_steps = step, max_steps


class Watch:
    """`reached(step)`: has any process been asked to stop? True at the same step on every process."""

    def __init__(self):
        import jax

        self._multi = jax.process_count() > 1
        self._signalled = threading.Event()
        self._previous = None
        if not self._multi and threading.current_thread() is threading.main_thread():  # handlers: main thread only
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._signalled.set())

    def reached(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled.is_set()

    def close(self) -> None:
        """Give SIGTERM back to whoever handled it before (outside the loop it ends the process at once)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
