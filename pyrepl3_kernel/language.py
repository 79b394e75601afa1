"""What a Python worker says about its language (Jupyter's language_info)."""

from __future__ import annotations

import sys
from typing import Any


def language_info() -> dict[str, Any]:
    """Jupyter language_info of this interpreter, as ipykernel reports it."""
    return {
        "name": "python",
        "version": sys.version.split()[0],
        "mimetype": "text/x-python",
        "codemirror_mode": {"name": "ipython", "version": 3},
        "pygments_lexer": "ipython3",
        "nbconvert_exporter": "python",
        "file_extension": ".py",
    }
