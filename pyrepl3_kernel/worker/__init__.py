"""The worker subprocess. Only its own entry point imports this package."""
