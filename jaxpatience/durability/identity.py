"""What a run was made from, as fingerprints a rerun compares before it resumes anything.

A resumed training run, an evaluation rerun into the same folder and an IRPO rerun each add to their own results
only if they depend on the same inputs as the run that wrote them: the model's files (`model_fingerprint`:
sizes + sampled digests, well under a second for a 7B checkpoint), an adapter's files, and the
data's content (a digest of the records, not of where they were read from). Each run stores an `inputs` dict
{name: fingerprint}; `check_same_inputs` names what differs in one sentence. A name the earlier run did not store
(a run written before fingerprints) is not checked.

Fingerprint. `model_fingerprint` maps each file that defines a model (config, tokenizer, chat template, generation
config, weights) to a digest. Weight files of 8 MiB or more are digested cheaply: their size, their header and
SAMPLES evenly spaced blocks of BLOCK bytes (16 MiB read per file, so a 15 GB checkpoint costs a fraction of a
second per file); every other file is hashed in full. A sampled digest catches a replaced or retrained model
(nearly every block differs) but not a single edited byte between samples; that is the price of not reading 15 GB.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from jaxpatience.config import ConfigError

MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit on a header

SAMPLES, BLOCK = 256, 1 << 16  # blocks sampled from a large weight file, and their size (16 MiB in all)
FULL_HASH_BELOW = 8 << 20  # files smaller than this are hashed in full
GGUF_PREFIX = 32 << 20  # a GGUF file's metadata (tokenizer, hyperparameters) sits in its first MiBs
MODEL_FILE_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".msgpack", ".index.json")


def file_digest(path: Path) -> str:
    """A digest string of one file: a full sha256 below FULL_HASH_BELOW bytes (or for a non-weight file), else
    the size plus a sha256 of the header and SAMPLES blocks at evenly spaced offsets (the first and last included)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size < FULL_HASH_BELOW or not path.name.endswith(WEIGHT_SUFFIXES):
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            return f"sha256:{digest.hexdigest()}"
        if path.suffix == ".safetensors":
            header_size = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_size, size - 8, MAX_SAFETENSORS_HEADER)))  # names, dtypes, shapes, offsets
        elif path.suffix == ".gguf":
            digest.update(f.read(GGUF_PREFIX))
        for i in range(SAMPLES):
            f.seek((size - BLOCK) * i // (SAMPLES - 1))
            digest.update(f.read(BLOCK))
    return f"size:{size};sampled-sha256:{digest.hexdigest()}"


def model_fingerprint(path: str | Path) -> dict[str, str]:
    """file name -> file_digest for every file that defines the model at `path`: config, generation config,
    tokenizer files, chat template and weight files of a checkpoint directory (top level), or the one .gguf file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist.")
    if path.is_file():
        return {path.name: file_digest(path)}
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and (p.name in MODEL_FILE_NAMES or p.name.endswith(WEIGHT_SUFFIXES))
    )
    if not files:
        raise ConfigError(f"{path} holds no model files (config.json, tokenizer, weights).")
    return {p.name: file_digest(p) for p in files}


def describe_fingerprint_change(saved: dict[str, str], current: dict[str, str]) -> str | None:
    """A short phrase naming what differs ("model.safetensors changed, chat_template.jinja appeared"); None if
    nothing does. At most three files are named, then a count of the others."""
    phrases = [f"{name} changed" for name in sorted(saved.keys() & current.keys()) if saved[name] != current[name]]
    phrases += [f"{name} appeared" for name in sorted(current.keys() - saved.keys())]
    phrases += [f"{name} disappeared" for name in sorted(saved.keys() - current.keys())]
    if len(phrases) > 3:
        phrases = [*phrases[:3], f"{len(phrases) - 3} more files differ"]
    return ", ".join(phrases) or None


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
