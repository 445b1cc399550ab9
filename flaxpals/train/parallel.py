"""Data parallelism over every device of every host: mesh, shardings, global batches.

    parallel.initialize("auto")                        # before any other JAX call
    mesh = parallel.make_mesh()                        # 1-D ('data',) over jax.devices()
    per_process = parallel.process_batch_size(config.train.batch_size, mesh,
                                              "train.batch_size")
    shardings = parallel.state_shardings(state, mesh, fsdp=config.parallel.fsdp)
    state = parallel.put(state, shardings)             # host values -> global arrays
    batch = parallel.global_batch(local_batch, mesh)   # this process's rows -> global arrays
    values = parallel.to_host(array)                   # a global array -> NumPy, every process

Rules:

- Batches: the leading (example) axis is split over `data`. The global batch
  size of the config (`train.batch_size`, `eval.batch_size`) must divide by the
  device count; each process reads batch_size / process_count rows of its own
  data shard (`batching.TrainPlan(..., process_index=, process_count=)`)
  and `global_batch` joins the processes' rows into one array
  (`jax.make_array_from_process_local_data`): process p's rows are its devices'
  blocks of the global batch.
- Params and optimiser state: replicated on every device by default (plain data
  parallelism: XLA all-reduces the gradients). With `fsdp=True` every leaf of at
  least FSDP_MIN_SIZE elements is split along its largest axis that divides by
  the device count (FSDP/ZeRO-3 style: XLA all-gathers a weight where it is used
  and reduce-scatters its gradient); smaller leaves stay replicated. Adam's
  moments have their parameter's shape, so they are split the same way.
- Multi-process: `initialize` (module function below) decides whether this
  process is part of a multi-process job and calls `jax.distributed.initialize`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

DATA = "data"  # the mesh axis batches are split on
FSDP_MIN_SIZE = 1 << 14  # leaves smaller than this stay replicated under fsdp
DISTRIBUTED_MODES = ("auto", "yes", "no")


# ---------------------------------------------------------------- multi-process


def multiprocess_reason(environ: Mapping[str, str] | None = None) -> str | None:
    """Why the environment says this process is one of several (None: it does not).

    - JAX_COORDINATOR_ADDRESS is set (JAX's own variable; with it flaxpals reads
      JAX_NUM_PROCESSES and JAX_PROCESS_ID, which launch/gpu.sh sets);
    - SLURM_NTASKS or OMPI_COMM_WORLD_SIZE is above 1 (a Slurm or Open MPI job);
    - TPU_WORKER_HOSTNAMES lists more than one host (a TPU pod slice on GKE).

    A Cloud TPU VM pod slice sets none of these (JAX asks the metadata server);
    launch/tpu.sh passes --distributed=yes there.
    """
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(var, "").isdigit() and int(env[var]) > 1:
            return f"{var}={env[var]}"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"TPU_WORKER_HOSTNAMES lists {len(hosts)} hosts"
    return None


def initialize(mode: str = "auto") -> bool:
    """Joins a multi-process job with `jax.distributed.initialize`; True if it did.

    mode "auto": only when `multiprocess_reason()` finds a reason; "yes": always
    (JAX then finds the coordinator, process count and id itself on Cloud TPU,
    Slurm, Open MPI and Kubernetes); "no": never. Call it before anything else
    touches a JAX device.
    """
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed mode {mode!r} is not one of {DISTRIBUTED_MODES}")
    reason = multiprocess_reason() if mode == "auto" else "--distributed=yes"
    if mode == "no" or reason is None:
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(var):
            kwargs[arg] = int(os.environ[var])
    log.info("jax.distributed.initialize(%s): %s", kwargs, reason)
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d: %d local of %d devices (%s)", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count(), reason)
    return True


# ---------------------------------------------------------------- mesh and shardings


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,),
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over 'data', other axes whole."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_divisible(global_size: int, devices: int, processes: int, key: str) -> int:
    """global_size // processes (the rows each process feeds); raises a ValueError naming
    `config.<key>` unless `devices` divides global_size."""
    if global_size % devices:
        near = devices * max(1, round(global_size / devices))
        raise ValueError(
            f"config.{key}={global_size} does not divide over {devices} devices "
            f"({processes} process(es)): every device needs the same whole number of "
            f"examples; use a multiple of {devices}, e.g. {near}")
    return global_size // processes


def process_batch_size(global_size: int, mesh: Mesh, key: str) -> int:
    """The rows each process feeds for a global batch; raises unless the mesh's devices
    divide it. key names the config field in the error, e.g. "train.batch_size"."""
    return check_divisible(global_size, mesh.devices.size, jax.process_count(), key)


def fsdp_axis(shape: tuple[int, ...], num_devices: int) -> int | None:
    """The axis FSDP splits a leaf of `shape` along: the largest one `num_devices`
    divides, for leaves of at least FSDP_MIN_SIZE elements; None: keep it whole."""
    if num_devices < 2 or int(np.prod(shape)) < FSDP_MIN_SIZE:
        return None
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % num_devices == 0:
            return axis
    return None


def leaf_sharding(shape: tuple[int, ...], mesh: Mesh, fsdp: bool) -> NamedSharding:
    """Replicated, or with `fsdp` split along `fsdp_axis(shape)` when there is one."""
    axis = fsdp_axis(shape, mesh.shape[DATA]) if fsdp else None
    if axis is None:
        return replicated(mesh)
    spec = [None] * len(shape)
    spec[axis] = DATA
    return NamedSharding(mesh, P(*spec))


def state_shardings(tree, mesh: Mesh, fsdp: bool = False):
    """A tree of NamedShardings for params, optimiser state or a whole TrainState."""
    return jax.tree.map(lambda x: leaf_sharding(np.shape(x), mesh, fsdp), tree)


def describe(tree, shardings, mesh: Mesh) -> str:
    """One line: devices, processes, and how much of `tree` is split over 'data'."""
    leaves = jax.tree.leaves(tree)
    split = [x for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True)
             if not s.is_fully_replicated]
    total = sum(int(np.prod(np.shape(x))) for x in leaves)
    part = sum(int(np.prod(np.shape(x))) for x in split)
    layout = (f"{len(split)} of {len(leaves)} state leaves ({part / max(total, 1):.1%} of the "
              f"values) split over '{DATA}', the rest replicated" if split
              else "state replicated on every device")
    return (f"mesh: {mesh.devices.size} device(s) in {jax.process_count()} process(es); "
            f"{layout}")


# ---------------------------------------------------------------- moving data


def put(tree, shardings):
    """Host values (NumPy or single-device arrays, the same on every process) -> global
    arrays laid out by `shardings`. Each device receives only its own block."""
    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(one, tree, shardings)


def global_batch(batch: Any, mesh: Mesh) -> Any:
    """This process's rows (a tree of NumPy arrays [rows, ...]) -> global arrays whose
    leading axis is split over 'data' ([rows * process_count, ...])."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a global array as NumPy, on every process.

    Across processes this is a collective (every process must call it).
    """
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host0_decides(flag: bool) -> bool:
    """Process 0's `flag` on every process (so all take the same collective path,
    e.g. when only process 0 can read a file)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.bool_)))


def raise_together(error: BaseException | None) -> None:
    """Raises on every process when any has an `error` (its own, or a ValueError naming the
    processes that failed), so that none waits at a collective for one that stopped. On
    one process: raises `error` if any. Every process must call it."""
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is not None:
        raise error
    if failed.any():
        raise ValueError(f"process(es) {', '.join(map(str, np.flatnonzero(failed)))} of "
                         f"{jax.process_count()} stopped; their log says why")


def barrier(name: str) -> None:
    """Waits until every process has called barrier(name) (nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
