"""The seed's import path for the native session:
``from pyrepl3_kernel.session.manager import Session`` (the seed wrote
``from src.session.manager import Session``)."""

from . import Session

__all__ = ["Session"]
