"""A checkpoint's files as bytes, checked before any weight is read (durability/identity.py fingerprints them).

No JAX and no model here, only the files, so `jaxpatience info`, the loaders and a resume check share one reading.

Integrity. A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (tensor name -> dtype,
shape, data_offsets [begin, end) relative to the data section), then the data. A file is accepted only when the
header parses, every tensor's byte span equals dtype size x shape, the spans tile the data section without gap or
overlap (as the `safetensors` library itself demands), and the file ends exactly where the last tensor does: a
truncated download or a padded copy is refused here, in one sentence naming the file and tensor, instead of as
numpy's "mmap length is greater than file size" halfway through a load. A sharded checkpoint's index must name
files that exist and map each tensor to a file that holds it. A GGUF file's tensors must lie inside the file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import gguf


class CheckpointError(ValueError):
    """A user-facing problem with a checkpoint; the message is one sentence naming the file and key."""


# ---------------------------------------------------------------------------------------------------
# safetensors integrity

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# Bits per element of every dtype the safetensors format defines (sub-byte floats are packed).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6,
}  # fmt: skip


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, data start) of one safetensors file, after checking that the header and the file size agree."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: it is only {size} bytes long.")
        (header_size,) = struct.unpack("<Q", raw)
        if header_size > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path} is not a safetensors file (implausible header size {header_size}).")
        if 8 + header_size > size:
            raise CheckpointError(f"{path} is truncated: it ends inside its {header_size}-byte header.")
        try:
            header = json.loads(f.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object).")
    data_size = size - 8 - header_size
    data_end = _check_tensor_spans(path, header, data_size)
    if data_end != data_size:  # the spans are inside the file, so the file is longer than its tensors
        raise CheckpointError(
            f"{path} has {data_size - data_end} bytes after its last tensor (a damaged or padded copy?)."
        )
    return header, 8 + header_size


def _check_tensor_spans(path: Path, header: dict, data_size: int) -> int:
    """The end of the data the header describes, after checking every entry; spans must tile [0, end)."""
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry.") from None
        if not all(type(n) is int and n >= 0 for n in (*shape, begin, end)) or begin > end:
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape or data_offsets.")
        bits = SAFETENSORS_DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
        if bits is None:
            raise CheckpointError(f"{path}: tensor {name!r} has the unknown dtype {dtype!r}.")
        needed = math.prod(shape) * bits / 8
        if end - begin != needed:
            raise CheckpointError(
                f"{path}: tensor {name!r} spans {end - begin} bytes, but {dtype} {shape} needs {needed:g}."
            )
        if end > data_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at data byte {end}, but the file "
                f"holds only {data_size} bytes of data."
            )
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise CheckpointError(
                f"{path}: tensor {name!r} starts at data byte {begin}, expected {position} "
                "(tensors overlap or leave a gap)."
            )
        position = end
    return position


def safetensors_headers(path: Path) -> dict[Path, tuple[dict, int]]:
    """file -> (header, data start) for a checkpoint directory (one file or a sharded index) or one .safetensors.

    Every file is checked (read_safetensors_header); with an index, every file it names must exist and hold the
    tensors it maps there, and no tensor may sit in two files.
    """
    path = Path(path)
    if path.suffix == ".safetensors":  # a single file, e.g. a PEFT adapter_model.safetensors
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist.")
        return {path: read_safetensors_header(path)}
    index_file, single_file = path / "model.safetensors.index.json", path / "model.safetensors"
    if not index_file.is_file():
        if single_file.is_file():
            return {single_file: read_safetensors_header(single_file)}
        raise CheckpointError(
            f"{path} has neither model.safetensors nor model.safetensors.index.json "
            "(PyTorch .bin checkpoints are not supported; re-save with safe_serialization=True)."
        )
    weight_map = _read_weight_map(index_file)
    headers = {}
    for name in sorted(set(weight_map.values())):
        if not (path / name).is_file():
            raise CheckpointError(f"{index_file} names {name}, which does not exist.")
        headers[path / name] = read_safetensors_header(path / name)
    for tensor, name in weight_map.items():
        if tensor not in headers[path / name][0]:
            raise CheckpointError(f"{index_file} maps tensor {tensor!r} to {name}, which does not hold it.")
    seen: dict[str, Path] = {}
    for file, (header, _) in headers.items():
        for tensor in header.keys() - {"__metadata__"}:
            if tensor in seen:
                raise CheckpointError(f"tensor {tensor!r} is in both {seen[tensor]} and {file}.")
            seen[tensor] = file
    return headers


def _read_weight_map(index_file: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index_file} is not a valid safetensors index (no weight_map).") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file} is not a valid safetensors index (weight_map is not names to files).")
    if not weight_map:
        raise CheckpointError(f"{index_file} maps no tensors.")
    return weight_map


# ---------------------------------------------------------------------------------------------------
# GGUF integrity


def open_gguf(path: Path):
    """A `gguf.GGUFReader` (tensors memory-mapped, nothing dequantised yet) of a complete GGUF file.

    The reader itself fails on a truncated file with numpy's words ("cannot reshape array of size ..."); here the
    magic bytes are checked first and any failure is one sentence. A file longer than its last tensor (plus the
    alignment padding) is refused as damaged.
    """
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file (a .gguf checkpoint is one file).")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path} is not a readable GGUF file (it does not start with the bytes 'GGUF').")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception:  # the gguf package raises assorted numpy errors on a short or damaged file
        raise CheckpointError(f"{path} is truncated or damaged: its metadata or tensor data cannot be read.") from None
    size = path.stat().st_size
    data_end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=int(reader.data_offset))
    if size > -(-data_end // reader.alignment) * reader.alignment:  # past the last tensor rounded up to alignment
        raise CheckpointError(f"{path} has {size - data_end} bytes after its last tensor (a damaged or padded copy?).")
    return reader
