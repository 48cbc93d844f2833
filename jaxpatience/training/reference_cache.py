"""Reference log-probs computed once and reused: a content-addressed cache of [N, 2] tables.

A table holds, for every pair of a data set (in the loader's order), the summed log-probs of its chosen and
rejected responses under the reference model (the base weights, adapters off). Its key hashes everything the
values depend on:

* the tokenised pairs themselves (prompt, chosen and rejected ids after the chat template and truncation), which
  covers the data file, the tokenizer, the template and the length limits at once;
* the reference weights: every weight file of the checkpoint (safetensors, GGUF, ...) and config.json, by size
  and a digest of evenly spaced samples (identity.file_digest: a 7B checkpoint costs well under a second
  to hash, not the minutes of reading 15 GB), wherever the folder lies;
* the settings that change the numbers: storage and compute dtypes.

A later run, epoch or IRPO iteration with the same key reads the table instead of a forward pass over the whole
data; any difference gives another key, so a stale table is never read (it is recomputed, and kept beside the
old one). Files are `KEY.npy` and `KEY.json` (what went into the key), written atomically by process 0.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxpatience.durability.identity import file_digest

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".msgpack", ".json")


def model_digest(model: str | Path) -> str:
    """A digest of a checkpoint directory's weight and config files (or of one weights file), each by
    identity.file_digest (the digest run identity uses too)."""
    path = Path(model)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    files = [p for p in files if p.name not in ("tokenizer.json", "tokenizer_config.json")]  # pairs cover these
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}:{file_digest(p)};".encode())
    return digest.hexdigest()


def pairs_digest(pairs: Sequence) -> str:
    """sha256 of every pair's token ids, in order (EncodedPair: prompt, chosen, rejected)."""
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt, pair.chosen, pair.rejected):
            digest.update(np.asarray(ids, np.int64).tobytes())
            digest.update(b"|")
        digest.update(b"#")
    return digest.hexdigest()


def cache_key(model: str | Path, pairs: Sequence, settings: dict) -> tuple[str, dict]:
    """(key, what went into it) for a reference table. The model's path is recorded, not hashed: the same
    weights in another folder find the table."""
    parts = {
        "model_digest": model_digest(model),
        "pairs": len(pairs),
        "pairs_digest": pairs_digest(pairs),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32], {"model": str(model), **parts}


def default_directory(data_path: str) -> Path:
    """Beside a local data file (`DIR/.reference_cache`); else ~/.cache/jaxpatience/reference (hub datasets)."""
    path = Path(data_path)
    if path.is_file():
        return path.parent / ".reference_cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxpatience" / "reference"


def load(directory: Path, key: str, num_pairs: int) -> np.ndarray | None:
    """The table stored under `key`, or None (absent, or not a [num_pairs, 2] float32 table)."""
    try:
        table = np.load(directory / f"{key}.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return table if table.shape == (num_pairs, 2) and table.dtype == np.float32 else None


def save(directory: Path, key: str, table: np.ndarray, parts: dict) -> Path:
    """Write `KEY.npy` and `KEY.json` atomically (a temporary file, then a rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{key}.npy"
    for path, write in (
        (directory / f"{key}.json", lambda f: f.write(json.dumps(parts, indent=2).encode())),
        (target, lambda f: np.save(f, table.astype(np.float32), allow_pickle=False)),
    ):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return target
