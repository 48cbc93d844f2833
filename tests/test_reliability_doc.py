"""docs/RELIABILITY.md stays true: every test it names exists, and every bad-input case has its row."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "RELIABILITY.md").read_text(encoding="utf-8")


def test_every_test_the_table_names_exists():
    named = set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", DOC))
    assert len(named) >= 30
    defined = lambda file, name: re.search(rf"^def {name}\(", (ROOT / file).read_text(encoding="utf-8"), re.MULTILINE)
    missing = [f"{file}::{name}" for file, name in sorted(named) if not defined(file, name)]
    assert not missing, f"RELIABILITY.md names tests that do not exist: {missing}"


def test_every_bad_input_case_has_its_row_and_the_table_has_60_or_more():
    from test_bad_inputs import CASES

    rows = [line for line in DOC.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    listed = set(re.findall(r"\| `([\w-]+)` \|$", DOC, re.MULTILINE))
    assert set(CASES) - listed == set(), f"cases without a row: {sorted(set(CASES) - listed)}"
    assert listed - set(CASES) == set(), f"rows for cases that do not exist: {sorted(listed - set(CASES))}"
    assert len(rows) >= 60
