"""Answer extraction, normalisation, scoring, majority vote and intervals (pure functions; no model)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from jaxpatience.data import answers
from jaxpatience.data.answers import (
    answers_equal,
    behaviour_markers,
    extract_boxed,
    extract_flexible,
    extract_gold,
    extract_strict,
    maj_at_k,
    majority_vote,
    normalize_answer,
    parse_number,
    powers_of_two_up_to,
    score_response,
    wilson_interval,
)

# (response, strict reading, flexible reading) for a numeric gold answer.
EXTRACTION_TABLE = [
    ("The answer is 1,234.", "1234", "1234"),  # thousands separator, trailing full stop
    ("so 3 + 4 = 7\n#### 7", "7", "7"),  # GSM8K's own format
    ("#### 1,000,000", "1000000", "1000000"),
    ("I get -5. The answer is −5", "-5", "-5"),  # ASCII and Unicode minus
    ("10-3=7, so the answer is 7", "7", "7"),  # a subtraction is not a negative number
    ("The answer is $12.50.", "12.5", "12.5"),  # dollars, trailing zero, trailing dot
    ("The answer is \\$18.", "18", "18"),
    ("The answer is 3/4", "0.75", "0.75"),  # a fraction equals its decimal
    ("The answer is .5", "0.5", "0.5"),
    ("The answer is approximately 3.14.", "3.14", "3.14"),
    ("So we get \\boxed{\\frac{1}{2}}", "0.5", "2"),  # strict reads the box; flexible only sees the last number
    ("Thus \\boxed{72}. Check: 8 * 9 = 72", "72", "72"),
    ("The answer is \\boxed{x = 5}.", "5", "5"),
    ("The final answer is: 42 apples. Each costs 3 dollars", "42", "3"),  # flexible: last number wins
    ("Totals: 3, 8 and 20 apples.", None, "20"),  # several numbers, no marker
    ("no numbers here at all", None, None),  # none
    ("", None, None),
    ("#### Step 2: add them\n5 + 6 = 11", None, "11"),  # '####' as a markdown heading is not an answer
    ("#### Step 2: add\n5 + 6 = 11. The answer is 11.", "11", "11"),
    ("#### 18\nWait, that is wrong. The answer is 20.", "20", "20"),  # the last marker wins
    ("The answer is 18 and not 20", "18", "20"),
    ("answers 1, 2, 3", None, "3"),  # a list is three numbers, not 123
    ("It costs $1,000 in total, the answer is 1,000", "1000", "1000"),
    ("**Final Answer:** 18", "18", "18"),  # markdown
    ("The answer is **18**.", "18", "18"),
]


@pytest.mark.parametrize(("response", "strict", "flexible"), EXTRACTION_TABLE)
def test_extraction_table(response, strict, flexible):
    assert extract_strict(response) == strict
    assert extract_flexible(response) == flexible


@pytest.mark.parametrize(
    ("gold", "canonical"),
    [
        ("1,000", "1000"),
        ("$12.50", "12.5"),
        ("72.", "72"),
        ("-3", "-3"),
        ("\\frac{1}{2}", "0.5"),
        ("10\\%", "10"),
        ("5\\text{ cm}", "5"),
        ("1/3", "1/3"),  # not a terminating decimal: stays an exact fraction
        ("0.1", "0.1"),
        ("1,2", "1,2"),  # a list of two answers, not the number 12
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\dfrac{\\pi}{2}", "\\frac{\\pi}{2}"),
    ],
)
def test_gold_normalisation(gold, canonical):
    assert normalize_answer(gold) == canonical


def test_parse_number_is_exact():
    assert parse_number("0.1") + parse_number("0.2") == Fraction(3, 10)  # no float rounding
    assert parse_number("12.50") == parse_number("12.5") == Fraction(25, 2)
    assert parse_number("abc") is None and parse_number("1,23") is None


# One number, written in the ways a gold answer or a response writes it: every spelling reads as every other.
SPELLINGS_OF_20 = ["20", "+20", "2e1", "2E1", "+2e1", "20.0", "20.", "200e-1", "$20", "20 apples"]


@pytest.mark.parametrize("gold", SPELLINGS_OF_20)
@pytest.mark.parametrize("written", SPELLINGS_OF_20)
def test_a_number_scores_right_however_gold_and_response_spell_it(gold, written):
    """Gold `+20` or `2e1` used to read as LaTeX text, so a response "20" scored wrong (and "The answer is 2e1"
    read as 2): both directions, every reading."""
    scores = score_response(f"Adding them gives the total.\nThe answer is {written}.", gold, use_math_verify=False)
    assert scores["strict"] == "20" and scores["correct"] == {"strict": True, "flexible": True, "math_verify": None}
    assert normalize_answer(gold) == normalize_answer(written) == "20"


def test_signs_exponents_and_thousands_keep_their_value():
    assert parse_number("+1,000") == parse_number("1e3") == parse_number("1,000.0") == 1000
    assert parse_number("-2.5e-1") == Fraction(-1, 4) and parse_number("+\\frac{3}{4}") == Fraction(3, 4)
    assert not answers_equal("20", "+21") and not answers_equal("2e2", "20")
    # Not numbers: a bare letter, an exponent without digits, an exponent past three digits (no huge integers).
    assert parse_number("e") is None and parse_number("2e") is None and parse_number("1e1000") is None
    assert extract_flexible("so 5+3=8") == "8" and extract_flexible("3 + 4 = 7") == "7"  # a sum is no sign
    assert extract_strict("The answer is 10e3 grams.") == "10000"
    assert majority_vote([normalize_answer(a) for a in ("2e1", "+20", "21", "21")]) == "20"  # 2-2: first seen


def test_extract_gold_from_each_layout():
    assert extract_gold("Natalia sold 48/2 = 24 clips in May.\n#### 72") == "72"
    assert extract_gold("So the total is $\\boxed{\\frac{3}{4}}$ of the cake, as required.") == "\\frac{3}{4}"
    assert extract_gold("\\frac{3}{4}") == "\\frac{3}{4}"  # MATH-500's bare answer field


def test_boxed_matches_nested_braces():
    assert extract_boxed("first \\boxed{1} then \\boxed{\\frac{\\sqrt{3}}{2}} done") == "\\frac{\\sqrt{3}}{2}"
    assert extract_boxed("\\boxed{unclosed") is None


def test_latex_answers():
    assert extract_strict("The answer is $\\frac{\\pi}{2}$.", numeric=False) == "\\frac{\\pi}{2}"
    assert answers_equal(extract_strict("so \\boxed{\\dfrac{\\pi}{2}}", numeric=False), "\\frac{\\pi}{2}")
    assert not answers_equal("\\frac{\\pi}{3}", "\\frac{\\pi}{2}")


def test_score_response_reports_every_reading():
    scores = score_response("First 3 + 4 = 7. The answer is 7. Then 8", "7")
    assert scores["strict"] == "7" and scores["flexible"] == "8"
    assert scores["correct"]["strict"] is True and scores["correct"]["flexible"] is False
    if answers.math_verify_available() is None:
        assert score_response("so \\boxed{0.5}", "\\frac{1}{2}")["correct"]["math_verify"] is True
        assert score_response("so \\boxed{0.25}", "\\frac{1}{2}")["correct"]["math_verify"] is False
    else:
        assert scores["correct"]["math_verify"] is None


def test_majority_vote_ties_go_to_the_first_seen():
    assert majority_vote(["3", None, "4", "4", "3"]) == "3"  # 2-2 tie: "3" came first
    assert majority_vote(["4", "3", "3", "4"]) == "4"
    assert majority_vote(["5", "6", "6"]) == "6"  # a clear majority beats the first sample
    assert majority_vote([None, "9", None, None]) == "9"  # unanswered samples do not vote
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_maj_at_k_on_hand_made_samples():
    golds = ["1", "2", "3"]
    samples = [
        ["1", "0", "1", "1"],  # right at k=1, tie 1-1 at k=2 -> first seen "1": right, majority right at 4
        ["0", "2", "2", "0"],  # wrong at 1, tie at 2 -> "0" wrong, 2-2 tie at 4 -> "0" first: wrong
        [None, "3", "4", "3"],  # no answer at 1 (wrong), "3" at 2, "3" at 4
    ]
    assert maj_at_k(samples, golds, 1) == pytest.approx(1 / 3)
    assert maj_at_k(samples, golds, 2) == pytest.approx(2 / 3)
    assert maj_at_k(samples, golds, 4) == pytest.approx(2 / 3)
    # Normalised answers vote together; equality with the gold is numeric.
    assert maj_at_k([[normalize_answer("1,000"), "7", normalize_answer("1000.0")]], ["1000"], 3) == 1.0


def test_powers_of_two():
    assert powers_of_two_up_to(1) == [1]
    assert powers_of_two_up_to(8) == [1, 2, 4, 8]
    assert powers_of_two_up_to(6) == [1, 2, 4, 6]


def test_wilson_interval():
    low, high = wilson_interval(5, 10)
    assert low < 0.5 < high and math.isclose(0.5 - low, high - 0.5)  # symmetric at p = 1/2
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] > 0  # never a zero-width interval
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(10, 10)[0] < 1
    # Matches the closed form for 81/100 at z = 1.96 (Wilson 1927), computed independently here.
    p, n, z = 0.81, 100, 1.959964
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert wilson_interval(81, 100) == pytest.approx((centre - half, centre + half))
    narrow, wide = wilson_interval(810, 1000), wilson_interval(81, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]  # more problems, narrower interval


def test_behaviour_markers():
    found = behaviour_markers("Wait, let me check: 3 + 4 = 7. Let me double-check. Hmm, actually it is 8.")
    assert {"wait", "let me check", "double-check", "hmm", "actually"} <= set(found)
    assert behaviour_markers("3 + 4 = 7. The answer is 7.") == []
    assert "wait" not in behaviour_markers("The waiter brought 3 plates.")  # whole words only
