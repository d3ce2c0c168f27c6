"""Multi-host set-up: ``jax.distributed.initialize`` from environment variables, timeouts.

Environment variables read by :func:`initialize_from_env` (the ``JAX_`` names are accepted too):

=============================  ==========================  =====================================
``RESEARCH_COORDINATOR``       ``JAX_COORDINATOR_ADDRESS``  ``host:port`` of process 0's service
``RESEARCH_NUM_PROCESSES``     ``JAX_NUM_PROCESSES``        total number of processes
``RESEARCH_PROCESS_ID``        ``JAX_PROCESS_ID``           this process, ``0 .. num - 1``
``RESEARCH_LOCAL_DEVICE_IDS``  (none)                      optional, e.g. ``"0,1"``
=============================  ==========================  =====================================

None set -> single process (nothing initialised) unless ``auto_detect=True``, which lets JAX
detect the cluster itself (TPU pod slices, SLURM, Open MPI). Partially set -> ValueError naming
what is missing.

No hanging forever:

* start-up: a watchdog ends the process with a clear message (exit code
  :data:`EXIT_TIMEOUT`) if not every process has joined within ``init_timeout_s`` (JAX's own
  deadline, set a little later, would abort with a C++ stack trace instead);
* :func:`barrier` waits at most ``timeout_s`` and raises ``TimeoutError`` naming the barrier;
* :class:`Watchdog` guards the training loop: if no step completes for ``timeout_s`` (a peer
  stalled inside a collective), it prints which process waited and where, then exits with
  :data:`EXIT_TIMEOUT`. A peer that *dies* is also caught by the coordination service's
  heartbeat (``heartbeat_timeout_s``), which terminates the others.

Only process 0 logs and writes (:func:`is_primary`); orbax checkpointing is itself
multi-process aware (every process calls ``save``, orbax writes each array once).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Mapping

import jax

__all__ = [
    "EXIT_TIMEOUT",
    "DistributedConfig",
    "config_from_env",
    "initialize_from_env",
    "is_primary",
    "barrier",
    "process_batch_slice",
    "Watchdog",
]

EXIT_TIMEOUT = 75  # EX_TEMPFAIL

_ENV = {
    "coordinator_address": ("RESEARCH_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("RESEARCH_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("RESEARCH_PROCESS_ID", "JAX_PROCESS_ID"),
}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None


def _get(env, names):
    for n in names:
        if env.get(n, "") != "":
            return n, env[n]
    return None, None


def config_from_env(env: Mapping[str, str] | None = None) -> DistributedConfig | None:
    """Reads the variables in the module docstring; ``None`` if none is set."""
    env = os.environ if env is None else env
    found = {k: _get(env, names) for k, names in _ENV.items()}
    if all(v[1] is None for v in found.values()):
        return None
    missing = [names[0] for k, names in _ENV.items() if found[k][1] is None]
    if missing:
        raise ValueError(f"multi-host set-up is partial: missing {', '.join(missing)} "
                         "(set all of RESEARCH_COORDINATOR, RESEARCH_NUM_PROCESSES, "
                         "RESEARCH_PROCESS_ID or none)")
    ints = {}
    for k in ("num_processes", "process_id"):
        name, value = found[k]
        try:
            ints[k] = int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not an integer") from None
    if ints["num_processes"] < 1:
        raise ValueError(f"number of processes must be >= 1, got {ints['num_processes']}")
    if not 0 <= ints["process_id"] < ints["num_processes"]:
        raise ValueError(f"process id {ints['process_id']} outside 0..{ints['num_processes'] - 1}")
    addr = found["coordinator_address"][1]
    if ":" not in addr:
        raise ValueError(f"coordinator address must be host:port, got {addr!r}")
    local = env.get("RESEARCH_LOCAL_DEVICE_IDS", "")
    local_ids = tuple(int(s) for s in local.split(",")) if local else None
    return DistributedConfig(addr, ints["num_processes"], ints["process_id"], local_ids)


def _die(message: str):
    sys.stderr.write(f"\n[research.parallel.distributed] FATAL: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_TIMEOUT)


class Watchdog:
    """Ends the process with a clear message if :meth:`kick` is not called for ``timeout_s``.

    Use as a context manager around the training loop and call ``kick()`` after each step (after
    the step's result has been fetched or blocked on, since dispatch is asynchronous)::

        with Watchdog(600, what="training step") as wd:
            for ...:
                state, m = step(state, batch); jax.block_until_ready(m); wd.kick()
    """

    def __init__(self, timeout_s: float, *, what: str = "training step"):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.what = what
        self._last = time.monotonic()
        self._count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="research-watchdog")

    def kick(self):
        self._last = time.monotonic()
        self._count += 1

    def _run(self):
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            waited = time.monotonic() - self._last
            if waited > self.timeout_s:
                _die(f"process {jax.process_index()}/{jax.process_count()}: no {self.what} "
                     f"completed for {waited:.1f} s (timeout {self.timeout_s:g} s) after "
                     f"{self._count} completed; a peer process is probably stalled or dead "
                     "(its log says why). Ending this run instead of hanging.")

    def __enter__(self):
        self._last = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        return False


def initialize_from_env(env: Mapping[str, str] | None = None, *, init_timeout_s: float = 300,
                        heartbeat_timeout_s: int = 100, auto_detect: bool = False,
                        cpu_collectives: str | None = "gloo") -> DistributedConfig | None:
    """Calls ``jax.distributed.initialize`` from the environment (see module docstring).

    Args:
      env: mapping to read (default ``os.environ``).
      init_timeout_s: all processes must have joined within this many seconds, else this
        process exits with a clear message and code :data:`EXIT_TIMEOUT`.
      heartbeat_timeout_s: a peer silent this long is declared dead (the service then ends
        every process).
      auto_detect: with no variables set, let JAX detect the cluster (TPU pod, SLURM, MPI).
      cpu_collectives: CPU cross-process collectives implementation (``"gloo"``; ``None``
        leaves JAX's default), only relevant on CPU.

    Returns:
      The :class:`DistributedConfig` used, or ``None`` for a single process (nothing done).
    """
    cfg = config_from_env(env)
    if cfg is None and not auto_detect:
        return None
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    who = "auto-detected cluster" if cfg is None else (
        f"process {cfg.process_id}/{cfg.num_processes} via {cfg.coordinator_address}")
    done = threading.Event()

    def watch():
        if not done.wait(init_timeout_s):
            _die(f"jax.distributed.initialize ({who}) did not complete within {init_timeout_s:g} s: "
                 "not every process joined. Check that all processes were started with the same "
                 "RESEARCH_COORDINATOR and RESEARCH_NUM_PROCESSES, that process 0 is running, and "
                 "that the coordinator port is reachable.")
    threading.Thread(target=watch, daemon=True, name="research-init-watchdog").start()
    try:
        kwargs = dict(initialization_timeout=int(init_timeout_s) + 30,
                      heartbeat_timeout_seconds=int(heartbeat_timeout_s))
        if cfg is None:
            jax.distributed.initialize(**kwargs)
        else:
            jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                                       local_device_ids=cfg.local_device_ids, **kwargs)
    except Exception as e:
        raise RuntimeError(f"jax.distributed.initialize failed for {who}: {e}") from e
    finally:
        done.set()
    return cfg


def is_primary() -> bool:
    """True on process 0, the one that logs and writes files."""
    return jax.process_index() == 0


def barrier(name: str, *, timeout_s: float = 300.0) -> None:
    """Waits until every process reaches barrier ``name``; ``TimeoutError`` after ``timeout_s``.

    A no-op with one process. Barrier names must be unique per use (e.g. include the step).
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as _dist  # the coordination client; no public handle

    client = _dist.global_state.client
    if client is None:
        raise RuntimeError("barrier() needs jax.distributed to be initialised")
    try:
        client.wait_at_barrier(name, int(timeout_s * 1000))
    except Exception as e:  # JaxRuntimeError: DEADLINE_EXCEEDED
        if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
            raise TimeoutError(
                f"process {jax.process_index()}/{jax.process_count()}: barrier {name!r} timed out "
                f"after {timeout_s:g} s; at least one peer did not arrive (stalled or dead)") from e
        raise


def process_batch_slice(global_batch_size: int, *, process_index: int | None = None,
                        process_count: int | None = None) -> slice:
    """The rows of the global batch this process loads: contiguous, equal-sized blocks.

    Matches the device order of :func:`research.parallel.sharding.make_mesh` over
    ``jax.devices()`` (grouped by process), so ``shard_batch`` of this slice forms the global
    batch in order.
    """
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{n} processes")
    per = global_batch_size // n
    return slice(p * per, (p + 1) * per)
