"""Data parallelism with ``jax.jit`` over a device mesh, and multi-host start-up.

The global batch is split over a ``data`` mesh axis (``NamedSharding``); the train
state is replicated. XLA inserts the all-reduces, so gradients and BatchNorm
statistics are those of the global batch: the same numbers as one device with the
same global batch. This is JAX's current replacement for ``pmap``.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh ``('data',)`` over all (global) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Turns this process's part of the global batch into global arrays sharded on 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids=None) -> bool:
  """Calls ``jax.distributed.initialize`` when asked; returns whether it did.

  Asked means: any argument given, or ``LNS_COORDINATOR_ADDRESS`` / JAX's
  ``JAX_COORDINATOR_ADDRESS`` in the environment (with ``LNS_NUM_PROCESSES`` and
  ``LNS_PROCESS_ID``), or ``auto`` for JAX's own cluster detection (SLURM, TPU pods,
  Open MPI, Kubernetes).
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("LNS_COORDINATOR_ADDRESS") or env.get(
      "JAX_COORDINATOR_ADDRESS")
  if num_processes is None and env.get("LNS_NUM_PROCESSES"):
    num_processes = int(env["LNS_NUM_PROCESSES"])
  if process_id is None and env.get("LNS_PROCESS_ID"):
    process_id = int(env["LNS_PROCESS_ID"])
  if coordinator_address == "auto":
    jax.distributed.initialize()
    return True
  if coordinator_address is None and num_processes is None and process_id is None:
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
  return True
