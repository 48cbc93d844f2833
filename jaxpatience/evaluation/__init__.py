"""Evaluation: the resumable evaluation loop and `jaxpatience eval` (evaluate.py), its files (records.py:
generations.jsonl and run.json), the summary of its records (summary.py), and every table and plot the commands
write (report.py)."""

from jaxpatience.evaluation.evaluate import evaluate, evaluate_checkpoint
from jaxpatience.evaluation.summary import EvalError, load_summary, summarize
