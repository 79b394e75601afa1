"""The namespace as the debugger's variables panel shows it while no
thread is stopped (``inspectVariables``, ``variables``): pydevd's own
variable presentation over a frame-shaped view of the namespace, as
ipykernel's ``VariableExplorer``. Imports pydevd (through debugpy) when made.
"""

from __future__ import annotations

import os
from typing import Any

from . import cellnames


def import_debugpy_server() -> Any:
    """``debugpy.server.api`` (it puts debugpy's vendored pydevd on sys.path),
    imported with pydevd's check for frozen modules off: its warning ("frozen
    modules may make the debugger miss breakpoints", about the standard
    library's frozen modules) would otherwise land in a user's cell output.
    ipykernel's kernelspec passes -Xfrozen_modules=off instead, which slows
    every start; the variable is not left in the environment of user code."""
    import importlib

    name = "PYDEVD_DISABLE_FILE_VALIDATION"
    added = name not in os.environ
    if added:
        os.environ[name] = "1"
    try:
        return importlib.import_module("debugpy.server.api")
    finally:
        if added:
            os.environ.pop(name, None)


class VariableExplorer:
    """The namespace as pydevd presents variables (for the variables panel
    while no thread is stopped), as ipykernel's explorer."""

    def __init__(self, shell: Any) -> None:
        import_debugpy_server()  # first: it puts pydevd on sys.path
        from _pydevd_bundle import pydevd_frame_utils
        from _pydevd_bundle.pydevd_api import PyDevdAPI
        from _pydevd_bundle.pydevd_suspended_frames import SuspendedFramesManager, _FramesTracker

        class _PyDB:
            variable_presentation = PyDevdAPI.VariablePresentation()

        self.manager = SuspendedFramesManager()
        self.tracker = _FramesTracker(self.manager, _PyDB())
        ns = shell.user_ns
        self.frame = _NamespaceFrame(ns, cellnames.cell_file_name("sys._getframe()"))
        self.tracker.track("thread1", pydevd_frame_utils.create_frames_list_from_frame(self.frame))

    def untrack_all(self) -> None:
        self.tracker.untrack_all()

    def children(self, reference: Any) -> list[dict[str, Any]]:
        variables = self.manager.get_variable(reference or id(self.frame))
        return [v.get_var_data() for v in variables.get_children_variables()]


class _NamespaceCode:
    def __init__(self, filename: str) -> None:
        self.co_filename = filename
        self.co_name = "<module>"


class _NamespaceFrame:
    """A frame-shaped view of the namespace, for pydevd's tracker."""

    def __init__(self, ns: dict[str, Any], filename: str) -> None:
        self.f_code = _NamespaceCode(filename)
        self.f_globals = ns
        self.f_locals = ns
        self.f_back = None
        self.f_lineno = 0
