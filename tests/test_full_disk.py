"""A full disk (ENOSPC): the write that fails leaves every earlier record and the previous checkpoint intact, the
command exits 2 with one sentence, and the rerun resumes.

The disk fills through the fault hook (durability/faults.py: JAXPATIENCE_FAULT="point:n:enospc") everywhere, and
for real on a small tmpfs where the machine lets an unprivileged user mount one (`unshare -rm`; skipped if not).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_kill_anywhere import Launcher, _pairs_file, _problems_file

from jaxpatience import cli
from jaxpatience.durability import faults
from jaxpatience.durability.store import DiskFull, JsonlStore, read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def test_fault_rules_are_parsed_and_checked():
    assert faults.rules("jsonl.append:2:kill, checkpoint.finalize:1:enospc") == [
        ("jsonl.append", 2, "kill"), ("checkpoint.finalize", 1, "enospc")]  # fmt: skip
    for bad in ("jsonl.append:2", "nowhere:1:kill", "jsonl.append:x:kill", "jsonl.append:1:explode"):
        with pytest.raises(ValueError, match="JAXPATIENCE_FAULT"):
            faults.rules(bad)


def test_a_full_disk_mid_append_cuts_the_torn_bytes_and_keeps_the_store_usable(tmp_path, monkeypatch):
    path = tmp_path / "generations.jsonl"
    monkeypatch.setattr(faults, "_passes", {})
    monkeypatch.setenv(faults.ENV, "jsonl.append:2:enospc")
    with JsonlStore(path, ("id",)) as store:
        store.append([{"id": "a"}])
        with pytest.raises(DiskFull, match=f"while writing {path}; its 1 earlier records are intact"):
            store.append([{"id": "b", "text": "x" * 100}])  # half of it was on disk when the disk filled
        assert path.read_bytes() == b'{"id": "a"}\n'  # cut back: no torn line for a later append to follow
        store.append([{"id": "c"}])
    assert read_jsonl(path, ("id",)) == [{"id": "a"}, {"id": "c"}]


def test_a_full_disk_before_a_rename_keeps_the_old_file_and_leaves_no_sibling(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"id": "old"}])
    monkeypatch.setattr(faults, "_passes", {})
    monkeypatch.setenv(faults.ENV, "jsonl.rewrite:1:enospc,jsonl.rewrite:2:enospc")
    with pytest.raises(DiskFull, match="the file as it was is intact"):
        write_jsonl(path, [{"id": "new"}])
    with JsonlStore(path, ("id",)) as store, pytest.raises(DiskFull, match="its 1 records as they were are intact"):
        store.rewrite([{"id": "new"}])
    assert read_jsonl(path) == [{"id": "old"}] and sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


def test_a_full_disk_is_one_sentence_and_status_2(capsys):
    def full(err):
        def run():
            raise err

        return run

    message = "no space left on device while writing x.jsonl; its 3 earlier records are intact"
    assert cli._guarded(full(DiskFull(message))) == 2
    assert capsys.readouterr().err == f"jaxpatience: error: {message}; free space and rerun to resume.\n"
    assert cli._guarded(full(OSError(28, "No space left on device", "/out/summary.json"))) == 2
    said = "no space left on device while writing /out/summary.json; free space and rerun to resume."
    assert capsys.readouterr().err == f"jaxpatience: error: {said}\n"


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    launcher = Launcher(tmp_path_factory.mktemp("full"))
    yield launcher
    launcher.close()


def _last_line(log: Path) -> str:
    return log.read_text().strip().splitlines()[-1]


def test_train_with_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_resumes(launcher):
    root = launcher.root
    assert launcher.run(["tiny", "--out", str(root / "tiny")], root / "tiny.log") == 0
    out = root / "train"
    args = ["train", "--no-progress", f"model={root / 'tiny'}", f"data.path={_pairs_file(root / 'pairs.jsonl', 8)}",
            "data.max_length=64", "data.buckets=[64]", "train.batch_size=4", "train.max_steps=3", "train.lora.rank=4",
            "checkpoint_every=1", "log_every=1", "keep_checkpoints=1", f"out_dir={out}"]  # fmt: skip
    log = root / "train.log"
    # orbax passes the point three times a save: the 4th is the first item of step 2's
    assert launcher.run(args, log, fault="checkpoint.finalize:4:enospc") == 2
    text = log.read_text()
    assert "Traceback" not in text
    assert _last_line(log) == (f"jaxpatience: error: no space left on device while writing the checkpoint of step 2 in "
                               f"{out / 'checkpoints'}; the checkpoint of step 1 is intact; free space and rerun to "
                               "resume.")  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if "tmp" not in p.name) == ["1"]  # keep=1 kept it
    log.write_text("")
    assert launcher.run(args, log) == 0
    assert "resuming from step 1 of 3" in log.read_text()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert not [p for p in (out / "checkpoints").iterdir() if "tmp" in p.name]  # orbax's leftover is cleaned up


def test_eval_with_a_full_disk_mid_write_keeps_its_records_and_resumes(launcher):
    root = launcher.root
    out = root / "eval"
    args = ["eval", "--no-progress", "--model", str(root / "tiny"), "--dataset",
            str(_problems_file(root / "problems.jsonl", 6)), "--batch-size", "2", "--max-new-tokens", "8",
            "--prompt-style", "question", "--out", str(out)]  # fmt: skip
    log = root / "eval.log"
    assert launcher.run(args, log, fault="jsonl.append:2:enospc") == 2
    assert "Traceback" not in log.read_text()
    said = f"no space left on device while writing {out / 'generations.jsonl'}; its 2 earlier records are intact"
    assert _last_line(log) == f"jaxpatience: error: {said}; free space and rerun to resume."
    assert len(read_jsonl(out / "generations.jsonl")) == 2  # the whole first batch, nothing of the second
    assert launcher.run(args, log) == 0
    assert sorted(r["id"] for r in read_jsonl(out / "generations.jsonl")) == [f"p{i}" for i in range(6)]


# A real full disk: a tmpfs mounted in a user namespace of its own, filled by the store and by orbax.
REAL_DISK = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import jax.numpy as jnp
    from jaxpatience.training.checkpoint import Checkpointer
    from jaxpatience.durability.store import DiskFull, JsonlStore, read_jsonl
    disk = Path(sys.argv[1])
    appended = 0
    try:
        with JsonlStore(disk / "records.jsonl", ("id",)) as store:
            while True:
                store.append([{"id": appended, "text": "x" * 3000}])
                appended += 1
    except DiskFull as err:
        print("store:", err)
    assert [r["id"] for r in read_jsonl(disk / "records.jsonl")] == list(range(appended))
    (disk / "records.jsonl").unlink()
    checkpoints = Checkpointer(disk / "checkpoints", keep=3)
    checkpoints.save(1, {"w": jnp.ones(1000)}, {"step": 1})
    with open(disk / "ballast", "wb", buffering=0) as ballast:  # fill what is left
        try:
            while True:
                ballast.write(b"0" * 4096)
        except OSError:
            pass
    try:
        checkpoints.save(2, {"w": jnp.ones(20000)}, {"step": 2})
        raise SystemExit("the save on a full disk did not fail")
    except DiskFull as err:
        print("checkpoint:", err)
    checkpoints.close()
    (disk / "ballast").unlink()
    again = Checkpointer(disk / "checkpoints", keep=3)
    state, meta = again.restore({"w": jnp.zeros(1000)})
    assert again.latest_step() == 1 and meta == {"step": 1} and float(state["w"].sum()) == 1000
    print("left:", sorted(p.name for p in (disk / "checkpoints").iterdir()))
""")


def test_a_real_full_disk_on_a_small_tmpfs(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("this machine does not let an unprivileged user mount a tmpfs (unshare -rm)")
    (tmp_path / "fill.py").write_text(REAL_DISK)
    command = f"mount -t tmpfs -o size=160k tmpfs {disk} && exec {sys.executable} {tmp_path / 'fill.py'} {disk}"
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert lines["store"].startswith(f"no space left on device while writing {disk / 'records.jsonl'}; its ")
    assert lines["checkpoint"] == (f"no space left on device while writing the checkpoint of step 2 in "
                                   f"{disk / 'checkpoints'}; the checkpoint of step 1 is intact")  # fmt: skip
    assert json.loads(lines["left"].replace("'", '"')) == ["1"]  # the failed save's tmp directory was cleaned up
