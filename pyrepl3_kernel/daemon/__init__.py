"""The manager daemon: one process per user hosting many kernels with warm workers.

- ``client.py``: the wire contract (frames, protocol version, paths) and the
  blocking :class:`~.client.DaemonClient` the provisioner and the CLI use;
  it imports nothing else of the package, so clients stay light.
- ``server.py``: :class:`~.server.ManagerDaemon`, run by ``pyrepl3-kernel
  serve``: the socket and lock, each request checked and served.
- ``leases.py``: the kernels it hands out (:class:`~.leases.Lease`) and the
  warm pools their workers come from.
- ``lifetime.py``: when a daemon that clients can still reach exits (its
  starter is gone, or it was idle).

Nothing is imported here. The daemon builds on ``gateway`` and ``session``;
neither of them imports this package.
"""
