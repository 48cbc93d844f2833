"""Progress bars: tqdm on a terminal, a few plain lines in a log file (no carriage-return redraws)."""

from __future__ import annotations

import subprocess
import sys

from jaxpatience.durability import progress


def test_a_log_gets_periodic_plain_lines_and_a_last_one(capsys):
    bar = progress.bar(100, desc="train", unit="step", initial=10, every=0.0)  # pytest's stderr is no terminal
    assert isinstance(bar, progress.LogBar)
    for _ in range(90):
        bar.update()
        bar.set_postfix(loss="0.25")
    bar.close()
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 91 and "\r" not in "".join(lines)  # 90 updates (every=0) and one at close, none after
    assert lines[0].startswith("train: 11/100 step (11%), ") and "left" in lines[0]
    assert lines[1].endswith("left, loss=0.25")
    assert lines[-1].startswith("train: 100/100 step (100%)") and "left" not in lines[-1]


def test_lines_come_at_most_every_period_and_a_disabled_bar_is_silent(capsys):
    bar = progress.bar(1000, desc="eval", unit="problem")  # the default period: 30 s
    for _ in range(1000):
        bar.update()
    bar.close()
    quiet = progress.bar(5, desc="eval", unit="problem", enabled=False)
    quiet.update(5)
    quiet.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval: 1000/1000 problem (100%), ")


def test_a_log_file_of_the_train_loop_has_no_redraws(tmp_path):
    """A command's stderr redirected to a file, as `make demo > demo.log 2>&1` does."""
    code = ("from jaxpatience.durability import progress\n"
            "bar = progress.bar(3000, desc='train', unit='step', every=0.0)\n"
            "for _ in range(3000): bar.update()\n"
            "bar.close()\n")  # fmt: skip
    log = tmp_path / "run.log"
    with log.open("w") as handle:
        subprocess.run([sys.executable, "-c", code], stderr=handle, check=True)
    text = log.read_text()
    assert "\r" not in text and text.splitlines()[-1].startswith("train: 3000/3000 step")
