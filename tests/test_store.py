"""The one durable JSONL store (durability/store.py): the torn-line policy, the lock, appends, atomic rewrites.

The policy is tested here once; the stores' users (the teacher, the evaluator, self-play, the demo) test only
what they add on top of it (resume by id, a SIGKILLed run).
"""

from __future__ import annotations

import json
import os
import re

import pytest

from jaxpatience.data.selfplay import SelfPlayStats, write_pairs
from jaxpatience.durability import store as store_module
from jaxpatience.durability.store import JsonlStore, StoreError, iter_jsonl, read_jsonl, write_jsonl

REQUIRED = ("id",)


def ids(records: list[dict]) -> list[str]:
    return [record["id"] for record in records]


# ---------------------------------------------------------------------------------------------------
# The torn-line policy, applied when a store is opened.


def test_torn_last_line_is_cut(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "chosen": "Step 1')  # a crash mid-write
    with JsonlStore(path, REQUIRED) as store:
        assert ids(store.records) == ["a", "b"]
        assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'
        store.append([{"id": "c", "chosen": "Step 1, then 2"}])
    assert "repaired the end of" in capsys.readouterr().err
    # The new record starts on a line of its own, not glued to the remains of the torn one.
    assert path.read_text().splitlines() == ['{"id": "a"}', '{"id": "b"}', '{"id": "c", "chosen": "Step 1, then 2"}']


def test_whole_last_record_without_newline_is_kept(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}')
    with JsonlStore(path, REQUIRED) as store:
        assert ids(store.records) == ["a", "b"]
        store.append([{"id": "c"}])
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'
    assert "repaired" not in capsys.readouterr().err  # nothing was lost, so nothing to report


@pytest.mark.parametrize(
    "last",
    [b"not json\n", b'{"chosen": "no id"}\n', b'["a", "list"]\n', b'\xff\xfe{"id": "c"}\n', b"{not json\n\n  \n"],
    ids=["garbled", "no-id", "not-an-object", "not-utf8", "garbled-then-blank-lines"],
)
def test_broken_last_line_with_its_newline_is_cut(tmp_path, last):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"id": "a"}\n' + last)
    with JsonlStore(path, REQUIRED) as store:
        assert store.records == [{"id": "a"}]
    assert path.read_bytes() == b'{"id": "a"}\n'


@pytest.mark.parametrize(
    "middle", [b"not json", b'{"chosen": "no id"}', b'\xff\xfe{"id": "x"}'], ids=["garbled", "no-id", "not-utf8"]
)
def test_broken_middle_line_is_an_error_and_changes_nothing(tmp_path, middle):
    path = tmp_path / "pairs.jsonl"
    data = b'{"id": "a"}\n' + middle + b'\n{"id": "b"}\n{"id": "c", "cho'  # the torn end is not cut either
    path.write_bytes(data)
    with pytest.raises(StoreError, match=re.escape(f"{path}, line 2: ")):
        JsonlStore(path, REQUIRED).open()
    with pytest.raises(StoreError, match=re.escape(f"{path}, line 2: ")):
        read_jsonl(path, REQUIRED)
    assert path.read_bytes() == data
    path.write_bytes(b'{"id": "a"}\n')  # once fixed, the file opens: the failed open released its lock
    with JsonlStore(path, REQUIRED) as store:
        assert store.records == [{"id": "a"}]


def test_iter_jsonl_reads_users_files_strictly(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_bytes(b'{"id": "a"}\n\n[1, 2]\n')
    assert list(iter_jsonl(path)) == [(1, {"id": "a"}), (3, [1, 2])]  # blank lines skipped, numbers kept
    path.write_bytes(b'{"id": "a"}\n\n[1, 2]\n\xff\n')
    with pytest.raises(StoreError, match=re.escape(f"{path}, line 4: not UTF-8")):
        list(iter_jsonl(path))
    path.write_bytes(b'{"id": "a"}\n\n[1, 2]\n{"id": "b", "cho')  # a torn end is not ours to repair here
    with pytest.raises(StoreError, match=re.escape(f"{path}, line 4: not valid JSON")):
        list(iter_jsonl(path))


# ---------------------------------------------------------------------------------------------------
# One writer; durable appends; atomic rewrites; a reader that never writes.


def test_a_second_writer_is_refused_while_the_first_is_open(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with JsonlStore(path, REQUIRED) as first:
        first.append([{"id": "a"}])
        with pytest.raises(StoreError, match="being written by another run"):
            JsonlStore(path, REQUIRED).open()
        assert read_jsonl(path, REQUIRED) == [{"id": "a"}]  # a reader is never refused
        first.append([{"id": "b"}])  # the refused open left the first writer's file alone
    with JsonlStore(path, REQUIRED) as second:  # closing released the lock
        assert ids(second.records) == ["a", "b"]


def test_appends_are_synced_and_read_back_exactly(tmp_path, monkeypatch):
    path = tmp_path / "out" / "pairs.jsonl"  # the directory is created
    batches = [[{"id": "a", "text": "naïve “quotes” ✓\nsecond line", "n": 1}], [], [{"id": "b", "x": [2.5, None]}, {}]]
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(store_module.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    with JsonlStore(path) as store:
        for batch in batches:
            before = len(synced)
            store.append(batch)
            assert len(synced) == before + (1 if batch else 0)  # durable when append returns; one sync a batch
        flat = [record for batch in batches for record in batch]
        assert store.records == flat
    with JsonlStore(path) as again:
        assert again.records == flat
    assert len(path.read_bytes().splitlines()) == len(flat)  # one line a record, none for the empty batch


def test_rewrite_is_atomic_and_keeps_the_lock(tmp_path, monkeypatch):
    path = tmp_path / "generations.jsonl"
    with JsonlStore(path, REQUIRED) as store:
        store.append([{"id": "a"}, {"id": "b"}, {"id": "c"}])
        store.rewrite([{"id": "a"}, {"id": "c"}])
        assert ids(store.records) == ids(read_jsonl(path, REQUIRED)) == ["a", "c"]
        with pytest.raises(StoreError, match="another run"):  # the new file (a new inode) is locked too
            JsonlStore(path, REQUIRED).open()
        store.append([{"id": "d"}])  # appends go to the new file

        def crash(*args):
            raise OSError("disk full")

        monkeypatch.setattr(store_module.os, "replace", crash)
        with pytest.raises(OSError, match="disk full"):
            store.rewrite([{"id": "z"}])
        monkeypatch.undo()
        assert ids(read_jsonl(path, REQUIRED)) == ids(store.records) == ["a", "c", "d"]  # the old file, whole
        store.append([{"id": "e"}])  # a failed rewrite leaves the store usable, and locked
        with pytest.raises(StoreError, match="another run"):
            JsonlStore(path, REQUIRED).open()
    assert ids(read_jsonl(path, REQUIRED)) == ["a", "c", "d", "e"]


def test_read_jsonl_does_not_modify_the_file(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    for data, expected in [
        (b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "cho', ["a", "b"]),  # a torn end: ignored, not cut
        (b'{"id": "a"}\n{"id": "b"}', ["a", "b"]),  # no final newline: none added
        (b'{"id": "a"}\nnot json\n', ["a"]),  # a broken last line: ignored, not cut
    ]:
        path.write_bytes(data)
        mtime = path.stat().st_mtime_ns
        assert ids(read_jsonl(path, REQUIRED)) == expected
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime
    assert capsys.readouterr().err == ""
    missing = tmp_path / "missing.jsonl"
    assert read_jsonl(missing, REQUIRED) == [] and not missing.exists()


# ---------------------------------------------------------------------------------------------------
# Whole-file writes (self-play pairs, the demo's data files).


def test_write_jsonl_replaces_the_file_with_exactly_the_records(tmp_path):
    records = [{"id": "a", "text": "ünïcode\nand a newline"}, {"id": 2, "x": [1, {"y": None}]}]
    path = write_jsonl(tmp_path / "sub" / "data.jsonl", records)
    assert [value for _, value in iter_jsonl(path)] == records
    write_jsonl(path, records[:1])  # replaces, never appends
    assert read_jsonl(path) == records[:1]


def test_selfplay_pairs_and_stats_are_written_whole(tmp_path):
    pairs = [{"id": "p-0", "prompt": "<|im_start|>user\n2+2?", "chosen": "4", "rejected": "5", "gold": "4"}]
    write_pairs(tmp_path / "pairs.jsonl", pairs, SelfPlayStats(problems=1, with_pairs=1, pairs=1))
    assert read_jsonl(tmp_path / "pairs.jsonl", REQUIRED) == pairs
    assert json.loads((tmp_path / "pairs.jsonl.stats.json").read_text())["pairs"] == 1
