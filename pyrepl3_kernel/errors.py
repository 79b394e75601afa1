"""The root of the project's exceptions: :class:`Pyrepl3Error`.

Every exception class pyrepl3_kernel defines derives from it; each stays in
the module that raises it:

- ``session``: ``WorkerStartError`` (``WarmupError`` in ``session.pool``),
  ``WorkerDeadError``, ``PoolExhausted``; importable from ``pyrepl3_kernel``;
- ``protocol.codec``: ``ProtocolError`` (its ``code`` is a
  ``ProtocolErrorCode``);
- ``daemon.client``: ``DaemonError`` (its ``code`` is the daemon's error
  code), ``DaemonUnavailable``; ``daemon.server``: ``DaemonAlreadyRunning``;
- ``worker.checkpoint.errors``: ``CheckpointError``, ``CheckpointExistsError``;
  ``worker.pickling``: ``NotRestorable``;
- ``server.bridge``: ``KernelGone``, ``BridgeError``.

This module imports nothing, so the sans-I/O ``protocol`` package and the
worker can depend on it.
"""

from __future__ import annotations


class Pyrepl3Error(Exception):
    """An error pyrepl3_kernel raised on purpose.

    What a caller may rely on: ``except Pyrepl3Error`` catches every error
    the project raises by design, and nothing raised by Python or by a
    library, which keep their own types. ``str(exc)`` says what happened and,
    where the user can act, what to do. Class names are stable: they travel
    as ``ename`` in error replies and choose the HTTP status of a REST error,
    so matching on a class or its name keeps working. An error that was a
    ``RuntimeError`` or ``ConnectionError`` before this base existed still
    is one.
    """
