"""The records a `RunRecorder` queues: a batch of metrics and tags, or a file to upload."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from mlflow.entities import Metric, RunTag

# MLflow's log_batch limits.
MAX_METRICS_PER_BATCH = 1000
MAX_TAGS_PER_BATCH = 100


@dataclasses.dataclass
class Batch:
    """Metrics and tags that travel in one `log_batch` call."""

    metrics: list[Metric] = dataclasses.field(default_factory=list)
    tags: list[RunTag] = dataclasses.field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.metrics) + len(self.tags)

    def split(self) -> list[Batch]:
        return [Batch(metrics=[metric]) for metric in self.metrics] + [Batch(tags=[tag]) for tag in self.tags]

    def describe(self) -> str:
        names = sorted({m.key for m in self.metrics} | {t.key for t in self.tags})
        return "metrics/tags " + ", ".join(names)


@dataclasses.dataclass
class FileRecord:
    """A file to upload as `artifact_path`, staged at `staged_path` (or written there first by `writer`)."""

    artifact_path: str
    staged_path: Path
    writer: Callable[[Path], None] | None = None  # writes the file in the background, before upload

    @property
    def artifact_dir(self) -> str | None:
        return self.artifact_path.rpartition("/")[0] or None

    def describe(self) -> str:
        return f"artifact {self.artifact_path}"
