"""The records a `RunRecorder` queues: a batch of metrics and tags, or files to upload together."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from mlflow.entities import LoggedModel, Metric, RunTag
from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH


@dataclasses.dataclass
class Queued:
    """When a record was made, i.e. queued (`time.monotonic()`): how long it waited before delivery."""

    queued_at: float = dataclasses.field(default_factory=time.monotonic, kw_only=True, compare=False)


@dataclasses.dataclass
class Batch(Queued):
    """Metrics and tags that travel in one `log_batch` call, within MLflow's limits for one request."""

    metrics: list[Metric] = dataclasses.field(default_factory=list)
    tags: list[RunTag] = dataclasses.field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.metrics) + len(self.tags)

    def can_take(self, metrics: int, tags: int) -> bool:
        """Whether `metrics` more metrics and `tags` more tags keep this batch within MLflow's limits."""
        return (
            len(self.metrics) + metrics <= MAX_METRICS_PER_BATCH
            and len(self.tags) + tags <= MAX_PARAMS_TAGS_PER_BATCH
            and self.size + metrics + tags <= MAX_ENTITIES_PER_BATCH
        )

    def split(self) -> list[Batch]:
        return ([Batch(metrics=[metric], queued_at=self.queued_at) for metric in self.metrics]
                + [Batch(tags=[tag], queued_at=self.queued_at) for tag in self.tags])

    def describe(self) -> str:
        names = sorted({m.key for m in self.metrics} | {t.key for t in self.tags})
        return "metrics/tags " + ", ".join(names)


@dataclasses.dataclass
class StagedFile:
    """A file to upload as `artifact_path`, staged at `staged_path` (or written there first by `writer`)."""

    artifact_path: str
    staged_path: Path
    writer: Callable[[Path], None] | None = None  # writes the file in the background, before upload

    @property
    def artifact_dir(self) -> str | None:
        return self.artifact_path.rpartition("/")[0] or None


@dataclasses.dataclass
class FileRecord(Queued):
    """Files uploaded as one unit, in their order, one right after the other (e.g. a checkpoint and
    its description), then `tags` in one `log_batch` call: a tag pointing at the files is written only
    once all of them are stored. A newer unit of the same artifact paths replaces a waiting one as a
    whole, never one of its files; one of the same `slot` and other paths (the next best checkpoint)
    does only while the store is behind (see `RunRecorder`). All are staged in one directory of
    their own."""

    files: list[StagedFile]
    tags: list[RunTag] = dataclasses.field(default_factory=list)
    slot: str | None = None

    @property
    def artifact_paths(self) -> tuple[str, ...]:
        return tuple(file.artifact_path for file in self.files)

    @property
    def replaces(self) -> str | tuple[str, ...]:
        """What a newer unit must share with a waiting one to replace it while the store is behind."""
        return self.slot if self.slot is not None else self.artifact_paths

    @property
    def version_of(self) -> tuple[str, ...]:
        """What a newer unit must share with a waiting one to replace it at any time: its newer version."""
        return self.artifact_paths

    @property
    def staging_dir(self) -> Path:
        return self.files[0].staged_path.parent

    def describe(self) -> str:
        text = "artifact " + " + ".join(self.artifact_paths)
        return text + (" then tags " + ", ".join(tag.key for tag in self.tags) if self.tags else "")


@dataclasses.dataclass
class ModelRecord(Queued):
    """An MLflow model logged as a LoggedModel of the run (a checkpoint): created in the store as
    `name` with `tags`, its directory written by `writer(directory, logged_model)` on the background
    thread, uploaded, finalized READY and made an output of the run at `step`. `model_id` is kept
    once the store has created it, so that a retry reuses it and a later `ModelMetricsLink` can name
    it. A newer record of the same `slot` replaces a waiting one while the store is behind (see
    `RunRecorder`), and one of the same step at any time. With `reuse_existing`, a READY model
    of this name and step that the run already has is taken instead (a resumed training's restored best);
    with `copy_run_params`, the run's params are the model's."""

    name: str
    step: int
    staged_dir: Path
    writer: Callable[[Path, LoggedModel], None]
    tags: dict[str, str]
    slot: str
    reuse_existing: bool = False
    copy_run_params: bool = False  # the run's params as the model's, as `mlflow.models.Model.log` does
    model_id: str | None = None
    done: set[str] = dataclasses.field(default_factory=set)  # the delivery steps already through

    @property
    def replaces(self) -> str:
        return self.slot

    @property
    def version_of(self) -> tuple[str, int]:
        return self.slot, self.step

    @property
    def staging_dir(self) -> Path:
        return self.staged_dir.parent

    def describe(self) -> str:
        return f"logged model {self.name} (step {self.step})"


@dataclasses.dataclass
class ModelMetricsLink(Queued):
    """Links the run's metrics `metrics` (as they were queued: same value, step and timestamp) to
    `model`, as MLflow's own `log_model(step=...)` does: the values are logged again with the model's
    id (MLflow keeps one value per key, step and timestamp in the run), from what the client already
    holds, with no read of the store. Nothing when the model was never created (replaced by a newer
    one while it waited) or was taken over from an earlier process (linked then)."""

    model: ModelRecord
    metrics: list[Metric]

    def describe(self) -> str:
        return f"metrics of logged model {self.model.name} (step {self.model.step})"


@dataclasses.dataclass
class ModelDeletion(Queued):
    """Deletes `model`'s LoggedModel (MLflow's soft delete: `mlflow gc` removes its files), once it
    is created; nothing when it never was."""

    model: ModelRecord

    def describe(self) -> str:
        return f"deletion of logged model {self.model.name} (step {self.model.step})"
