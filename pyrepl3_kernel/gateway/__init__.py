"""Jupyter messaging in front of native workers."""

from .kernel import JupyterGateway

__all__ = ["JupyterGateway"]
