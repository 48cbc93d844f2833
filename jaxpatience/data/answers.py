"""Final-answer extraction, normalisation, scoring, majority vote and interval arithmetic: pure functions.

Three readings of a response are reported side by side, as lm-evaluation-harness users expect:

* **strict**: the last explicit final-answer marker: `#### N`, `The (final) answer is N` or `\\boxed{N}`.
  A response that never commits to an answer scores zero, however many numbers it wrote.
* **flexible**: the last number anywhere in the response (lm-eval's "flexible-extract"); for a LaTeX gold
  answer, the strict reading when there is one, else the last number.
* **math_verify**: Hugging Face's `math-verify` equivalence of the whole response against the gold answer
  (symbolic: `\\frac{1}{2}` = `0.5`); reported as unavailable when the package is not installed.

Gold answers are normalised the same way as extracted ones (commas, `$`, units in `\\text{}`, trailing dot), and
two answers that both read as numbers are compared as exact fractions (`12.50` = `12.5`, `1/2` = `0.5`, `+20` =
`2e1` = `20`): `parse_number` is the one reading of a number, for gold and predicted answers alike.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from decimal import Decimal, localcontext
from fractions import Fraction

# A number as written in a solution: optional sign (`+`, ASCII or Unicode minus), optional `$`, thousands groups or
# plain digits, optional decimals, optional exponent (`2e1`, up to three digits), optional `/denominator`.
# Thousands groups come first so that "1,000" is one number while "1, 2, 3" stays three.
_EXPONENT = r"(?:[eE][-+]?\d{1,3})?"
NUMBER_RE = re.compile(
    r"(?<![\w.])[-−+]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
    + _EXPONENT
    + r"(?:/\d+(?:\.\d+)?)?(?!\d)|(?<![\w.])[-−+]?\.\d+"
    + _EXPONENT
    + r"(?!\d)"
)
# Explicit final-answer markers. The value runs to the end of the line (or of the sentence for "answer is").
_HASH_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"(?:final\s+)?answer\s*(?:is|:)\s*:?\s*([^\n]*)", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MARKER_NUMBER_RE = re.compile(
    r"\s*(?:(?:approximately|about|roughly|exactly|only|just|a total of|equal to|=)\s*)?\\?\$?\s*("
    + NUMBER_RE.pattern
    + ")"
)

# Phrases that show a response checking its own work or changing course (the "patience" behaviours).
VERIFY_MARKERS = {
    "let me check": r"\blet(?:'s| me| us) (?:check|verify|double[- ]check|confirm)\b",
    "double-check": r"\bdouble[- ]check",
    "verify": r"\bverif(?:y|ies|ied|ication)\b",
    "check": r"\b(?:re-?)?check(?:ing)?\s*[:,]",
    "confirm": r"\bconfirm(?:s|ed|ing)?\b",
}
BACKTRACK_MARKERS = {
    "wait": r"\bwait\b",
    "hmm": r"\bhmm+\b",
    "actually": r"\bactually\b",
    "on second thought": r"\bon second thought",
    "mistake": r"\b(?:mistake|miscalculat\w*|i was wrong|that's (?:not right|wrong|incorrect))",
    "let me redo": r"\blet me (?:redo|re-?calculate|reconsider|try again|re-?think)",
}
_MARKER_RES = {name: re.compile(rx, re.IGNORECASE) for name, rx in {**VERIFY_MARKERS, **BACKTRACK_MARKERS}.items()}


# ---------------------------------------------------------------------------------------------------
# Normalisation.


def normalize_answer(text: str | None) -> str | None:
    """A canonical string for an answer: a number in lowest terms (`"1,000.50"` -> `"1000.5"`), else tidy LaTeX.

    Returns None for None or an answer that is empty after cleaning.
    """
    if text is None:
        return None
    value = parse_number(text)
    if value is not None:
        return format_number(value)
    cleaned = normalize_latex(text)
    return cleaned or None


def parse_number(text: str) -> Fraction | None:
    """The exact value of `text` when the whole of it is one number (after stripping `$`, commas, units...):
    a sign (`+20` = 20), decimals, an exponent (`2e1` = 20, `1.5E-3`), a fraction (`3/4`, `\\frac{3}{4}`)."""
    cleaned = _strip_decorations(text).replace("−", "-")
    cleaned = re.sub(r"^([-+])\s+", r"\1", cleaned)  # "- 5", "+ 5"
    if "," in cleaned:
        # Commas only as thousands separators: "1,000" is a number, "1,2" (a list of answers) is not.
        if not re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?" + _EXPONENT, cleaned):
            return None
        cleaned = cleaned.replace(",", "")
    # LaTeX fractions of plain integers: \frac{3}{4}, \dfrac34 is too exotic to bother with.
    frac = re.fullmatch(r"([-+]?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", cleaned)
    if frac:
        cleaned = f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}"
    if not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)" + _EXPONENT + r"(?:/\d+(?:\.\d+)?)?", cleaned):
        return None
    numerator, _, denominator = cleaned.partition("/")
    try:
        value = Fraction(numerator)
        if denominator:
            value /= Fraction(denominator)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def format_number(value: Fraction) -> str:
    """`Fraction(5, 1)` -> "5", `Fraction(1, 2)` -> "0.5", `Fraction(1, 3)` -> "1/3" (exact, no rounding)."""
    if value.denominator == 1:
        return str(value.numerator)
    # A terminating decimal (denominator of the form 2^a 5^b) prints as a decimal; otherwise as a fraction.
    d = value.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d == 1:
        with localcontext() as ctx:
            ctx.prec = 100  # exact: a terminating decimal of any realistic answer fits
            return format((Decimal(value.numerator) / Decimal(value.denominator)).normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def _strip_decorations(text: str) -> str:
    """Remove what surrounds an answer but is not part of it: `$`, `\\$`, `\\text{units}`, `%`, trailing dots."""
    text = text.strip()
    text = re.sub(r"\\text\{\s*[a-zA-Z ]*\}", "", text)  # \text{ dollars}, \text{cm}
    text = re.sub(r"\\(?:mbox|mathrm)\{\s*[a-zA-Z ]*\}", "", text)
    text = text.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    text = text.replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    text = re.sub(r"\^\s*\{?\\circ\}?", "", text)  # degrees
    text = text.strip().rstrip(".").strip()
    text = re.sub(r"^[a-zA-Z]\s*=\s*", "", text)  # "x = 5" -> "5"
    # A lone leading/trailing word ("5 apples", "USD 12") is a unit, not part of a numeric answer.
    match = re.fullmatch(r"(?:[a-zA-Z]+\s+)?([-−+]?[\d.,/]+(?:[eE][-+]?\d+)?)(?:\s+[a-zA-Z]+\.?)*", text)
    return match.group(1) if match else text


def normalize_latex(text: str) -> str:
    """A light canonical form of a LaTeX answer (as in Hendrycks' `strip_string`), for string equality."""
    text = _strip_decorations(text)
    text = re.sub(r"\\(?:left|right)(?=[()\[\]|.{}\\])", "", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    text = re.sub(r"\\text\{(.*?)\}", r"\1", text)
    text = text.replace(" ", "").replace("\\ ", "")
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)  # \frac12 -> \frac{1}{2}
    return text.rstrip(".")


# ---------------------------------------------------------------------------------------------------
# Extraction.


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces matched, so `\\boxed{\\frac{1}{2}}` works), else None."""
    last = None
    for match in _BOXED_RE.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                last = (match.start(), text[start:i])
                break
    return last[1].strip() if last else None


def _last_boxed_span(text: str) -> tuple[int, str] | None:
    content = extract_boxed(text)
    if content is None:
        return None
    return max(m.start() for m in _BOXED_RE.finditer(text)), content


def extract_strict(text: str, numeric: bool = True) -> str | None:
    """The answer after the last explicit marker (`####`, `answer is`, `\\boxed{}`), normalised; else None.

    With `numeric`, the marker must be followed by a number ("#### Step 2" is a heading, not an answer).
    """
    candidates: list[tuple[int, str]] = []  # (position of the marker, the raw answer after it)
    for pattern in (_HASH_RE, _ANSWER_IS_RE):
        for match in pattern.finditer(text):
            candidates.append((match.start(), match.group(1)))
    boxed = _last_boxed_span(text)
    if boxed:
        candidates.append(boxed)
    for _, raw in sorted(candidates, key=lambda c: c[0], reverse=True):  # the last marker wins
        answer = _answer_after_marker(raw, numeric)
        if answer is not None:
            return answer
    return None


def _answer_after_marker(raw: str, numeric: bool) -> str | None:
    raw = raw.strip().strip("*").strip()  # markdown bold: "**Answer:** 18", "The answer is **18**."
    inner = extract_boxed(raw)  # "The answer is \boxed{5}."
    if inner is not None:
        raw = inner
    elif raw.startswith("$") and raw.count("$") >= 2:  # "The answer is $\frac{1}{2}$."
        raw = raw[1 : raw.index("$", 1)]
    if numeric:
        if parse_number(raw) is not None:  # the whole of it is a number: "\frac{1}{2}", "x = 5", "$1,000"
            return normalize_answer(raw)
        # The number right after the marker, allowing a `$` or a hedge such as "approximately" before it.
        match = _MARKER_NUMBER_RE.match(raw)
        if not match:
            return None
        return normalize_answer(match.group(1))
    # A LaTeX answer runs to the end of the sentence: a full stop followed by a space or the end.
    raw = re.split(r"\.\s|\.$", raw, maxsplit=1)[0]
    return normalize_answer(raw)


def extract_flexible(text: str, numeric: bool = True) -> str | None:
    """The last number in the response (for a LaTeX answer: the strict reading first), normalised; else None."""
    if not numeric:
        strict = extract_strict(text, numeric=False)
        if strict is not None:
            return strict
    numbers = NUMBER_RE.findall(text)
    return normalize_answer(numbers[-1]) if numbers else None


def extract_gold(answer: str) -> str:
    """The gold answer of a record: the part after `####` (GSM8K), the last `\\boxed{}` (MATH solutions), or all."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    boxed = extract_boxed(answer)
    if boxed is not None and len(answer) > len(boxed) + 10:  # a whole solution, not a bare "\boxed{5}"
        return boxed
    return answer.strip()


# ---------------------------------------------------------------------------------------------------
# Scoring.


def answers_equal(predicted: str | None, gold: str | None) -> bool:
    """Equality of two normalised answers: exact values when both are numbers, canonical strings otherwise."""
    if predicted is None or gold is None:
        return False
    a, b = parse_number(predicted), parse_number(gold)
    if a is not None and b is not None:
        return a == b
    return normalize_latex(predicted) == normalize_latex(gold)


_MATH_CHARS = re.compile(r"[\d\\^_{}=+*/()\[\]<>|π√∞-]")
# Letters that are maths or choices, not words: "x", "(C)", "AB", "B, E" (MATH's "enter the letters").
_SYMBOLS = re.compile(r"\(?[A-Za-z]{1,3}\)?(?:\s*,\s*\(?[A-Za-z]{1,3}\)?)*")
_PROSE_WORD = re.compile(r"(?<![\\\w])[A-Za-z]{2,}")


def unreadable_gold(gold: str) -> str | None:
    """Why no reading could score `gold` (a phrase), or None when it is a number or reads as maths.

    A gold answer is a number (GSM8K) or a math expression (MATH: `\\frac{1}{2}`, `(3, 4)`, `\\text{east}`). A
    word such as "blue" is neither, and a whole solution without `####` (more than four words of prose) is not a
    final answer: both would score every response wrong, or switch the headline metric, without a word."""
    if is_numeric(gold):
        return None
    if len(_PROSE_WORD.findall(gold)) > 4:
        return "a whole text, not a final answer (no '####' before it)"
    if not _MATH_CHARS.search(gold) and not _SYMBOLS.fullmatch(gold):
        return "neither a number nor a math expression"
    return None


def is_numeric(gold: str) -> bool:
    """GSM8K-style problems have a number as answer; MATH ones often LaTeX (`\\frac{\\pi}{2}`, intervals...)."""
    return parse_number(gold) is not None


def math_verify_available() -> str | None:
    """None when math-verify can be used; otherwise the sentence to show instead of its column."""
    try:  # here, not at the top: math-verify may be missing (its column then says so), and takes 0.3 s
        import math_verify  # noqa: F401
    except ImportError:
        return "math-verify is not installed (pip install math-verify)"
    return None


def math_verify_equal(response: str, gold: str) -> bool | None:
    """math-verify's equivalence of the response's final answer with the gold; None when it is not installed."""
    try:  # as in math_verify_available
        from math_verify import parse, verify
    except ImportError:
        return None
    try:
        gold_parsed = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$")
        return bool(gold_parsed) and bool(verify(gold_parsed, parse(response)))
    except Exception:  # math-verify can raise on odd LaTeX (or time out); that is a miss, not a crash
        return False


def score_response(response: str, gold: str, *, use_math_verify: bool = True) -> dict:
    """All readings of one response against one (already extracted) gold answer.

    Returns {"strict": answer|None, "flexible": answer|None, "correct": {"strict": bool, "flexible": bool,
    "math_verify": bool|None}}.
    """
    numeric = is_numeric(gold)
    strict = extract_strict(response, numeric=numeric)
    flexible = extract_flexible(response, numeric=numeric)
    verified = math_verify_equal(response, gold) if use_math_verify else None
    return {
        "strict": strict,
        "flexible": flexible,
        "correct": {
            "strict": answers_equal(strict, gold),
            "flexible": answers_equal(flexible, gold),
            "math_verify": verified,
        },
    }


def behaviour_markers(response: str) -> list[str]:
    """Names of the verification / backtracking markers found in a response (see VERIFY_MARKERS)."""
    return [name for name, rx in _MARKER_RES.items() if rx.search(response)]


# ---------------------------------------------------------------------------------------------------
# Majority vote and intervals.


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer; ties go to the answer seen first (lowest sample index).

    Answers must already be normalised (so "1,000" and "1000" vote together). Samples with no answer do not
    vote; when none has one the vote is None (counted wrong). First-seen tie-breaking makes maj@1 equal the
    first sample's answer and the vote deterministic.
    """
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == best)


def powers_of_two_up_to(k: int) -> list[int]:
    """1, 2, 4, ... <= k, plus k itself when it is not a power of two (the curve always ends at all samples)."""
    ks = [2**i for i in range(int(math.log2(k)) + 1)] if k >= 1 else []
    return ks + ([k] if ks and ks[-1] != k else [])


def maj_at_k(
    sample_answers: Sequence[Sequence[str | None]],
    golds: Sequence[str],
    k: int,
    equal: Callable[[str | None, str], bool] | None = None,
) -> float:
    """Share of problems whose majority vote over their first k samples equals the gold answer.

    The first k samples, not an average over subsets: maj@1 is then the first sample's accuracy. `equal`
    compares the voted answer with the gold (default `answers_equal`).
    """
    if not golds:
        return float("nan")
    equal = equal or answers_equal
    hits = [equal(majority_vote(answers[:k]), gold) for answers, gold in zip(sample_answers, golds, strict=True)]
    return sum(hits) / len(hits)


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default); sound near 0 and 1, unlike Wald."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
