"""What a run was made from, as fingerprints a rerun compares before it resumes anything.

A resumed training run, an evaluation rerun into the same folder and an IRPO rerun each add to their own results
only if they depend on the same inputs as the run that wrote them: the model's files (checkpoint_files.
model_fingerprint: sizes + sampled digests, well under a second for a 7B checkpoint), an adapter's files, and the
data's content (a digest of the records, not of where they were read from). Each run stores an `inputs` dict
{name: fingerprint}; `check_same_inputs` names what differs in one sentence. A name the earlier run did not store
(a run written before fingerprints) is not checked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from jaxpatience.checkpoint_files import describe_fingerprint_change, file_digest, model_fingerprint
from jaxpatience.config import ConfigError


def model_inputs(model: str | Path, adapter: str | Path | None = None) -> dict:
    """The fingerprints of a model (and adapter) as `inputs` entries."""
    inputs = {"model": model_fingerprint(model)}
    if adapter:
        folder = Path(adapter)
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        inputs["adapter"] = {p.name: file_digest(p) for p in files}
    return inputs


def problems_fingerprint(problems: Iterable) -> str:
    """A digest of problems' ids, questions and gold answers (the same set in the same order, wherever it came
    from: a file, the hub, a generator)."""
    digest = hashlib.sha256()
    for problem in problems:
        record = [str(problem.id), str(problem.question), str(problem.answer)]
        digest.update(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


def differences(saved: dict, current: dict) -> list[str]:
    """Phrases naming the inputs that differ between two `inputs` dicts (names only one of them has are skipped)."""
    phrases = []
    for name in sorted(saved.keys() & current.keys()):
        before, now = saved[name], current[name]
        if isinstance(before, dict) and isinstance(now, dict):
            change = describe_fingerprint_change(before, now)
            if change:
                phrases.append(f"the {name}'s files ({change})")
        elif before != now:
            phrases.append(f"the {name}")
    return phrases


def check_same_inputs(saved: dict | None, current: dict, out: str | Path, how: str) -> None:
    """One sentence (ConfigError) if `current` inputs differ from those `out` was made from; `how`: the way out
    ("start a new out_dir", ...)."""
    changed = differences(saved or {}, current)
    if changed:
        raise ConfigError(f"{out} was made from other inputs: {'; '.join(changed)} differ; {how}.")
