"""Fault injection: every way a worker can die, and what a client sees."""
