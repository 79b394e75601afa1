"""The manager daemon: one process per user hosting many kernels with warm workers.

- ``client.py``: the wire contract (frames, protocol version, paths) and the
  blocking :class:`~.client.DaemonClient` the provisioner and the CLI use;
  it imports nothing else of the package, so clients stay light.
- ``server.py``: :class:`~.server.ManagerDaemon`, run by ``pyrepl3-kernel serve``.

Nothing is imported here. The daemon builds on ``gateway`` and ``session``;
neither of them imports this package.
"""
