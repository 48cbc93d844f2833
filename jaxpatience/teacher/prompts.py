"""What `jaxpatience pairs` asks the teacher, and how its answers are checked against the gold.

The templates live in a YAML file (configs/teacher_prompts.yaml): `concise` (placeholder {question}) asks for
the pair's `rejected` side, `patient` ({question}, {concise}) for the patient rewrite, the `chosen` side;
`system` is optional. A template's placeholders are checked when the file is loaded, so a typo fails before
any request is sent rather than as a KeyError in the middle of a run.

A reply is judged strictly (the pair gate of run.py uses these): its final answer is the number after its last
final-answer marker (`final_answer`: no marker with a number, no answer; never the last number elsewhere), a reply
that copies an answer line the templates show with a placeholder ("The answer is N.") is caught by the patterns
`load_prompts` derives from the templates (`copied_placeholder`), and `detail` measures how detailed a solution
is (characters, steps) so that a "patient" rewrite that is not more detailed than the concise one is caught.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from pathlib import Path

import yaml

from jaxpatience.data.answers import answers_equal, extract_strict, is_numeric, parse_number
from jaxpatience.teacher.config import TeacherError

DEFAULT_PROMPTS = "configs/teacher_prompts.yaml"
PROMPT_FIELDS = {"concise": ("question",), "patient": ("question", "concise")}  # allowed placeholders
REQUIRED_FIELDS = {"concise": "question", "patient": "concise"}
# A final-answer marker of a template and the word after it: "The answer is N." -> ("answer is", "N").
_ANSWER_LINE_RE = re.compile(r"(####|(?:final\s+)?answer\s*(?:is|:))\s*([^\s\"'.,;:]+)", re.IGNORECASE)


def load_prompts(path: str | Path | None = None) -> dict:
    """The prompt templates from a YAML file, with their placeholders checked; default configs/teacher_prompts.yaml."""
    if not path:
        # The repository's copy: next to the working directory, or next to this package (editable installs).
        candidates = [Path(DEFAULT_PROMPTS), Path(__file__).resolve().parents[2] / DEFAULT_PROMPTS]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise TeacherError(f"no prompts file found at {DEFAULT_PROMPTS}: pass --prompts FILE.")
    path = Path(path)
    try:
        prompts = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TeacherError(f"prompts file {path} does not exist.") from None
    except IsADirectoryError:
        raise TeacherError(f"prompts file {path} is a directory, not a YAML file.") from None
    except OSError as err:  # permissions, a broken link ...
        raise TeacherError(f"prompts file {path} cannot be read ({err.strerror or err}).") from None
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        byte = err.object[err.start]
        raise TeacherError(f"prompts file {path}, line {line}, is not UTF-8 text (byte {byte:#x}).") from None
    except yaml.YAMLError as err:
        raise TeacherError(f"prompts file {path} is not valid YAML ({str(err).splitlines()[0]}).") from None
    if not isinstance(prompts, dict):
        raise TeacherError(f"prompts file {path} must be a mapping with keys 'concise' and 'patient'.")
    unknown = set(prompts) - {"system", *PROMPT_FIELDS}
    if unknown:
        raise TeacherError(f"prompts file {path} has unknown key(s) {sorted(unknown)}: use system, concise, patient.")
    for name, allowed in PROMPT_FIELDS.items():
        template = prompts.get(name)
        if not isinstance(template, str) or not template.strip():
            raise TeacherError(f"prompts file {path} needs a non-empty text under {name!r}.")
        _check_placeholders(template, name, allowed, REQUIRED_FIELDS[name], path)
    system = prompts.get("system") or ""
    if not isinstance(system, str):
        raise TeacherError(f"prompts file {path}: 'system' must be text.")
    templates = {"system": system.strip(), "concise": prompts["concise"], "patient": prompts["patient"]}
    return {**templates, "placeholders": answer_placeholders(templates)}


def answer_placeholders(templates: dict) -> tuple[str, ...]:
    """Patterns of the answer lines the templates show with a placeholder instead of a number ("The answer is N.",
    "#### <number>"): a reply that holds one copied the template rather than answering."""
    found = []
    for name in ("concise", "patient"):
        for marker, token in _ANSWER_LINE_RE.findall(templates[name]):
            if parse_number(token) is not None or token.startswith("{"):
                continue
            words = r"\s+".join(f"(?i:{re.escape(word)})" for word in marker.split())
            found.append(rf"(?<!\w){words}\s*{re.escape(token)}(?!\w)")
    return tuple(dict.fromkeys(found))


def copied_placeholder(text: str, prompts: dict) -> str | None:
    """The template's placeholder answer line a reply holds (as the reply wrote it), else None."""
    for pattern in prompts.get("placeholders", ()):
        match = re.search(pattern, text)
        if match:
            return match.group(0)
    return None


def detail(text: str) -> tuple[int, int]:
    """How detailed a solution is: (characters, with each run of whitespace as one space; steps: its lines and
    sentences that hold a letter or a digit)."""
    pieces = re.split(r"\n|(?<=[.!?])\s+", text)
    return len(" ".join(text.split())), sum(bool(re.search(r"[^\W_]", piece)) for piece in pieces)


def _check_placeholders(template: str, name: str, allowed: Sequence[str], required: str, path: Path) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:  # a lone "{" or "}"
        raise TeacherError(f"prompts file {path}, {name!r}: {err} (write literal braces as {{{{ and }}}}).") from None
    for placeholder in fields:
        if placeholder not in allowed:
            shown = ", ".join("{" + a + "}" for a in allowed)
            raise TeacherError(
                f"prompts file {path}, {name!r}: unknown placeholder {{{placeholder}}}; allowed: {shown} "
                f"(write literal braces as {{{{ and }}}})."
            )
    if required not in fields:
        raise TeacherError(f"prompts file {path}, {name!r} must contain the placeholder {{{required}}}.")


def build_messages(prompts: dict, question: str, concise: str | None = None) -> list[dict]:
    """The chat messages of the concise request (`concise` None) or of the patient rewrite of `concise`."""
    if concise is None:
        content = prompts["concise"].format(question=question)
    else:
        content = prompts["patient"].format(question=question, concise=concise)
    system = [{"role": "system", "content": prompts["system"]}] if prompts["system"] else []
    return [*system, {"role": "user", "content": content}]


def final_answer(text: str, gold: str) -> str | None:
    """The final answer of a solution, read strictly: after its last "The answer is" / "####" / `\\boxed{}` that
    holds one; None without such a marker (the last number elsewhere in the text is no final answer).

    Commas, `$` and a trailing dot are normalised away (data/answers.py), so "The answer is $1,234." reads 1234.
    """
    return extract_strict(text, numeric=is_numeric(gold))


def reaches_gold(text: str, gold: str) -> bool:
    """Whether the solution's final answer equals the gold one (numerically when both are numbers)."""
    return answers_equal(final_answer(text, gold), gold)
