"""Abstract NVIDIA GPUs for XLA's real GPU compiler, with no GPU present: `--target gpu:CHIP:N` / `gpu:CHIP:HxN`.

XLA compiles for a GPU from a description of the device (a `stream_executor.GpuTargetConfigProto`: compute
capability, SMs, shared memory, L2, clock, memory size and bandwidth) instead of asking a CUDA driver. JAX exposes
that through `jax.experimental.topologies.get_topology_desc(platform="cuda", topology="1xHxN", target_config=TEXT)`
once the CUDA plugin is installed (the `[cuda]` extra), giving H hosts × N abstract GPUs whose programs compile
exactly as on the hardware: the same fusions, collectives (FSDP's gradient reduction as a reduce-scatter, where
the CPU compiler keeps an all-reduce), cuDNN attention custom calls and memory plan.

What such a compile does not do: autotuning (no device to time kernels on), so the kernels are no speed
prediction, but memory, collectives and FLOPs are the real program's. JAX must not start the CUDA backend itself
(no driver here): the lab runs on the CPU platform and only the topology is a GPU one.

The figures, per chip, from NVIDIA's public documents: SM counts, L2 sizes and boost clocks from the H100 and
A100 datasheets and architecture whitepapers (the H200 is the H100's GH100 die with 141 GB of HBM3e); shared
memory per SM and the opt-in per block from the CUDA C++ Programming Guide's table of compute capabilities
(8.0: 164 KB per SM, 163 KB per block; 9.0: 228 KB per SM, 227 KB per block); memory size and bandwidth as in
chips.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

from jax.experimental import topologies

from jaxpatience.planning import chips


@dataclasses.dataclass(frozen=True)
class GpuDevice:
    """What XLA's GPU compiler reads of a device (the fields of its GpuDeviceInfoProto we fill)."""

    compute_capability: tuple[int, int]
    sm_count: int
    fp32_units_per_sm: int
    shared_memory_per_sm: int  # bytes
    shared_memory_per_block_optin: int  # bytes a kernel may ask for
    l2_cache_bytes: int
    clock_ghz: float  # boost clock


KB, MB = 1024, 1024 * 1024
DEVICES: dict[str, GpuDevice] = {
    "a100": GpuDevice((8, 0), 108, 64, 164 * KB, 163 * KB, 40 * MB, 1.41),
    "h100": GpuDevice((9, 0), 132, 128, 228 * KB, 227 * KB, 50 * MB, 1.98),
    "h200": GpuDevice((9, 0), 132, 128, 228 * KB, 227 * KB, 50 * MB, 1.98),
}
CUDA_HINT = 'GPU targets need JAX\'s CUDA plugin (no GPU needed): pip install -e ".[cuda]".'


def parse_target(target: str) -> tuple[str, int, int]:
    """'gpu:h100:8' -> ('h100', 1, 8); 'gpu:h100:2x8' -> ('h100', 2, 8): chip, hosts, GPUs per host."""
    parts = target.split(":")
    if len(parts) != 3 or parts[0] != "gpu":
        raise ValueError(f"target {target!r}: expected gpu:CHIP:N or gpu:CHIP:HOSTSxN (e.g. gpu:h100:8, gpu:h100:2x8).")
    name, count = parts[1].lower(), parts[2].lower()
    if name not in DEVICES:
        raise ValueError(f"target {target!r}: no GPU {parts[1]!r} in the table; known: {', '.join(DEVICES)}.")
    hosts, _, per_host = count.rpartition("x")
    numbers = [hosts or "1", per_host]
    if not all(n.isdigit() and int(n) > 0 for n in numbers):
        raise ValueError(f"target {target!r}: {parts[2]!r} is not N or HOSTSxN with positive numbers.")
    return name, int(numbers[0]), int(numbers[1])


def target_config(name: str) -> str:
    """The GpuTargetConfigProto text of one chip, as XLA's deviceless compiler reads it."""
    device, chip = DEVICES[name], chips.chip(name)
    major, minor = device.compute_capability
    info = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 * KB,  # without opt-in, on every generation since Volta
        "shared_memory_per_block_optin": device.shared_memory_per_block_optin,
        "shared_memory_per_core": device.shared_memory_per_sm,
        "threads_per_core_limit": 2048,
        "core_count": device.sm_count,
        "fpus_per_core": device.fp32_units_per_sm,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "memory_bandwidth": int(chip.hbm_bw),
        "l2_cache_size": device.l2_cache_bytes,
        "clock_rate_ghz": device.clock_ghz,
        "device_memory_size": int(chip.hbm_bytes),
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    fields = "\n".join(f"  {key}: {value}" for key, value in info.items())
    return (
        f"gpu_device_info {{\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n{fields}\n}}\n"
        f'platform_name: "CUDA"\ndevice_description_str: "NVIDIA {name.upper()} (abstract)"\n'
    )


def topology_devices(target: str) -> list:
    """The abstract GPUs of a `gpu:` target (hosts × GPUs per host), for meshes and ahead-of-time compiles."""
    name, hosts, per_host = parse_target(target)
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", topology=f"1x{hosts}x{per_host}", target_config=target_config(name)
        )
    except (RuntimeError, ValueError) as err:
        if "cuda" in str(err).lower() and ("not" in str(err).lower() or "unknown" in str(err).lower()):
            raise ValueError(CUDA_HINT) from None
        raise ValueError(f"GPU topology {target!r} was refused: {str(err).splitlines()[0]}") from None
    return list(topology.devices)


@contextlib.contextmanager
def capability_of(name: str):
    """Compile for an abstract GPU as if it ran here: JAX asks the *running* backend for the GPU's compute
    capability before it lowers packed rows to cuDNN (its THD layout needs 9.0), and a deviceless compile runs on
    the CPU backend, which has none. Inside this block JAX's check answers with the target chip's capability
    (planning only: nothing runs). A JAX without that private check is left as it is."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn
    except ImportError:
        yield
        return
    if not hasattr(cudnn, "check_compute_capability"):
        yield
        return
    have = DEVICES[name].compute_capability
    with mock.patch.object(cudnn, "check_compute_capability", lambda want: have >= tuple(map(int, want.split(".")))):
        yield
