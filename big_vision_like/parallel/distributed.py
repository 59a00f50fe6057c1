"""Starting JAX's distributed runtime for a multi-process run, only when asked.

A multi-process job runs the same command in every process, with the
coordinator's address, the number of processes and this process's id given by
flags or by the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), or detected from a cluster (SLURM, Open MPI, Cloud TPU) with
`auto`. Without any of them the run stays single-process and never touches the
runtime. A process that dies is noticed through the coordination service's
heartbeats: the survivors stop with an error instead of waiting forever.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from big_vision_like.registry import ConfigError


def requested(coordinator_address: str | None = None, num_processes: int | None = None,
              auto: bool = False) -> bool:
  return bool(auto or coordinator_address or num_processes
              or os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               heartbeat_timeout_seconds: int = 60,
               initialization_timeout_seconds: int = 300) -> bool:
  """Calls `jax.distributed.initialize` if a multi-process run was asked for.

  Returns whether it did. Must run before anything touches JAX's devices.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  if not requested(coordinator_address, num_processes, auto):
    return False
  if not auto and None in (coordinator_address, num_processes, process_id):
    raise ConfigError(
        f"a multi-process run needs --coordinator_address, --num_processes and "
        f"--process_id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), "
        f"got {coordinator_address!r}, {num_processes!r}, {process_id!r}; or pass "
        f"--distributed to detect them from the cluster")
  if num_processes is not None and process_id is not None and \
      not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id={process_id} must be in [0, {num_processes})")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, heartbeat_timeout_seconds=int(heartbeat_timeout_seconds),
      initialization_timeout=int(initialization_timeout_seconds))
  logging.info("Distributed runtime: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def any_process(flag: bool) -> bool:
  """True if `flag` is set in any process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())
