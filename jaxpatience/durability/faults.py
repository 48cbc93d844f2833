"""Fault injection for tests: a SIGKILL or a full disk at a named point of a durable write.

    JAXPATIENCE_FAULT="checkpoint.finalize:2:kill"   SIGKILL this process the 2nd time it passes that point
    JAXPATIENCE_FAULT="jsonl.append:1:enospc"        raise OSError(ENOSPC) there instead (a full disk)
    JAXPATIENCE_FAULT="jsonl.append:3:kill,checkpoint.finalize:1:enospc"   several rules, comma-separated

The points (each passed by every write of its kind, counted per process from 1):

    jsonl.append         JsonlStore.append, after half of the batch's bytes are written and synced: a torn last line
    jsonl.rewrite        write_jsonl and JsonlStore.rewrite, after the sibling .tmp file is synced, before the rename
    checkpoint.finalize  Checkpointer.save, inside orbax's commit of a directory (the state item, the meta item, the
                         step): the arrays and the JSON are on disk in orbax's tmp directory, not yet renamed

A test sets the variable for a subprocess (`jaxpatience train ...`), so that the kill lands exactly where a real one
could and the rerun shows what a user would see. With the variable unset, `armed()` is one environment lookup and
`point` returns at once: no other cost, and no behaviour differs.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

ENV = "JAXPATIENCE_FAULT"
POINTS = ("jsonl.append", "jsonl.rewrite", "checkpoint.finalize")
ACTIONS = ("kill", "enospc")

_passes: dict[str, int] = {}  # point -> times passed in this process (the only state; read only when armed)


def armed() -> bool:
    """Whether any fault is set for this process (a write may then take its slower, split path)."""
    return bool(os.environ.get(ENV))


def rules(spec: str) -> list[tuple[str, int, str]]:
    """(point, nth pass, action) of each comma-separated `point:n:action`; ValueError naming a bad one."""
    parsed = []
    for rule in filter(None, (part.strip() for part in spec.split(","))):
        fields = rule.split(":")
        if len(fields) != 3 or fields[0] not in POINTS or fields[2] not in ACTIONS or not fields[1].isdigit():
            raise ValueError(
                f"{ENV}: {rule!r} is not point:n:action (points: {', '.join(POINTS)}; actions: {', '.join(ACTIONS)})."
            )
        parsed.append((fields[0], int(fields[1]), fields[2]))
    return parsed


def point(name: str, path: str | Path | None = None) -> None:
    """Pass the point `name` (while writing `path`): SIGKILL or ENOSPC here if a rule says so, else nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    count = _passes[name] = _passes.get(name, 0) + 1
    for rule_point, nth, action in rules(spec):
        if rule_point == name and nth == count:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))
