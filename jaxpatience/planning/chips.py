"""The accelerators a plan can target: peak dense bf16 FLOP/s, HBM capacity and bandwidth, interconnect.

One table, each figure with its public source. `link_bw` is what one collective over one mesh axis may use per
device in one direction: half the bidirectional per-chip figure vendors publish (NVLink, TPU ICI). On a TPU torus
an axis laid along one dimension reaches only some of the chip's links, so this is an optimistic bound, as a
roofline should be. GPUs beyond one NVLink domain (`node_size` devices) use the network (`network_bw` per GPU).
"""

from __future__ import annotations

import dataclasses

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bytes: float  # memory per device
    hbm_bw: float  # bytes/s
    link_bw: float  # bytes/s per device, one direction, for one collective inside a node / slice
    node_size: int | None = None  # devices per NVLink domain (GPUs); None: the whole slice is one domain (TPU ICI)
    network_bw: float | None = None  # bytes/s per device between nodes (GPUs)


CHIPS: dict[str, Chip] = {
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense BF16 (1979 with sparsity), 80 GB HBM3 at 3.35 TB/s,
    # NVLink 900 GB/s bidirectional; DGX H100: one 400 Gb/s ConnectX-7 (InfiniBand NDR) per GPU.
    "h100": Chip("h100", 989e12, 80 * GB, 3.35e12, 450 * GB, 8, 50 * GB),
    # NVIDIA H200 SXM datasheet: 989 TFLOP/s dense BF16, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s; 400 Gb/s per GPU.
    "h200": Chip("h200", 989e12, 141 * GB, 4.8e12, 450 * GB, 8, 50 * GB),
    # NVIDIA A100 SXM 80GB datasheet: 312 TFLOP/s dense BF16, 80 GB HBM2e at 2.039 TB/s, NVLink 600 GB/s
    # bidirectional; DGX A100: one 200 Gb/s HDR InfiniBand per GPU.
    "a100": Chip("a100", 312e12, 80 * GB, 2.039e12, 300 * GB, 8, 25 * GB),
    # Cloud TPU v4 page: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s. It gives no per-chip ICI figure; 6 links of
    # 50 GB/s per chip, from the TPU v4 paper (Jouppi et al., ISCA 2023, arXiv 2304.01433): 300 GB/s, half here.
    "v4": Chip("v4", 275e12, 32 * 2**30, 1200 * GB, 150 * GB),
    # Cloud TPU v5e page: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s bidirectional per chip.
    "v5e": Chip("v5e", 197e12, 16 * GB, 819 * GB, 200 * GB),
    # Cloud TPU v5p page: 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, ICI 1200 GB/s bidirectional per chip.
    "v5p": Chip("v5p", 459e12, 95 * 2**30, 2765 * GB, 600 * GB),
    # Cloud TPU v6e (Trillium) page: 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, ICI 800 GB/s bidirectional per chip.
    "v6e": Chip("v6e", 918e12, 32 * GB, 1638 * GB, 400 * GB),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e", "h100-sxm": "h100", "a100-80gb": "a100"}


def chip(name: str) -> Chip:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in CHIPS:
        raise ValueError(f"unknown chip {name!r}; known: {', '.join(CHIPS)} (or give --chip-spec).")
    return CHIPS[key]


def with_spec(base: Chip, text: str) -> Chip:
    """`peak_flops=4e14,hbm_bytes=32e9,...` overrides fields of `base` (numbers; node_size an integer)."""
    fields = {f.name for f in dataclasses.fields(Chip)} - {"name"}
    changes = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in fields:
            raise ValueError(f"unknown chip field {key!r} in --chip-spec; fields: {', '.join(sorted(fields))}.")
        try:
            changes[key] = int(value) if key == "node_size" else float(value)
        except ValueError:
            raise ValueError(f"--chip-spec {key}={value!r} is not a number.") from None
    return dataclasses.replace(base, name=f"{base.name}*" if changes else base.name, **changes)


def chip_of_device(device_kind: str) -> Chip:
    """A local accelerator's chip from JAX's `device_kind` ('NVIDIA H100 80GB HBM3', 'TPU v5p', ...)."""
    kind = device_kind.lower().replace(" ", "")
    for name in ("h200", "h100", "a100", "v5p", "v6e", "v4"):
        if name in kind:
            return CHIPS[name]
    if "v5lite" in kind or "v5e" in kind:
        return CHIPS["v5e"]
    raise ValueError(f"no chip in the table for the local devices ({device_kind!r}); name one with --chip.")


def chip_of_topology(topology: str) -> Chip:
    """'v5p:4x4x4' -> the v5p entry; the TPU generation names the chip."""
    return chip(topology.split(":", 1)[0].split("-", 1)[0])
