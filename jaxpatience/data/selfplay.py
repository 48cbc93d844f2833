"""Iterative RPO pairs from the model's own samples (arXiv 2404.19733, section 2).

For each training problem the current model writes N solutions (sampling, via the evaluator so that every
sample is stored and a crash loses nothing); each is labelled by its final answer against the gold. Winners
(correct) are paired with losers (incorrect), up to K distinct pairs per problem. A problem whose samples are
all right or all wrong gives no pair: it is counted and skipped. An empty sample (the model stopped at once) is no
solution to learn from or against, and a pair needs two non-empty responses (data/pairs.py): it is left out of
the pairing and counted.

Every pair's `prompt` is the exact prompt string the model was sampled with (chat template already applied),
so the trainer must read it with `data.chat_template=false`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jaxpatience.durability.store import write_jsonl


@dataclass
class SelfPlayStats:
    problems: int = 0
    with_pairs: int = 0
    all_correct: int = 0
    all_wrong: int = 0
    pairs: int = 0
    sample_accuracy: float = 0.0  # share of correct samples (how well M_t solves the training problems)
    skipped_duplicates: int = field(default=0)
    empty_samples: int = 0  # left out of the pairing

    def summary(self) -> str:
        empty = f"; {self.empty_samples} empty samples left out" if self.empty_samples else ""
        return (
            f"{self.pairs} pairs from {self.with_pairs}/{self.problems} problems; skipped {self.all_correct} "
            f"all-correct and {self.all_wrong} all-wrong{empty}; sample accuracy {self.sample_accuracy:.3f}"
        )


def pair_samples(samples: Sequence[dict], max_pairs: int, rng: random.Random) -> list[tuple[dict, dict]]:
    """(winner, loser) pairs from one problem's samples, each `{"response", "correct", ...}`.

    Identical responses are counted once and empty ones not at all; all winner x loser combinations are shuffled
    and the first `max_pairs` kept, so a problem with few winners still pairs each with several losers.
    """
    unique: dict[str, dict] = {}
    for sample in samples:
        if sample["response"].strip():
            unique.setdefault(sample["response"].strip(), sample)
    winners = [s for s in unique.values() if s["correct"]]
    losers = [s for s in unique.values() if not s["correct"]]
    combos = [(w, lo) for w in winners for lo in losers]
    rng.shuffle(combos)
    return combos[:max_pairs]


def pairs_from_generations(
    records: Sequence[dict], prompts: dict[str, str], *, metric: str, max_pairs: int, iteration: int, seed: int = 0
) -> tuple[list[dict], SelfPlayStats]:
    """Pair records (the evaluator's generations.jsonl lines) by problem; returns (pair records, stats)."""
    by_problem: dict[str, list[dict]] = {}
    for record in records:
        by_problem.setdefault(record["id"], []).append(
            {
                "response": record["response"],
                "correct": bool(record["correct"].get(metric)),
                "answer": record["strict"] if record["strict"] is not None else record["flexible"],
                "gold": record["gold"],
            }
        )
    stats = SelfPlayStats(problems=len(by_problem))
    total = sum(len(s) for s in by_problem.values())
    stats.sample_accuracy = sum(s["correct"] for v in by_problem.values() for s in v) / max(total, 1)
    stats.empty_samples = sum(not s["response"].strip() for v in by_problem.values() for s in v)
    pairs = []
    for problem_id in sorted(by_problem, key=str):
        samples = by_problem[problem_id]
        rng = random.Random(f"{seed}-{iteration}-{problem_id}")  # per problem: independent of the others
        chosen = pair_samples(samples, max_pairs, rng)
        if not chosen:
            answered = [s for s in samples if s["response"].strip()]
            stats.all_correct += bool(answered) and all(s["correct"] for s in answered)
            stats.all_wrong += not any(s["correct"] for s in answered)
            continue
        stats.with_pairs += 1
        for winner, loser in chosen:
            pairs.append(
                {
                    "id": f"{problem_id}-{len(pairs)}",
                    "problem_id": problem_id,
                    "iteration": iteration,
                    "prompt": prompts[problem_id],
                    "chosen": winner["response"],
                    "rejected": loser["response"],
                    "chosen_answer": winner["answer"],
                    "rejected_answer": loser["answer"],
                    "gold": winner["gold"],
                }
            )
    stats.pairs = len(pairs)
    return pairs, stats


def write_pairs(path: str | Path, pairs: Sequence[dict], stats: SelfPlayStats) -> None:
    """Write the stats, then the pairs JSONL atomically: recipes/irpo.py takes an existing pairs file as this stage done
    and reads the stats beside it, so both must be complete once the pairs file appears."""
    path = Path(path)
    Path(str(path) + ".stats.json").write_text(json.dumps(asdict(stats), indent=2))
    write_jsonl(path, pairs)
