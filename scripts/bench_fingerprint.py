"""What run identity costs: identity.file_digest (sampled) against a full sha256 of a weight file.

    python scripts/bench_fingerprint.py PATH/model.safetensors      # a real checkpoint's weight file
    python scripts/bench_fingerprint.py --make 2 /tmp/fp/model.safetensors   # first write a 2 GiB random one

"cold" drops the file's pages from the page cache first (posix_fadvise), as for a checkpoint not read lately.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import time
from pathlib import Path

from jaxpatience.durability.identity import file_digest


def make(path: Path, gib: float) -> None:
    """A safetensors file of one float32 tensor of `gib` GiB of random bytes."""
    n = int(gib * (1 << 30)) // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    chunk = os.urandom(1 << 24)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for i in range(4 * n // len(chunk)):
            f.write(chunk[i % 7 :] + chunk[: i % 7])  # not one repeated block
        f.write(chunk[: 4 * n % len(chunk)])


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--make", type=float, metavar="GIB", help="write a random safetensors file of this size first")
    args = parser.parse_args()
    if args.make:
        args.path.parent.mkdir(parents=True, exist_ok=True)
        make(args.path, args.make)
    size = args.path.stat().st_size / (1 << 30)
    for label in ("cold", "warm"):
        if label == "cold":
            drop_cache(args.path)
        start = time.perf_counter()
        file_digest(args.path)
        print(f"{args.path.name} ({size:.2f} GiB): file_digest {label} {1000 * (time.perf_counter() - start):.0f} ms")
    drop_cache(args.path)
    start, digest = time.perf_counter(), hashlib.sha256()
    with args.path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    print(f"{args.path.name} ({size:.2f} GiB): full sha256 cold {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
