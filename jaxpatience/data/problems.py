"""Math word problems as one uniform record, from the hub, a local file or a seeded generator.

Every source becomes a list of `Problem(id, question, answer)` where `answer` is the bare gold answer ("18",
"\\frac{1}{2}"): the text after `####` for GSM8K, the `answer` field of MATH-500, the last `\\boxed{}` of a
Hendrycks MATH solution. Ids are stable across runs (the evaluator resumes by id).

Sources (`load_problems(name)`):
  gsm8k         `openai/gsm8k` (config "main") through `datasets`
  math          `HuggingFaceH4/MATH-500` through `datasets`
  gsm_symbolic  reasoning-gym's GSM-Symbolic templates, seeded (offline; `pip install reasoning-gym`)
  a file        .jsonl / .json / .parquet with `question` or `problem`, and `answer` or `solution`
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from jaxpatience.data.answers import extract_gold, is_numeric, unreadable_gold
from jaxpatience.durability.store import StoreError, iter_jsonl

HUB_DATASETS = {
    # name -> (hub id, config, question field, answer field)
    "gsm8k": ("openai/gsm8k", "main", "question", "answer"),
    "math": ("HuggingFaceH4/MATH-500", None, "problem", "answer"),
}
GENERATED = ("gsm_symbolic",)
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class ProblemsError(ValueError):
    """Bad or unavailable problem data; the message is one sentence naming the file, line or dataset."""


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str  # the bare gold answer, not a whole solution


def as_problem(item: Problem | dict | object) -> Problem:
    """A Problem from a Problem, a {id, question, answer} dict, or any object with those attributes (the toy
    world's ToyProblem, whose answer is an int)."""
    if isinstance(item, Problem):
        return item
    get = item.get if isinstance(item, dict) else lambda key: getattr(item, key, None)
    fields = {key: get(key) for key in ("id", "question", "answer")}
    missing = [key for key, value in fields.items() if value is None]
    if missing:
        raise ProblemsError(f"a problem lacks {', '.join(missing)}: {str(item)[:80]}.")
    return Problem(id=str(fields["id"]), question=str(fields["question"]), answer=str(fields["answer"]).strip())


def load_problems(
    dataset: str, *, split: str = "test", limit: int | None = None, seed: int = 0, default_split: str = "test"
) -> list[Problem]:
    """Problems from a known dataset name (gsm8k, math, gsm_symbolic) or a local file, the first `limit` of them.

    `split` names a hub dataset's split. A local file or a generated set has no splits: a `split` other than the
    command's `default_split` (eval's `test`, irpo's `train` for its training problems) is refused rather than
    ignored, since the user asked for something this source cannot give."""
    if limit is not None and limit <= 0:
        raise ProblemsError(f"limit must be positive, got {limit}.")
    if dataset in HUB_DATASETS:
        problems = load_hub(dataset, split=split, limit=limit)
    elif dataset in GENERATED:
        _no_split(dataset, split, default_split)
        problems = load_gsm_symbolic(limit or 500, seed=seed)
    elif Path(dataset).exists():
        _no_split(dataset, split, default_split)
        problems = load_file(dataset)
    elif Path(dataset).suffix in FILE_SUFFIXES or "/" in dataset:
        raise ProblemsError(f"problem file {dataset} does not exist.")
    else:
        known = ", ".join([*HUB_DATASETS, *GENERATED])
        raise ProblemsError(
            f"unknown dataset {dataset!r}: use one of {known} or a path to a .jsonl/.json/.parquet file."
        )
    if not problems:
        raise ProblemsError(f"dataset {dataset!r} has no problems.")
    return problems[:limit] if limit else problems


def _no_split(dataset: str, split: str, default_split: str) -> None:
    if split != default_split:
        raise ProblemsError(
            f"split {split!r} names a part of a hub dataset ({', '.join(HUB_DATASETS)}), but {dataset!r} has no "
            "splits; leave the split out, or give the file that holds that split."
        )


def load_hub(name: str, *, split: str = "test", limit: int | None = None) -> list[Problem]:
    """A hub dataset through `datasets`; without network, one sentence saying how to use a local file instead.

    Offline is found out at once, not after `datasets`' retries (about 26 s): HF_HUB_OFFLINE / HF_DATASETS_OFFLINE
    set (then `datasets` reads its cache alone), or the hub's host not answering a 3-second connection."""
    hub_id, config, question_field, answer_field = HUB_DATASETS[name]
    local = (
        f"download it where there is network and pass --dataset path/to/{name}_{split}.jsonl (or .parquet) with "
        f"fields {question_field!r} and {answer_field!r}"
    )
    unreachable = None if _offline_variable() else _hub_unreachable()
    if unreachable:
        raise ProblemsError(
            f"could not load {hub_id!r}: the Hugging Face hub is out of reach ({unreachable}); set HF_HUB_OFFLINE=1 "
            f"to use a copy in the Hugging Face cache, or {local}."
        )
    import datasets  # here, not at the top: 2 s to import, for the hub path only

    try:
        rows = datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # offline, unknown split, hub errors: all end the same way for the user
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        offline = _offline_variable()
        where = f"with {offline} set and no copy in the Hugging Face cache" if offline else "from the hub"
        raise ProblemsError(
            f"could not load {hub_id!r} (split {split!r}) {where} ({reason}); with no network, {local}."
        ) from None
    if limit:
        rows = rows.select(range(min(limit, len(rows))))
    return [
        Problem(id=f"{name}-{split}-{index}", question=row[question_field], answer=extract_gold(row[answer_field]))
        for index, row in enumerate(rows)
    ]


def _offline_variable() -> str | None:
    """The variable that puts the Hugging Face libraries offline (`NAME=value`), if one is set true."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={os.environ[name]}"
    return None


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub's host (HF_ENDPOINT, default huggingface.co) cannot be reached, or None: a name that does not
    resolve or a connection refused is known in milliseconds. Behind a proxy nothing is tried (`datasets` knows)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host}:{port}: {err.strerror or type(err).__name__}"
    return None


def load_gsm_symbolic(count: int, *, seed: int = 0) -> list[Problem]:
    """`count` GSM-Symbolic problems from reasoning-gym's templates, the same ones for the same seed."""
    try:
        import reasoning_gym  # optional (the `eval` extra)
    except ImportError:
        raise ProblemsError("dataset 'gsm_symbolic' needs reasoning-gym: pip install reasoning-gym.") from None
    generated = reasoning_gym.create_dataset("gsm_symbolic", seed=seed, size=count)
    return [
        Problem(id=f"gsm_symbolic-s{seed}-{index}", question=entry["question"], answer=str(entry["answer"]))
        for index, entry in enumerate(generated)
    ]


def load_file(path: str | Path) -> list[Problem]:
    """Problems from a local .jsonl, .json (a list of records) or .parquet file in GSM8K or MATH layout."""
    path = Path(path)
    if path.is_dir():
        raise ProblemsError(f"problem file {path} is a folder; give a .jsonl, .json or .parquet file.")
    if not path.is_file():
        raise ProblemsError(f"problem file {path} does not exist.")
    records = read_file_records(path)
    problems = [_problem_from_record(record, path, where, index) for index, (where, record) in enumerate(records)]
    seen: set[str] = set()
    for problem in problems:
        if problem.id in seen:
            raise ProblemsError(f"{path}: id {problem.id!r} occurs twice; ids must be unique.")
        seen.add(problem.id)
    return problems


def read_file_records(path: str | Path) -> list[tuple[str, object]]:
    """(where, record) pairs of a .jsonl (one object a line), .json (a list) or .parquet file; `where` names the
    line, record or row for error messages. Shared with data/pairs.py."""
    path = Path(path)
    if not path.is_file():
        raise ProblemsError(f"{path} does not exist.")
    if path.suffix == ".parquet":
        return list(_parquet_records(path))
    if path.suffix == ".json":
        return list(_json_records(path))
    return list(_jsonl_records(path))  # .jsonl and anything else: one JSON object per line


def _jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    """A user's file is read strictly (durability/store.py's iter_jsonl): a broken line is an error naming it,
    never repaired."""
    try:
        for number, record in iter_jsonl(path):
            yield f"line {number}", record
    except StoreError as err:
        raise ProblemsError(str(err)) from None


def _json_records(path: Path) -> Iterable[tuple[str, dict]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ProblemsError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}).") from None
    except UnicodeDecodeError:
        raise ProblemsError(f"{path}: not UTF-8 text.") from None
    if not isinstance(records, list):
        raise ProblemsError(f"{path}: expected a JSON list of records.")
    return [(f"record {i + 1}", record) for i, record in enumerate(records)]


def _parquet_records(path: Path) -> Iterable[tuple[str, dict]]:
    import pyarrow.parquet as pq  # for .parquet files only (0.25 s); pyarrow comes with `datasets`

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises assorted errors on a bad file
        raise ProblemsError(f"{path}: not a readable parquet file ({err}).") from None
    return [(f"row {i + 1}", row) for i, row in enumerate(rows)]


def _problem_from_record(record: object, path: Path, where: str, index: int) -> Problem:
    """GSM8K layout (question, answer with '#### N'), MATH-500 (problem, answer) or Hendrycks (problem, solution)."""
    if not isinstance(record, dict):
        raise ProblemsError(f"{path}, {where}: expected a JSON object, got {type(record).__name__}.")
    question = record.get("question", record.get("problem"))
    answer = record.get("answer", record.get("solution"))
    for field_name, value in (("question (or problem)", question), ("answer (or solution)", answer)):
        if not isinstance(value, str | int | float) or isinstance(value, bool) or str(value).strip() == "":
            raise ProblemsError(f"{path}, {where}: missing or empty field {field_name}.")
    gold = extract_gold(str(answer))
    if not gold:
        raise ProblemsError(f"{path}, {where}: the answer has nothing after '####'.")
    unreadable = unreadable_gold(gold)
    if unreadable:
        raise ProblemsError(
            f"{path}, {where}: the gold answer {_short(gold)} is {unreadable}, so no answer reading "
            "could score it; give the final answer after '####' (a number) or as LaTeX."
        )
    problem_id = record.get("id", record.get("unique_id", f"{path.stem}-{index}"))
    return Problem(id=str(problem_id), question=str(question), answer=gold)


def _short(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


# ---------------------------------------------------------------------------------------------------
# Prompts: how a problem is posed to the model (the evaluator and self-sampling use the same ones).

PROMPT_STYLES = ("zero_shot", "few_shot", "few_shot_plain", "question")

ZERO_SHOT_NUMBER = (
    "{question}\nPlease think step by step, and end your response with 'The answer is N.' where N is the final number."
)
ZERO_SHOT_LATEX = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."

# The eight chain-of-thought exemplars of Wei et al. (2022), "Chain-of-Thought Prompting Elicits Reasoning in
# Large Language Models", table 20 (the prompt lm-evaluation-harness calls gsm8k_cot).
GSM8K_COT_EXEMPLARS = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
        "there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
        "been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
        "they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
        "Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
        "The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
        "now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
        "5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to "
        "thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
        "computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
        "balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
        "he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
        "left. 23 - 15 is 8. The answer is 8.",
    ),
)
# A plain-text few-shot prompt has no end-of-turn token: the model goes on to invent the next "Q:". Cut there.
PLAIN_STOP_STRINGS = ("\n\nQ:", "\nQ:", "\n\n\n")


def build_prompt(
    problem: Problem, tokenizer, style: str | Callable[[Problem], str] = "zero_shot", latex: bool | None = None
) -> str:
    """The prompt string for one problem (chat-formatted unless the style is `few_shot_plain`).

    zero_shot: one user turn asking for step-by-step reasoning ending in "The answer is N", or, for a LaTeX
        dataset (MATH), for the final answer in `\\boxed{}` as Qwen's MATH prompt does. `latex` says which;
        None decides from this problem's gold answer (the evaluator decides once for the whole dataset).
    few_shot: the 8 GSM8K chain-of-thought exemplars as alternating user/assistant turns, then the question.
    few_shot_plain: the same exemplars as "Q: ...\\nA: ..." text with no chat template (for base models).
    question: the bare question as the one user turn (for a model trained on such prompts, e.g. the toy demo's).
    A callable style is given the Problem and returns the finished prompt (the toy demo formats its own).
    """
    if callable(style):
        return style(problem)
    if style == "zero_shot":
        latex = not is_numeric(problem.answer) if latex is None else latex
        template = ZERO_SHOT_LATEX if latex else ZERO_SHOT_NUMBER
        messages = [{"role": "user", "content": template.format(question=problem.question)}]
    elif style == "few_shot":
        messages = []
        for question, answer in GSM8K_COT_EXEMPLARS:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": problem.question})
    elif style == "question":
        messages = [{"role": "user", "content": problem.question}]
    elif style == "few_shot_plain":
        shots = "".join(f"Q: {question}\nA: {answer}\n\n" for question, answer in GSM8K_COT_EXEMPLARS)
        return f"{shots}Q: {problem.question}\nA:"
    else:
        raise ProblemsError(f"unknown prompt style {style!r}: use one of {', '.join(PROMPT_STYLES)}.")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def cut_at_stop_strings(text: str, stops: Sequence[str] = PLAIN_STOP_STRINGS) -> str:
    """`text` up to the first of `stops` (the model's invented next question is not part of its answer)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]
