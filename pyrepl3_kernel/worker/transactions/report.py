"""What a rollback did, as the execute reply's payload and as the report
on the cell's stderr."""

from __future__ import annotations

from typing import Any

PAYLOAD_SOURCE = "pyrepl3.rollback"

#: What no policy undoes, as the report words it.
EXTERNAL_EFFECTS = "files written, network and subprocess effects"


def _names(names: list[str], limit: int = 20) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" and {len(names) - limit} more"


class Outcome:
    """What a rollback did."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.removed: list[str] = []
        self.restored: list[str] = []
        self.in_place: list[str] = []
        self.rebound: list[str] = []
        self.not_covered: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.seconds = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.restored or self.in_place or self.rebound or self.failed)

    def not_undone(self) -> list[str]:
        items = [EXTERNAL_EFFECTS]
        if self.policy == "bindings":
            items.insert(0, "changes to objects in place")
        else:
            items.append("module state and objects not reachable from the cell's names")
        return items

    def as_payload(self) -> dict[str, Any]:
        return {
            "source": PAYLOAD_SOURCE,
            "policy": self.policy,
            "removed": self.removed,
            "restored": self.restored,
            "restored_in_place": self.in_place,
            "rebound": self.rebound,
            "not_covered": self.not_covered,
            "failed": self.failed,
            "not_undone": self.not_undone(),
            "seconds": round(self.seconds, 6),
        }

    def describe(self) -> str:
        parts = []
        if self.removed:
            parts.append(f"removed: {_names(self.removed)}")
        if self.restored:
            parts.append(f"restored: {_names(self.restored)}")
        if self.in_place:
            parts.append(f"restored in place: {_names(self.in_place)}")
        if self.rebound:
            parts.append(f"rebound: {_names(self.rebound)}")
        head = (
            f"pyrepl3: cell failed; rolled back ({self.policy}): {'; '.join(parts)}"
            if parts
            else f"pyrepl3: cell failed; nothing to roll back ({self.policy})"
        )
        lines = [head]
        if self.rebound:
            lines.append(
                "  rebound names hold the old value; other references still see the change"
            )
        if self.failed:
            lines.append(
                "  could not restore: "
                + "; ".join(f"{k} ({v})" for k, v in list(self.failed.items())[:6])
            )
        if self.not_covered:
            lines.append(
                "  not covered: "
                + "; ".join(f"{k} ({v})" for k, v in list(self.not_covered.items())[:6])
                + (f" and {len(self.not_covered) - 6} more" if len(self.not_covered) > 6 else "")
            )
        lines.append(f"  not undone: {', '.join(self.not_undone())}")
        return "\n".join(lines)
