"""Data, never JAX: problems and prompts (problems.py), reading answers (answers.py), preference pairs into
fixed-shape numpy batches (pairs.py, packing.py), IRPO's pairs from generations (selfplay.py), the toy world (toy.py).
"""

from jaxpatience.data.answers import extract_flexible, extract_gold, extract_strict, score_response
from jaxpatience.data.pairs import DataError, PairLoader, read_records
from jaxpatience.data.problems import Problem, ProblemsError, build_prompt, load_problems
from jaxpatience.data.selfplay import pairs_from_generations
