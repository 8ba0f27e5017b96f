"""The run report: what an ingestion run encoded, skipped and refused, and how fast."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stac_rscbir.fsutil import atomic_write_text


@dataclass
class ItemError:
    """One item that was not encoded, and why (``kind`` is machine-readable)."""

    item_id: str
    collection: str | None
    kind: str
    message: str


@dataclass
class RunReport:
    """Counts, per-item errors and stage timings of one ingestion run (or one partition)."""

    model: str = ""
    model_version: str = ""
    items_seen: int = 0
    items_encoded: int = 0
    items_skipped: int = 0  # already encoded by this model version
    chips_encoded: int = 0
    chips_dropped: int = 0  # mostly nodata or cloud
    errors: list[ItemError] = field(default_factory=list)
    # stage seconds; read and preprocess are summed over the reader threads, which overlap
    # the model: wait_for_readers is how long the model side sat idle waiting for pixels
    seconds: dict[str, float] = field(
        default_factory=lambda: {
            "read": 0.0,
            "preprocess": 0.0,
            "model": 0.0,
            "write": 0.0,
            "wait_for_readers": 0.0,
        }
    )
    wall_seconds: float = 0.0
    device: str = "cpu"

    def add_time(self, stage: str, seconds: float) -> None:
        """Accumulate time spent in ``stage`` (read, preprocess, model, write)."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def merge(self, other: RunReport) -> None:
        """Fold a partition's report into this one (Dask runs)."""
        for name in ("items_seen", "items_encoded", "items_skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.chips_encoded += other.chips_encoded
        self.chips_dropped += other.chips_dropped
        self.errors.extend(other.errors)
        for stage, s in other.seconds.items():
            self.add_time(stage, s)
        self.model, self.model_version = other.model, other.model_version
        self.device = other.device

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary with rates; errors grouped by kind as well as listed."""
        d = asdict(self)
        by_kind: dict[str, int] = {}
        for e in self.errors:
            by_kind[e.kind] = by_kind.get(e.kind, 0) + 1
        d["errors_by_kind"] = by_kind
        wall = self.wall_seconds or float("nan")
        d["items_per_second"] = round(self.items_encoded / wall, 3) if self.wall_seconds else None
        d["chips_per_second"] = round(self.chips_encoded / wall, 3) if self.wall_seconds else None
        return d

    def write(self, path: Path) -> None:
        """Write the report as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
