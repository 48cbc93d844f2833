"""The device mesh, the logical→mesh rule table, and helpers to shard weights and constrain activations.

The whole sharding story lives here. Weights name logical axes (`embed`, `mlp`, `heads`, ...) in their `axes`
metadata (model/qwen2.py); `RULES` maps each logical axis to mesh axes of a mesh `('data', 'fsdp', 'tensor')`:

    data=N                 pure data parallel (weights replicated)
    fsdp=N                 ZeRO-3: weights and optimizer state split along `embed`, batch split too
    tensor=N               Megatron: heads / MLP / vocab split, activations gathered per layer
    any product            e.g. data=2, fsdp=2, tensor=2 on 8 devices

Model, training and decoding code name only logical axes (`constrain(x, ('batch', 'length', 'embed'))`,
`named_sharding(mesh, ('batch',))`); outside this file the mesh axes appear only as the sizes of
config.MeshConfig and in `--mesh data=2,...` strings.

Importing this module also keeps libtpu quiet on a machine without a TPU (`_skip_libtpu_without_tpu`): every
command and the library's models import it before any device work. Where the user's JAX_PLATFORMS asks for a
backend that cannot start, `backend_start_error` gives the one sentence the command line prints instead of JAX's
traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import pkgutil
import warnings
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax._src import hardware_utils, xla_bridge
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpatience.config_io import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or a tuple of mesh axes, or None for replicated)
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
RULES: Rules = (
    ("batch", ("data", "fsdp")),  # activations: the batch is split over every data-like axis
    ("embed", "fsdp"),  # weights: ZeRO-3 splits the model dim
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("norm", None),
    ("lora_rank", None),
    ("layers", None),  # the leading axis of stacked layer weights (qwen2.LayerStack)
)


# ---------------------------------------------------------------------------------------------------
# Which backends JAX starts. With JAX_PLATFORMS unset JAX tries every backend it knows, TPU included: where libtpu
# is installed (the `[tpu]` extra) and there is no TPU, libtpu starts, fails (quietly for JAX), and prints its own
# lines on stderr ("could not determine TPU worker hostnames", "=== Source Location Trace: ===", ...). Where JAX
# would end with its CPU backend anyway, this module tells it so before it starts, and libtpu is never loaded.
# JAX's CUDA plugin (the `[cuda]` extra, which the sharding lab also uses for abstract GPUs) on a machine without
# an NVIDIA GPU likewise fails its start with a traceback. (The lab's abstract TPU and GPU topologies load libtpu
# and the plugin's compiler by themselves: they need neither backend started.)

_TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")  # libtpu's chips: TPU v2-v4, and v5e and later


def _libtpu_installed() -> bool:
    return bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def _tpu_may_be_present() -> bool:
    """A TPU device file libtpu would open, or a TPU chip on the PCI bus (JAX's own test, hardware_utils)."""
    if any(glob.glob(pattern) for pattern in _TPU_DEVICE_FILES):
        return True
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def _plugin_names() -> list[str]:
    """The PJRT plugins JAX would try: modules of the `jax_plugins` namespace and `jax_plugins` entry points."""
    namespace = importlib.util.find_spec("jax_plugins")  # the plugins' namespace package, not imported here
    names = [m.name for m in pkgutil.iter_modules(namespace.submodule_search_locations)] if namespace else []
    return names + [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]


def _cuda_plugin_installed() -> bool:
    return any("cuda" in name for name in _plugin_names())


def _other_backend_possible() -> bool:
    """An NVIDIA GPU (JAX says when its CUDA plugin is missing), or a PJRT plugin JAX would try other than a CUDA
    one on a machine without an NVIDIA GPU (ROCm, ...): there `cpu` might not be JAX's own choice. A CUDA plugin
    without a GPU (the sharding lab compiles for abstract GPUs with it) fails its start and leaves the CPU."""
    if hardware_utils.has_visible_nvidia_gpu() or os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
        return True
    return any("cuda" not in name for name in _plugin_names())


def _skip_libtpu_without_tpu() -> None:
    """Set JAX's platforms to `cpu` where that is what JAX would choose anyway, after a failed start of libtpu or of
    the CUDA plugin: one of them is installed, there is no TPU, no NVIDIA GPU and no other PJRT plugin, and nobody
    chose (neither JAX_PLATFORMS, even empty, nor jax.config's jax_platforms is set). Starts no backend; does
    nothing once they run."""
    if "JAX_PLATFORMS" in os.environ or jax.config.jax_platforms is not None:
        return
    if xla_bridge.backends_are_initialized() or not (_libtpu_installed() or _cuda_plugin_installed()):
        return
    if _tpu_may_be_present() or _other_backend_possible():
        return
    jax.config.update("jax_platforms", "cpu")


_skip_libtpu_without_tpu()


def _skip_cuda_check_without_gpu() -> None:
    """Where the user's platforms name cuda (or gpu) and the CUDA plugin is installed but there is no NVIDIA GPU,
    JAX skips the cuda backend whatever the plugin finds; the plugin's version check would only log a traceback
    of its failed `cuInit` first. Skip that check (JAX's own JAX_SKIP_CUDA_CONSTRAINTS_CHECK), so the outcome is
    JAX's alone: another platform of the list, or backend_start_error's one sentence. Starts no backend."""
    asked = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    if not {"cuda", "gpu"} & {name.strip() for name in asked.split(",")}:
        return
    if _cuda_plugin_installed() and not hardware_utils.has_visible_nvidia_gpu():
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


_skip_cuda_check_without_gpu()


def _platform_problem(platform: str) -> str | None:
    """Why JAX's backend `platform` cannot start on this machine, or None where nothing here says it cannot."""
    if platform == "cpu":
        return None
    if platform == "tpu":
        if not _libtpu_installed():
            return "libtpu (the [tpu] extra) is not installed"
        return None if _tpu_may_be_present() else "this machine has no TPU"
    if platform in ("cuda", "gpu"):
        if not _cuda_plugin_installed():
            return "JAX's CUDA plugin (the [cuda] extra) is not installed"
        return None if hardware_utils.has_visible_nvidia_gpu() else "this machine has no NVIDIA GPU"
    known = set(getattr(xla_bridge, "_backend_factories", ())) | {"gpu"}  # JAX's backends, plugins' included
    return None if platform in known else f"'{platform}' is not a JAX backend (known: {', '.join(sorted(known))})"


def _platforms_here() -> str:
    """The backends this machine could start, in words: `cpu`, `cpu, cuda`, ..."""
    here = ["cpu"]
    if _libtpu_installed() and _tpu_may_be_present():
        here.append("tpu")
    if _cuda_plugin_installed() and hardware_utils.has_visible_nvidia_gpu():
        here.append("cuda")
    return ", ".join(here)


def backend_start_error(err: BaseException) -> ConfigError | None:
    """The one sentence for JAX's failed backend start, or None where `err` is something else.

    Where JAX_PLATFORMS (or jax.config's jax_platforms) names a backend that cannot start (tpu without a TPU, cuda
    without its plugin or a GPU, a bogus name), JAX's first device call raises a RuntimeError ("Unable to
    initialize backend ...", some 80 lines) or, where it skipped a CUDA backend without a GPU, a bare
    AssertionError. The command-line door (cli.py) turns it into this ConfigError: the variable, what was asked,
    what this machine has, exit status 2. Backends that started, or no platform chosen, leave `err` alone."""
    asked = jax.config.jax_platforms
    if not isinstance(err, (RuntimeError, AssertionError)) or not asked or xla_bridge.backends_are_initialized():
        return None
    jax_said = str(err).startswith("Unable to initialize backend")
    problems = [f"{name}: {why}" for name in asked.split(",") if (why := _platform_problem(name.strip()))]
    if not problems and not jax_said:
        return None  # nothing says the backend cannot start: some other assertion, kept as it is
    variable = "JAX_PLATFORMS" if os.environ.get("JAX_PLATFORMS") == asked else "jax.config's jax_platforms"
    reason = "; ".join(problems) if problems else str(err).split(" (set JAX_PLATFORMS")[0]
    return ConfigError(
        f"{variable}={asked} asks for a JAX backend that cannot start ({reason}); this machine can start: "
        f"{_platforms_here()}. Unset JAX_PLATFORMS or set it to one of these."
    )


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A mesh of shape (data, fsdp, tensor). One of the sizes may be -1: "all remaining devices"."""
    all_devices = devices is None  # the process's devices: jax.make_mesh may order them for locality
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1.")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) > len(devices) or (math.prod(sizes) < len(devices) and jax.process_count() > 1):
        raise ValueError(
            f"mesh data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]} needs {math.prod(sizes)} devices; "
            f"{len(devices)} are available."
        )
    if math.prod(sizes) < len(devices):  # a sub-mesh on one host: use the first devices, and say so
        warnings.warn(f"the mesh uses {math.prod(sizes)} of {len(devices)} devices.", stacklevel=2)
        devices = devices[: math.prod(sizes)]
    # Auto axes: XLA's partitioner propagates shardings from the weights and the constraints we place (GSPMD);
    # jax.make_mesh orders devices so that `tensor` (the last, most communication-heavy axis) stays local.
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if all_devices and len(devices) == len(jax.devices()):
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types)
    return Mesh(np.array(devices).reshape(sizes), MESH_AXES, axis_types=axis_types)


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' -> {'data': 2, 'fsdp': 2, 'tensor': 2} (missing axes are 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name.strip() not in sizes:
            raise ValueError(f"unknown mesh axis {name.strip()!r} in {text!r}; axes are {', '.join(MESH_AXES)}.")
        sizes[name.strip()] = int(value)
    return sizes


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None, rules: Rules = RULES
) -> PartitionSpec:
    """PartitionSpec for an array whose dims have logical names `axes`.

    A mesh axis is used at most once per array (the first dim that asks for it wins). When `shape` and `mesh`
    are given, a mesh axis that does not divide its dim is dropped (that dim is replicated instead).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        chosen = []
        for axis in mesh_axes:
            if axis in used:
                continue
            if shape is not None and mesh is not None:
                size = math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]
                if shape[i] % size:
                    continue
            chosen.append(axis)
            used.add(axis)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def batch_shards(mesh: Mesh | None, rules: Rules = RULES) -> int:
    """How many ways `mesh` splits the logical `batch` axis (1 without a mesh): a batch must be a multiple of it."""
    if mesh is None:
        return 1
    mesh_axes = logical_to_spec(("batch",), rules=rules)[0]
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    return math.prod(mesh.shape[axis] for axis in mesh_axes)


def named_sharding(
    mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None, rules: Rules = RULES
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def state_shardings(mesh: Mesh, state, rules: Rules = RULES):
    """A pytree of NamedSharding matching an NNX state, read from each Variable's `axes` metadata."""

    def one(variable):
        axes = variable.get_metadata().get("axes")
        shape = variable.get_value().shape
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        return named_sharding(mesh, axes, shape, rules)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---------------------------------------------------------------------------------------------------
# Activation constraints. The model calls `constrain(x, ('batch', 'length', 'embed'))`; it is a no-op unless a
# mesh is active (`with activate(mesh):` around the *tracing* of a jitted function).

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("jaxpatience_mesh", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = RULES) -> Iterator[Mesh]:
    token = _ACTIVE.set((mesh, rules))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def activate_if(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """`activate(mesh)`, or nothing without a mesh (single-device code paths)."""
    return activate(mesh) if mesh is not None else contextlib.nullcontext()


def active_mesh() -> Mesh | None:
    """The mesh `activate` set around the tracing under way, or None (kernels that must be wrapped per device)."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape, rules))


# ---------------------------------------------------------------------------------------------------
# Multi-host start-up.


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Start `jax.distributed` from arguments or the environment; returns True if it is multi-process.

    Reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID when the arguments are None. With none
    of them set, nothing is started (single process), except with JAX_DISTRIBUTED_AUTO=1: then
    `jax.distributed.initialize()` finds its peers itself from a SLURM job step's SLURM_* variables (one
    process per GPU unless JAX_LOCAL_DEVICE_IDS lists the devices each process drives, as
    scripts/slurm/jaxpatience.sbatch does), a TPU VM's metadata, Open MPI, or Kubernetes.
    """
    if jax.distributed.is_initialized():  # a second command in the same program (irpo: eval, then train)
        return jax.process_count() > 1
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes or (int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None)
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    auto = coordinator_address is None and env.get("JAX_DISTRIBUTED_AUTO") == "1"
    if coordinator_address is None and not auto:
        return False
    # Cross-process collectives on CPU need gloo; the setting does not affect GPU/TPU backends. (Asking for the
    # backend here would initialise it, which must not happen before jax.distributed.initialize.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        try:
            jax.distributed.initialize()
        except ValueError as err:  # no cluster found: JAX says only "coordinator_address should be defined"
            if "coordinator_address" not in str(err):
                raise
            raise ValueError(
                f"JAX_DISTRIBUTED_AUTO=1 but jax.distributed found no cluster to join ({err}): run inside a SLURM "
                "job step (srun), on a TPU VM, or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID."
            ) from err
        return jax.process_count() > 1
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return jax.process_count() > 1


# ---------------------------------------------------------------------------------------------------
# Host <-> device for arrays every process holds alike (the decoder's prompts and its small per-row results).


def put_global(array: np.ndarray, mesh: Mesh | None, axes: Sequence[str | None]):
    """A host array that every process holds in full -> a global array split along logical `axes`.

    Without a mesh the numpy array is returned as it is (jit places it). On several processes each one supplies
    only the shards its own devices hold, so the same call works on one host and on a pod.
    """
    if mesh is None:
        return array
    target = named_sharding(mesh, axes, array.shape)
    if jax.process_count() == 1:
        return jax.device_put(array, target)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def fetch(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host, sharded) array -> the whole array as numpy, the same on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_main_process() -> bool:
    """Process 0 writes the files every process would write alike."""
    return jax.process_index() == 0


def broadcast_json(value=None):
    """Process 0's JSON-able `value`, on every process (the others' argument is ignored); one process: `value`.

    How the processes agree on what only process 0 read from disk (which problems are done, a summary), so that
    every process takes the same branches and calls the same jitted functions.
    """
    if jax.process_count() == 1:
        return value
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main_process() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    padded = np.zeros(size, np.uint8)
    padded[: min(size, data.size)] = data[:size]
    return json.loads(bytes(multihost_utils.broadcast_one_to_all(padded)).decode())


def barrier(name: str) -> None:
    """Wait until every process gets here (e.g. after process 0 wrote files the others read next)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
