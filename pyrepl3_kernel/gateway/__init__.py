"""Jupyter messaging in front of native workers.

Nothing is imported here: the standalone kernel starts its worker before it
loads zmq and jupyter_client (see ``standalone.py``).
"""
