"""Transactions: what a failing cell did to the session is rolled back."""

from .snapshot import (
    PAYLOAD_SOURCE,
    Snapshot,
    TransactionManager,
    parse_size,
    strip_transaction_line,
)

__all__ = [
    "PAYLOAD_SOURCE",
    "Snapshot",
    "TransactionManager",
    "parse_size",
    "strip_transaction_line",
]
