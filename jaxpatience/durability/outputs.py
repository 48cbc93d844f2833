"""Whose output is this? Every command that writes a folder or file claims it first, and refuses one that is not
its own, in one sentence, before anything is written.

A folder a command writes holds a marker, `.jaxpatience-output.json` = {"command": "train", "kind": "run"}. A
command's claim (`claim_folder`) refuses:
  * an empty path (it would mean the current folder);
  * a path that is not a folder (a file, a FIFO, a device, a socket);
  * a path that is one of the command's inputs, lies inside one, or holds one (eval --out pointed at --model);
  * a folder marked by another command or kind (eval --out pointed at a training run);
  * a non-empty folder with no marker that the command did not make (the user's own files).
The command's own folder is accepted, and so is one written before markers existed, recognised by the files the
command always writes there (`LEGACY`): a training run's config.json, an evaluation's generations.jsonl and
run.json, and so on; the marker is added when the command next writes there, so existing runs resume.

A single file (the teacher's pairs .jsonl) carries no marker: its own records identify it (`claim_file`). An
existing file is the command's when its first line is one of its records (or the torn start of one, which the
JSONL store cuts off on open); otherwise it is someone else's.

The check reads only; `Output.mark()` creates the folder and its marker where the command first writes. This
module is plain Python (no JAX): the teacher uses it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from jaxpatience.config_io import ConfigError

MARKER = ".jaxpatience-output.json"


def _json_object(path: Path) -> dict | None:
    """The JSON object in `path`, or None (missing, unreadable, not an object)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _has_keys(path: Path, keys: Sequence[str]) -> bool:
    value = _json_object(path) if path.is_file() else None
    return value is not None and all(key in value for key in keys)


def _only(entries: set[str], allowed: Callable[[str], bool]) -> bool:
    return bool(entries) and all(allowed(name) for name in entries)


# How each command's folders looked before markers: what it always writes there, read without trusting names alone
# (a user's own config.json is not a training run's, whose keys are RunConfig's).
LEGACY: dict[tuple[str, str], Callable[[Path, set[str]], bool]] = {
    ("train", "run"): lambda path, entries: (
        _has_keys(path / "config.json", ("model", "out_dir", "train", "data")) or entries == {"checkpoints"}
    ),
    ("eval", "eval"): lambda path, entries: (
        "generations.jsonl" in entries and ("run.json" in entries or entries == {"generations.jsonl"})
    ),
    ("irpo", "run"): lambda path, entries: _has_keys(
        path / "config.json", ("model", "iterations", "training", "sampling")
    ),
    ("demo", "run"): lambda path, entries: _has_keys(path / "demo_config.json", ("seed", "sft")),
    ("lm-eval", "results"): lambda path, entries: _only(
        entries, lambda name: name == "results.json" or (name.startswith("samples_") and name.endswith(".jsonl"))
    ),
    ("tiny", "checkpoint"): lambda path, entries: (
        "model.safetensors" in entries
        and _has_keys(path / "config.json", ("model_type",))
        and (_json_object(path / "config.json") or {}).get("hidden_size") == 64
        and (_json_object(path / "config.json") or {}).get("num_hidden_layers") == 2
    ),
}


@dataclasses.dataclass(frozen=True)
class Output:
    """A claimed output folder: `mark()` creates it with its marker (idempotent)."""

    path: Path
    command: str
    kind: str

    def mark(self, marker: bool = True) -> Path:
        """Create the folder, with its marker unless `marker` is False (the other processes of a multi-host
        run: process 0 writes the files)."""
        if not marker:
            self.path.mkdir(parents=True, exist_ok=True)
            return self.path
        return mark(self.path, self.command, self.kind)


def mark(path: str | Path, command: str, kind: str) -> Path:
    """Create `path` (and its parents) and write its marker if it has none; returns the folder.

    For a folder already claimed (`claim_folder`), or one a command owns inside its own (the demo's IRPO run)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER
    if not marker.is_file():
        sibling = marker.with_name(MARKER + ".tmp")
        sibling.write_text(json.dumps({"command": command, "kind": kind}) + "\n", encoding="utf-8")
        os.replace(sibling, marker)  # atomic: a kill leaves no half marker
    return path


def _what_is(path: Path) -> str | None:
    """None for a folder or a regular file, else what `path` is (without opening it: a FIFO would block)."""
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return next((name for test, name in kinds if test(mode)), "a socket" if stat.S_ISSOCK(mode) else "a special file")


def _check_path(path: str | Path, command: str, key: str, want: str) -> Path:
    """The checks every output shares: set, and (when it exists) a regular file or folder as `want` says."""
    if path is None or not str(path).strip():
        raise ConfigError(f"{command}: {key} is empty; name the {want} to write.")
    path = Path(path)
    if path.exists():
        odd = _what_is(path)
        if odd is not None:
            raise ConfigError(f"{command}: {key} {path} is {odd}, not a {want}; choose another path.")
    blocking = next((parent for parent in path.absolute().parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"{command}: {key} {path} lies under {blocking}, which is not a folder; choose another path.")
    return path


def _check_inputs(path: Path, command: str, key: str, inputs: Mapping[str, str | Path | None]) -> None:
    """Refuse an output that is one of the command's inputs, lies inside an input folder, or holds an input."""
    out = path.resolve()
    for name, value in inputs.items():
        if not value or not Path(value).exists():  # unset, or a name (a hub dataset) rather than a path
            continue
        source = Path(value).resolve()
        if out == source:
            raise ConfigError(f"{command}: {key} {path} is also {name}, an input; choose another {key}.")
        if source.is_dir() and source in out.parents:
            raise ConfigError(f"{command}: {key} {path} lies inside {name} {value}, an input; choose another {key}.")
        if out in source.parents:
            raise ConfigError(f"{command}: {key} {path} holds {name} {value}, an input; choose another {key}.")


def _owner(path: Path, entries: set[str]) -> tuple[str, str] | None:
    """Who made an unmarked folder, as far as its files tell (LEGACY), or None."""
    return next((owner for owner, looks_like in LEGACY.items() if looks_like(path, entries)), None)


def claim_folder(
    path: str | Path | None,
    command: str,
    kind: str,
    *,
    key: str = "out_dir",
    inputs: Mapping[str, str | Path | None] | None = None,
) -> Output:
    """Check that `path` may be written by `command` as a `kind` folder (see the module docstring); writes nothing.

    key: how the user set the path (`out_dir`, `--out`), named in the refusal. inputs: {key: path} of what the
    command reads; an output may not be, hold, or lie inside any of them."""
    path = _check_path(path, command, key, "folder")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{command}: {key} {path} is a file, not a folder; choose another one.")
    _check_inputs(path, command, key, inputs or {})
    if not path.exists():
        return Output(path, command, kind)
    marker = path / MARKER
    if marker.exists():
        found = _json_object(marker) if marker.is_file() else None
        owner = (found.get("command"), found.get("kind")) if found else None
        if owner != (command, kind):
            known = owner and all(isinstance(name, str) for name in owner)
            whose = f"jaxpatience {owner[0]} ({owner[1]})" if known else "another command (its marker is damaged)"
            raise ConfigError(
                f"{command}: {key} {path} holds the output of {whose}, not of {command} ({kind}); choose another {key}."
            )
        return Output(path, command, kind)
    entries = {entry.name for entry in path.iterdir()} - {MARKER + ".tmp"}  # a marker write cut short
    if not entries:
        return Output(path, command, kind)
    owner = _owner(path, entries)
    if owner == (command, kind) or (owner is not None and LEGACY[(command, kind)](path, entries)):
        return Output(path, command, kind)  # made before markers existed: this command's own
    whose = f"the output of jaxpatience {owner[0]} ({owner[1]})" if owner else "files no jaxpatience command made"
    raise ConfigError(
        f"{command}: {key} {path} is a non-empty folder holding {whose}, not of {command} ({kind}); choose a new or "
        "empty folder."
    )


def claim_file(
    path: str | Path | None,
    command: str,
    *,
    record_keys: Sequence[str] | None,
    key: str = "--out",
    inputs: Mapping[str, str | Path | None] | None = None,
) -> Path:
    """Check that the JSONL file `path` may be appended to by `command`; writes nothing.

    It may not exist yet, be empty, or hold records with every key in `record_keys` (its first line tells, or the
    torn start of one: a first append cut short, which the store cuts off). Anything else is another's file.
    `record_keys` None: a file the command rewrites whole (a summary), checked as a path only."""
    path = _check_path(path, command, key, "file")
    if path.is_dir():
        raise ConfigError(f"{command}: {key} {path} is a folder, not a file; name the .jsonl file to write.")
    _check_inputs(path, command, key, inputs or {})
    if record_keys is None or not path.is_file() or path.stat().st_size == 0:
        return path
    with path.open("rb") as handle:
        first = handle.readline(1 << 20)
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    torn = not first.endswith(b"\n") and first.startswith(b'{"' + record_keys[0].encode() + b'": ')
    if torn or (isinstance(record, dict) and all(name in record for name in record_keys)):
        return path
    raise ConfigError(
        f"{command}: {key} {path} is a file with other records (not {', '.join(record_keys)}); {command} appends to "
        f"its own files only: choose another {key}."
    )
