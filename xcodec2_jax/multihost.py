"""Cross-process exchange for multi-host runs (``jax.distributed``): bounded in time, failure-aware.

The engine needs none (each process runs its own steps on its own devices); the tokenizer checks that every
process computes the same numerics, polls for a failed peer while it works (:func:`raise_if_failed`) and waits
for the others at the end. Every exchange goes through :func:`allgather`, so how a failed, vanished or slow
peer is detected lives here, once.

An exchange is a round of the distributed runtime's key-value store (the coordination service that
``jax.distributed.initialize`` starts), not a device collective: a device all-gather blocks forever when a
peer has died, while the key-value store can be polled with a timeout. Each process publishes its value
under the round's number and waits for the others' in short polls; between polls it checks two things:

* a *failure flag*: a process that hits an exception inside :func:`fail_together` publishes
  ``"<type>: <message>"`` before it unwinds, and every peer waiting in an exchange raises
  :class:`PeerFailedError` naming that process and its error at its next poll (within ``POLL_SECONDS``);
* an *exit flag*: a process that exits (an uncaught exception anywhere, ``sys.exit``) publishes that it is
  gone from an ``atexit`` hook, which runs before JAX's own shutdown barrier would make its peers wait;
* a *deadline*: a peer that neither answers nor flags a failure (killed, hung, network gone) makes the
  exchange raise :class:`PeerTimeoutError` naming it after ``timeout`` seconds (default
  ``$XCODEC2_JAX_PEER_TIMEOUT``, else ``DEFAULT_TIMEOUT_SECONDS``). JAX's own heartbeat (100 s by default)
  usually ends such a process sooner.

Rounds are numbered per process, so every process must call :func:`allgather` the same number of times in the
same order. A process deletes its value of round ``n - 1`` once
round ``n`` is complete (every peer has read it by then), so the store stays small.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import sys
import time
from collections.abc import Iterator

import jax
import numpy as np

from .errors import ConfigError, Xcodec2Error

TIMEOUT_ENV = "XCODEC2_JAX_PEER_TIMEOUT"
# How long a process waits for its peers in one exchange. Peers run the same steps, so the wait is what one
# peer lags behind another: host work between two device steps, or listing a large corpus at the start.
DEFAULT_TIMEOUT_SECONDS = 600.0
# How often a waiting process looks for a failure flag: bounds how long a failure takes to stop every peer.
POLL_SECONDS = 0.5
_PREFIX = "xcodec2_jax/"
_FAILED = _PREFIX + "failed/"
_ROUND = _PREFIX + "allgather/"
_rounds = itertools.count()
_exit_hook_registered = False


class PeerError(Xcodec2Error, RuntimeError):
    """Another process of a ``jax.distributed`` run failed, vanished, or broke the exchange protocol."""


class PeerFailedError(PeerError):
    """Another process reported a failure; the message names it (``process P of N failed: ...``)."""


class PeerTimeoutError(PeerError):
    """Another process did not reach an exchange within the timeout."""


def _client():
    """The distributed runtime client of ``jax.distributed.initialize()``, or None in a single-process run.

    JAX has no public accessor; ``global_state.client`` is what JAX's own array serialization and Orbax use.
    """
    global _exit_hook_registered
    if jax.process_count() == 1:
        return None
    from jax._src import distributed

    if not _exit_hook_registered:  # registered after JAX's shutdown hook, so it runs before it
        atexit.register(_publish_exit)
        _exit_hook_registered = True
    return distributed.global_state.client


def timeout_seconds() -> float:
    """``$XCODEC2_JAX_PEER_TIMEOUT`` in seconds, else ``DEFAULT_TIMEOUT_SECONDS``."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_SECONDS
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} must be a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} must be positive")
    return value


def allgather(value: np.ndarray, timeout: float | None = None) -> np.ndarray:
    """Every process's ``value`` (same shape and dtype everywhere), stacked: (process_count, *value.shape).

    Raises :class:`PeerFailedError` when a peer reports a failure while this process waits, and
    :class:`PeerTimeoutError` when a peer does not arrive within ``timeout`` seconds (default
    :func:`timeout_seconds`). A single process gets ``value[None]`` without any exchange.
    """
    value = np.ascontiguousarray(value)
    client = _client()
    if client is None:
        return value[None]
    me, count = jax.process_index(), jax.process_count()
    number = next(_rounds)
    prefix = f"{_ROUND}{number}/"
    client.key_value_set_bytes(f"{prefix}{me}", value.tobytes())
    received = _wait_for_all(client, prefix, count, number, timeout or timeout_seconds())
    if number:
        client.key_value_delete(f"{_ROUND}{number - 1}/{me}")
    for process, data in received.items():
        if len(data) != value.nbytes:
            raise PeerError(f"process {process} sent {len(data)} bytes in exchange #{number}, process {me} "
                            f"{value.nbytes}: the processes are not running the same code")
    return np.stack([np.frombuffer(received[p], value.dtype).reshape(value.shape) for p in range(count)])


def barrier(timeout: float | None = None) -> None:
    """Wait until every process gets here, with :func:`allgather`'s failure detection and deadline."""
    allgather(np.zeros((), np.int8), timeout)


def _wait_for_all(client, prefix: str, count: int, number: int, timeout: float) -> dict[int, bytes]:
    """process -> bytes once every process has published under ``prefix``; raises on a failure or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        received = {int(key.rsplit("/", 1)[1]): data for key, data in client.key_value_dir_get_bytes(prefix)}
        raise_if_failed(client)  # also when every value is in: a peer may have failed after publishing its own
        missing = [p for p in range(count) if p not in received]
        if not missing:
            return received
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerTimeoutError(
                f"process(es) {missing} of {count} did not reach exchange #{number} within {timeout:g} s "
                f"(process {jax.process_index()} waited); raise {TIMEOUT_ENV} if they are only slow")
        try:
            client.blocking_key_value_get_bytes(f"{prefix}{missing[0]}", max(1, int(1000 * min(POLL_SECONDS,
                                                                                          remaining))))
        except jax.errors.JaxRuntimeError as err:
            if "DEADLINE_EXCEEDED" not in str(err):  # not a poll's timeout: the coordination service is gone
                raise PeerError(f"process {jax.process_index()} lost the jax.distributed coordination service "
                                f"(process 0 ended?) in exchange #{number}: {err}") from err


def raise_if_failed(client=None) -> None:
    """Raise :class:`PeerFailedError` if another process has published a failure."""
    client = client or _client()
    if client is None:
        return
    me, count = jax.process_index(), jax.process_count()
    failures = sorted((int(key.rsplit("/", 1)[1]), message) for key, message in client.key_value_dir_get(_FAILED))
    others = [(process, message) for process, message in failures if process != me]
    if others:
        process, message = others[0]
        raise PeerFailedError(f"process {process} of {count} failed: {message} (process {me} stops too)")


def report_failure(message: str, overwrite: bool = True) -> None:
    """Publish this process's failure so that every peer stops at its next exchange (best effort)."""
    client = _client()
    if client is None:
        return
    with contextlib.suppress(Exception):  # the service may be gone, or (overwrite=False) a failure published
        client.key_value_set(f"{_FAILED}{jax.process_index()}", message, allow_overwrite=overwrite)


def _publish_exit() -> None:
    """At exit: peers still waiting for this process in an exchange stop now. A peer that has passed the last
    exchange never reads it, so a normal exit costs nothing."""
    error = getattr(sys, "last_value", None)  # set by the interpreter for an uncaught exception
    report_failure(f"exited ({type(error).__name__}: {error})" if error else "exited", overwrite=False)


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """Run a block whose failure must stop every process: an exception (any, also ``KeyboardInterrupt``) is
    published with :func:`report_failure` and re-raised. A :class:`PeerFailedError` is not re-published: the
    process that failed first is the one named everywhere. A :class:`PeerTimeoutError` is, so that the
    other live processes stop now rather than at their own deadline."""
    try:
        yield
    except PeerFailedError:
        raise
    except BaseException as err:
        report_failure(f"{type(err).__name__}: {err}")
        raise


__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "POLL_SECONDS",
    "TIMEOUT_ENV",
    "PeerError",
    "PeerFailedError",
    "PeerTimeoutError",
    "allgather",
    "barrier",
    "fail_together",
    "raise_if_failed",
    "report_failure",
    "timeout_seconds",
]
