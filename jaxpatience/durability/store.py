"""The one durable JSONL store: every file of records the project appends to and resumes from.

Users: the teacher's pairs and drops (teacher/run.py), the evaluator's generations (evaluation/evaluate.py), self-play
pairs (data/selfplay.py), training metrics (metrics.py), the demo's data files (recipes/demo.py); `iter_jsonl` also
reads users' own .jsonl inputs.

Durability: `JsonlStore.append` writes a batch of records at once (the file is unbuffered) and fsyncs before it
returns, so a crash (even SIGKILL) can leave at most a torn *last* line behind. `write_jsonl` and
`JsonlStore.rewrite` replace a whole file atomically (write a sibling, fsync, rename).

The one policy for a torn line, applied when a store is opened:
  * the last line, if it is not a whole record, is the remains of an interrupted write: it is cut off;
  * a last line that is a whole record but lacks its newline is kept (the newline is added);
  * a broken line anywhere else was not written by us: an error naming the file and line.
A record is whole when it parses as a JSON object holding every key in `required`.

A full disk (ENOSPC) never leaves a torn line behind a run that goes on: a failed append cuts the file back to
where it started, a failed rewrite removes its sibling and leaves the old file; either raises `DiskFull`, one
sentence naming the file and what is intact. Fault points for tests (faults.py): `jsonl.append` (half of the
bytes written), `jsonl.rewrite` (the sibling written, not yet renamed).

A second writer is refused: `JsonlStore.open` takes an exclusive advisory lock (POSIX `flock`) on the file.
This module is plain Python (no JAX, no numpy).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from jaxpatience.durability import faults

try:
    import fcntl
except ImportError:  # Windows: no advisory lock (see _lock)
    fcntl = None


class StoreError(ValueError):
    """A user-facing problem with a JSONL file (broken line, second writer); one sentence naming the file."""


class DiskFull(OSError):
    """A write that found no space left: one sentence naming the file and what is intact (cli.py adds the remedy)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from, as orbax and tensorstore wrap theirs) says the disk is full."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def reporting_full_disk(what: str, kept: str) -> Iterator[None]:
    """Turn a full disk while writing `what` into `DiskFull`: "no space left on device while writing {what}; {kept}"."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise DiskFull(f"no space left on device while writing {what}; {kept}") from err


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a user's .jsonl file; strict (no repair)."""
    path = Path(path)
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            yield number, _parse_line(raw, path, number)


def _parse_line(raw: bytes, path: Path, number: int) -> object:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise StoreError(f"{path}, line {number}: not UTF-8 text.") from None
    except json.JSONDecodeError as err:
        raise StoreError(f"{path}, line {number}: not valid JSON ({err.msg}).") from None


def _whole(raw: bytes, required: Sequence[str]) -> dict | None:
    """The record on a line if it is whole (a JSON object with the required keys), else None."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or any(key not in record for key in required):
        return None
    return record


def _scan(data: bytes, path: Path, required: Sequence[str]) -> tuple[list[dict], int, bytes | None]:
    """(whole records, length of the valid prefix of `data`, a whole last record lacking its newline or None)."""
    *lines, tail = data.split(b"\n")  # `tail`: what follows the last newline; b"" unless the last write was torn
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1) if not tail.strip() else None
    records, keep = [], 0
    for index, line in enumerate(lines):
        if line.strip():
            record = _whole(line, required)
            if record is None:
                if index == last:  # a broken final line (its newline made it): cut it like a torn one
                    return records, keep, None
                raise StoreError(
                    f"{path}, line {index + 1}: not a record ({', '.join(required) or 'a JSON object'} expected); "
                    "only a torn last line is repaired: fix or remove that line."
                )
            records.append(record)
        keep += len(line) + 1
    tail_record = _whole(tail, required) if tail.strip() else None
    if tail_record is not None:
        records.append(tail_record)
        return records, keep, tail
    return records, keep, None


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict]:
    """The whole records of a store file (a torn last line is ignored, not repaired); [] if it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return _scan(path.read_bytes(), path, required)[0]


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Replace `path` with `records`, atomically: a crash leaves the old file or the new one, never a mix."""
    path = Path(path)
    with reporting_full_disk(path, "the file as it was is intact" if path.exists() else "nothing was written"):
        tmp = _write_sibling(path, records)
        try:
            faults.point("jsonl.rewrite", path)
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
    return path


def _write_sibling(path: Path, records: Iterable[dict]) -> Path:
    """`records` written and fsynced to `path`.tmp (same directory, so that renaming it over `path` is atomic);
    on a failure (a full disk) the sibling is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write("".join(_line(record) for record in records))
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


class JsonlStore:
    """An append-only JSONL file with one writer, resumed across runs.

    `with JsonlStore(path, required=("id",)) as store:` locks the file, repairs a torn end and reads the whole
    records into `store.records`; `store.append([...])` is durable when it returns.
    """

    def __init__(self, path: str | Path, required: Sequence[str] = ()):
        self.path = Path(path)
        self.required = tuple(required)
        self.records: list[dict] = []
        self._file = None

    def open(self) -> JsonlStore:
        """Lock the file (StoreError if another run holds it), cut a torn end, read the records; returns self."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: every append is synced anyway, and a failed write must leave no bytes queued for a later flush.
        self._file = open(self.path, "a+b", buffering=0)  # noqa: SIM115 - closed in close()
        try:
            _lock(self._file, self.path)  # before reading: a repair must not race another run's writes
            self.records = self._repair()
        except BaseException:
            self.close()
            raise
        return self

    def _repair(self) -> list[dict]:
        """Read the records; cut a torn last line (see the module docstring) and say so on stderr."""
        self._file.seek(0)
        data = self._file.read()
        records, keep, tail = _scan(data, self.path, self.required)
        if keep < len(data):
            self._file.truncate(keep)
            if tail is not None:  # a whole record that only lacked its newline
                self._file.seek(keep)
                self._write_all(tail + b"\n")
            else:
                print(f"jaxpatience: repaired the end of {self.path} (left by an interrupted run).", file=sys.stderr)
            self._sync()
        return records

    def append(self, records: Sequence[dict]) -> None:
        """Append records with one write, durable (fsynced) when this returns; if the write fails (a full disk),
        the file is cut back to where it was, so that a run that goes on never writes after a torn line."""
        if not records:
            return
        data = "".join(_line(record) for record in records).encode("utf-8")
        start = self._file.seek(0, os.SEEK_END)
        kept = f"its {len(self.records)} earlier records are intact"
        with reporting_full_disk(self.path, kept):
            try:
                half = len(data) // 2 if faults.armed() else 0  # a test's kill or full disk lands mid-line
                self._write_all(data[:half])
                if half:
                    self._sync()  # the first half on disk, as a kill in the middle of a write would leave it
                    faults.point("jsonl.append", self.path)
                self._write_all(data[half:])
                self._sync()
            except BaseException:
                with contextlib.suppress(OSError):
                    self._file.truncate(start)
                raise
        self.records.extend(records)

    def _write_all(self, data: bytes) -> None:
        """`data` at the end of the file (an unbuffered write may write only part of it)."""
        view = memoryview(data)
        while view:
            view = view[self._file.write(view) :]

    def rewrite(self, records: Sequence[dict]) -> None:
        """Replace the file's records atomically (e.g. to drop the incomplete ones of an interrupted run)."""
        records = list(records)
        with reporting_full_disk(self.path, f"its {len(self.records)} records as they were are intact"):
            tmp = _write_sibling(self.path, records)
            # The renamed file is a new inode, and a lock belongs to an inode: lock the new one *before* it appears
            # under `path`, so that no second writer can slip in between the rename and the lock.
            handle = open(tmp, "a+b", buffering=0)  # noqa: SIM115 - becomes self._file, closed in close()
            try:
                _lock(handle, self.path)
                faults.point("jsonl.rewrite", self.path)
                os.replace(tmp, self.path)
            except BaseException:
                handle.close()
                _remove(tmp)
                raise
        self._file.close()  # the old inode (no longer under `path`) and its lock
        self._file = handle
        self.records = records

    def _sync(self) -> None:
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None

    def __enter__(self) -> JsonlStore:
        return self if self._file is not None else self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(handle, path: Path) -> None:
    """An exclusive advisory lock, so that two runs never append to one file at once (POSIX only)."""
    if fcntl is None:  # Windows: no lock
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreError(f"{path} is being written by another run; wait for it or use another output.") from None
