"""Multi-process start-up, per-process logging and preemption (SIGTERM) agreement.

A multi-host job runs the same program once per host. :func:`initialize` must run before anything
touches the XLA backend (``jax.devices()``, ``jax.process_count()``, creating an array, compiling):
the backend then sees every host's devices as one global device list. It is configured by arguments
(the ``train`` command's ``--coordinator_address``, ``--num_processes``, ``--process_id`` flags) or by
the standard environment:

* ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
* on Cloud TPU, Slurm or Open MPI jax detects all three itself: set ``DIFFUSION_JAX_DISTRIBUTED=1``.

Preemption: a preemptible TPU VM or a scheduler sends SIGTERM. With several processes jax's preemption
sync manager (installed by ``jax.distributed.initialize``) catches it on any host, tells the others, and
``multihost_utils.reached_preemption_sync_point`` (through orbax's ``CheckpointManager.reached_preemption``)
returns True on every host at the same step counter, where the loop saves and exits. A single process
installs a Python SIGTERM handler that sets a flag read at the next step boundary.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

import jax


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):       # private API moved: assume not started
        return False


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> dict | None:
    """The ``jax.distributed.initialize`` arguments from the arguments, else the environment.

    None: a single-process run. ``{}``: let jax detect the cluster (TPU, Slurm, Open MPI).
    """
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
    if address is None:
        if count is not None or pid is not None:
            raise ValueError("a process count or id is set (--num_processes / --process_id or JAX_NUM_PROCESSES "
                             "/ JAX_PROCESS_ID) but no coordinator address: set --coordinator_address or "
                             "JAX_COORDINATOR_ADDRESS=host:port of process 0")
        return {} if env.get("DIFFUSION_JAX_DISTRIBUTED", "") not in ("", "0") else None
    try:
        count = None if count is None else int(count)
        pid = None if pid is None else int(pid)
    except ValueError as e:
        raise ValueError(f"process count / id must be integers, got {count!r} / {pid!r}") from e
    if count is not None and pid is not None and not 0 <= pid < count:
        raise ValueError(f"process id {pid} is outside 0..{count - 1} (num_processes={count})")
    return dict(coordinator_address=address, num_processes=count, process_id=pid)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """``jax.distributed.initialize`` when configured (arguments or environment); True if multi-process.

    Idempotent. Raises ``RuntimeError`` naming the fix if the backend was started before it.
    """
    kwargs = settings(coordinator_address, num_processes, process_id)
    if kwargs is None:
        return jax.distributed.is_initialized()
    if jax.distributed.is_initialized():
        return True
    if _backend_started():
        raise RuntimeError("a coordinator is configured but the JAX backend was already started in this "
                           "process (something called jax.devices(), jax.process_count() or created an array "
                           "first): call diffusion_jax.training.distributed.initialize() before any JAX "
                           "computation")
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    return True


def is_primary() -> bool:
    """Process 0: the only one that writes shared files (config.json, metrics.csv, sample images)."""
    return jax.process_index() == 0


def log(message: str) -> None:
    """A line on this process's own stdout, prefixed with the process index when there are several."""
    prefix = f"[process {jax.process_index()}/{jax.process_count()}] " if jax.process_count() > 1 else ""
    print(prefix + message, flush=True)
    sys.stdout.flush()


class Preemption:
    """Did a preemption notice (SIGTERM) arrive? All processes get the same answer at the same step.

    ``reached(step, manager)`` must be called by every process with the same, increasing, step
    sequence (every step: the sync protocol agrees on max(current step over hosts) + 1).
    """

    def __init__(self) -> None:
        self.multi = jax.process_count() > 1
        self._flag = False
        self._previous: Callable | int | None = None
        if not self.multi:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handler)
            except ValueError:              # not the main thread: no handler, no preemption saves
                self._previous = None

    def _handler(self, signum, frame) -> None:
        del signum, frame
        self._flag = True

    def reached(self, step: int, manager) -> bool:
        if not self.multi:
            return self._flag
        return bool(manager.reached_preemption(step))

    def close(self) -> None:
        if not self.multi and self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
