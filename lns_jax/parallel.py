"""Data parallelism with ``jax.jit`` over a device mesh, and multi-host start-up.

The global batch is split over a ``data`` mesh axis (``NamedSharding``); the train
state is replicated. XLA inserts the all-reduces, so gradients and BatchNorm
statistics are those of the global batch: the same numbers as one device with the
same global batch. This is JAX's current replacement for ``pmap``.

The mapping networks f_theta (Eq. 4) take the latent kernels, which are replicated,
as their input. Left alone, XLA would keep that work replicated (every device mapping
every whole kernel); the trainer instead splits it by filters over the ``data`` axis
(``MappingNet.filter_sharding``, ``config.mapping.shard``): each device maps 1/N of a
layer's filters and ``q_hat`` is gathered (``tests/test_parallel.py`` checks this on the
compiled program).

Several processes (hosts): :func:`initialize_distributed` calls
``jax.distributed.initialize``; then ``jax.devices()`` lists every device of every
process and the mesh spans them all. Each process reads its own part of the global
batch (``lns_jax.data``) and :func:`shard_batch` assembles the global array from the
parts without moving data between hosts.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh ``('data',)`` over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("make_mesh: no devices given.")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (the train state, the metrics)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over the ``data`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Turns this process's part of the global batch into global arrays sharded on 'data'.

  Each process passes its own ``batch_size // process_count`` examples (what
  ``lns_jax.data`` yields); nothing is exchanged between processes. With one process,
  batches that are already on the devices (``jax.Array``, the ``'numpy'`` loader's)
  stay there: at most a device-to-device copy, a no-op when already so laid out.
  """
  sharding = batch_sharding(mesh)
  local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  on_device = jax.process_count() == 1
  out = {}
  for k, v in batch.items():
    if not (on_device and isinstance(v, jax.Array)):
      v = np.asarray(v)
    if v.ndim == 0 or v.shape[0] % max(local, 1):
      raise ValueError(
          f"shard_batch: {k!r} has shape {v.shape}; its leading (batch) axis must be a "
          f"multiple of this process's {local} devices (config.batch_size must be a "
          f"multiple of the device count).")
    out[k] = (jax.device_put(v, sharding) if isinstance(v, jax.Array)
              else jax.make_array_from_process_local_data(sharding, v))
  return out


def jit_data_parallel(fn: Callable, mesh: Mesh, *, donate_state: bool = True,
                      replicated_after: int = 0, **jit_kwargs):
  """``jax.jit`` of ``fn(state, batch) -> (new_state, metrics)`` over ``mesh``
  (``replicated_after`` more replicated arguments after the batch: a teacher's variables).

  The state (first argument) and every output are replicated, the batch is sharded
  on ``data``; the state's buffers are donated (``donate_argnums=(0,)``) so a step
  updates them in place. Steps built this way never move data between host and
  device: the batch arrives already on the devices (:func:`shard_batch`) and the
  metrics stay there until the caller fetches them. Other keyword arguments go to
  ``jax.jit`` (e.g. ``compiler_options``).
  """
  rep = replicated(mesh)
  return jax.jit(fn, in_shardings=(rep, batch_sharding(mesh)) + (rep,) * replicated_after,
                 out_shardings=(rep, rep),
                 donate_argnums=(0,) if donate_state else (), **jit_kwargs)


_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}

# XLA:CPU hands convolutions, dots and reductions to YNNPACK by default (jax 0.10.2).
# Its convolutions are slow on the weight gradient of a 3x3 conv (a conv whose window is
# the whole feature map: 21-52 GFLOP/s where XLA's own (Eigen) conv runs 2-3x faster on
# ResNet-20's layers), so the train step keeps YNNPACK for dots and reductions only.
# Listing REDUCE matters: without it XLA splits every large reduction (BatchNorm's
# statistics) into slow reduce-windows. Measured in benchmarks/train_step.py
# (--cpu_options): the ResNet-20 step 1.4-1.5x faster (DECISIONS.md 13).
# LNS_XLA_CPU_DEFAULTS=1 compiles with XLA's defaults instead.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
_cpu_options_ok = None


def cpu_options() -> dict:
  """:data:`CPU_OPTIONS` on a CPU backend when this jaxlib accepts them, else ``{}``.

  An XLA that no longer knows the option (a newer jaxlib) gets its defaults and one
  warning, not a failed compile.
  """
  global _cpu_options_ok
  if jax.default_backend() != "cpu" or os.environ.get("LNS_XLA_CPU_DEFAULTS") == "1":
    return {}
  if _cpu_options_ok is None:
    try:
      jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(np.float32(0)).compile()
      _cpu_options_ok = True
    except Exception as e:  # pylint: disable=broad-except
      _cpu_options_ok = False
      print(f"lns_jax: this jaxlib refuses the XLA:CPU options {CPU_OPTIONS} "
            f"({str(e).splitlines()[0][:120]}); compiling with XLA's defaults.")
  return dict(CPU_OPTIONS) if _cpu_options_ok else {}


def compiler_options(fast=False, cpu=True):
  """XLA options for a jitted step: :func:`cpu_options` on a CPU backend (``cpu=False``
  leaves them out: XLA's defaults), and with ``fast`` (or LNS_FAST_COMPILE=1, which the
  tests set) a several times quicker compile for less run-time speed. ``None`` when
  there are none."""
  fast = fast or os.environ.get("LNS_FAST_COMPILE") == "1"
  opts = {**(cpu_options() if cpu else {}), **(_FAST_COMPILE if fast else {})}
  return opts or None


def is_main_process() -> bool:
  """Process 0: the one that writes logs, summaries and result files."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across all processes (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids=None,
                           coordinator_bind_address: Optional[str] = None) -> bool:
  """Calls ``jax.distributed.initialize`` when asked; returns whether it did.

  Asked means: any argument given, or ``LNS_COORDINATOR_ADDRESS`` / JAX's
  ``JAX_COORDINATOR_ADDRESS`` in the environment (with ``LNS_NUM_PROCESSES`` and
  ``LNS_PROCESS_ID``), or ``auto`` for JAX's own cluster detection (SLURM, TPU pods,
  Open MPI, Kubernetes). ``LNS_COORDINATOR_BIND_ADDRESS`` (e.g. ``127.0.0.1:1234``)
  restricts the interface process 0's coordinator listens on (default: all).

  ``LNS_HEARTBEAT_TIMEOUT_S``: after how many seconds without heartbeats the coordination
  service declares a process dead and ends the others (JAX's default, 100 s, when unset;
  ``train.py`` then ends with one line naming it, :mod:`lns_jax.supervisor`).

  Must run before anything touches a JAX device. On CPU the cross-process collectives
  are gloo (JAX's default; ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` overrides it).
  """
  from lns_jax.supervisor import heartbeat_timeout_s
  env = os.environ
  heartbeat = heartbeat_timeout_s(env)
  coordinator_address = coordinator_address or env.get("LNS_COORDINATOR_ADDRESS") or env.get(
      "JAX_COORDINATOR_ADDRESS")
  if num_processes is None and env.get("LNS_NUM_PROCESSES"):
    num_processes = int(env["LNS_NUM_PROCESSES"])
  if process_id is None and env.get("LNS_PROCESS_ID"):
    process_id = int(env["LNS_PROCESS_ID"])
  coordinator_bind_address = coordinator_bind_address or env.get("LNS_COORDINATOR_BIND_ADDRESS")
  kwargs = {} if heartbeat is None else {"heartbeat_timeout_seconds": heartbeat}
  if coordinator_address == "auto":
    jax.distributed.initialize(**kwargs)
    return True
  if coordinator_address is None and num_processes is None and process_id is None:
    return False
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} must be in [0, {num_processes}).")
  if coordinator_bind_address:
    kwargs["coordinator_bind_address"] = coordinator_bind_address
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids, **kwargs)
  return True


def main_process_first(fn: Callable, *args, **kwargs):
  """Runs ``fn`` on process 0, then (after a barrier) on the others; returns its result.

  For one-time work on shared storage, e.g. building a dataset into a shared
  ``data_dir``: the other processes then find it done (or do it on their own disk).
  """
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  out = fn(*args, **kwargs) if is_main_process() else None
  sync(f"main_process_first:{getattr(fn, '__qualname__', fn)}")
  return out if is_main_process() else fn(*args, **kwargs)


def any_process(flag: bool) -> bool:
  """``True`` on every process when ``flag`` is true on any of them.

  A collective: every process must call it at the same point of the program (e.g.
  to agree on stopping after the same step when a preemption signal reaches the
  hosts at different times).
  """
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))
  return bool(np.any(flags))
