"""Other projects' test suites run against PyREPL3 (see run_peers.py). A package, so
that its conftest.py is ``peers.conftest`` and never takes the name ``conftest`` from
tests/conftest.py."""
