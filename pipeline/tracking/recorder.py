"""Ordered, asynchronous delivery of a run's records to the MLflow tracking store.

The training thread never waits on the tracking store: `RunRecorder` queues metrics, tags and files
and one background thread delivers them in the order they were queued. Consecutive metrics and tags
travel in one `log_batch` call, within MLflow's limits for one request. A record that fails for a
transient reason (server unreachable, 5xx, a locked SQLite file) is retried, in order, until it goes
through; one rejected for good (a 4xx answer) is kept as a failure. `flush()` waits for delivery and
raises `RecordingError` naming what could not be recorded, so nothing is ever dropped silently.

A store that answers, but more slowly than records are queued, is behind: records wait in order as in
an outage, and a newer best checkpoint replaces one still waiting (`log_together`'s and `log_model`'s
slot), which a store that keeps up gets. Once a record has waited `behind_after` seconds the log says
so, once, and when the queue is empty again the recorder says it caught up and records how long a
record waited at most in the run's tag `recording_max_lag_seconds` (also after an outage).

A local disk that cannot take a staged file (full, read-only) is not an outage: delivery stops at
that record (what came before stays delivered, what comes after is not sent, so an epoch's metrics
never arrive without its state), and the next call from the training thread, `flush` and `close`
raise `LocalStorageError` at once.

Retries are safe: metric records carry the timestamp of the moment they were queued, MLflow
de-duplicates identical metrics, and tags and artifacts overwrite themselves.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.errors import LocalStorageError, RecordingError, first_line
from pipeline.tracking.process_group import wait_at_barrier
from pipeline.tracking.records import Batch, FileRecord, ModelDeletion, ModelMetricsLink, ModelRecord, StagedFile
from pipeline.tracking.retry import (
    STORE_BACKOFF,
    Backoff,
    is_local_storage_error,
    is_transient,
    local_storage_error,
)

logger = logging.getLogger(__name__)

# Tests only: a directory; between two files of a unit (a checkpoint and its description) the recorder
# touches `<n>.waiting` there (n = 1, 2, ... counts such units) and waits until `<n>.go` exists, so
# that a test can kill the process at that exact moment.
BARRIER_VARIABLE = "MNIST_PIPELINE_RECORDER_BARRIER"
BARRIER_SECONDS = 300.0
# Seconds a record may wait for the store before the recorder says the store is behind the training.
BEHIND_SECONDS = 30.0


class RunRecorder:
    """Sends one run's metrics, tags and files to MLflow from a background thread, in order.

    Args:
        client: the MLflow client of the tracking store.
        run_id: the run to record into.
        staging_dir: a private directory; files are copied here when queued, so the caller may
            overwrite or delete its own copy at once.
        backoff: the pauses between attempts while the store is unreachable.
        abandon_timeout: when the `with` block ends with an error, how long to keep delivering.
        rescue_dir: where what is still undelivered then goes (see `export_pending`), so that the
            last good checkpoint is kept whatever the error; None keeps nothing.
        behind_after: seconds a record may wait before the store counts as behind (see the module).

    Attributes:
        max_lag: the longest a delivered record waited between being queued and being through, in
            seconds (what `recording_max_lag_seconds` records; that tag's own wait does not count).
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        staging_dir: Path,
        backoff: Backoff = STORE_BACKOFF,
        abandon_timeout: float = 30.0,
        rescue_dir: Path | None = None,
        behind_after: float = BEHIND_SECONDS,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self._staging_dir = Path(staging_dir)
        self._staging_dir.mkdir(parents=True, exist_ok=True)
        self._backoff = backoff
        self.abandon_timeout = abandon_timeout
        self.rescue_dir = rescue_dir
        self.behind_after = behind_after
        self.max_lag = 0.0
        self._behind_since: float | None = None  # when the oldest record of a backlog was queued
        self._lag_report: Batch | None = None  # the tag saying a backlog's longest wait, queued as it ends
        self._local_error: LocalStorageError | None = None
        self._pending: collections.deque[Record] = collections.deque()
        self._metrics: dict[tuple[str, int], Metric] = {}  # (key, step) -> the value queued or found stored
        self._experiment_id: str | None = None
        self._delivering = False  # the head of the queue is being sent
        self._failures: list[str] = []
        self._outage_since: float | None = None
        self._closed = False
        self._stop_retrying = threading.Event()
        self._sequence = itertools.count()
        self._units = itertools.count(1)  # units of several files, for the test barrier
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._deliver_forever, name="mlflow-recorder", daemon=True)
        self._thread.start()

    # -- queueing (called from the training thread; never blocks on the store) ----------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        records = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        self._enqueue_batch(metrics=records)
        self.remember_metrics(records)

    def remember_metrics(self, metrics: list[Metric]) -> None:
        """Keeps `metrics` (queued here, or found in the store by a resumed training) as the values
        `link_model_metrics` links: the newest per key and step."""
        self._metrics.update({(metric.key, metric.step): metric for metric in metrics})

    def set_tags(self, tags: Mapping[str, object]) -> None:
        self._enqueue_batch(tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_file(self, local_path: Path, artifact_dir: str | None = None) -> None:
        """Queues a snapshot of `local_path` for upload as `artifact_dir/<file name>`."""
        self._check_local_disk()
        name = Path(local_path).name
        staged = self._stage_dir() / name
        shutil.copyfile(local_path, staged)
        self._enqueue_file(FileRecord([StagedFile(f"{artifact_dir}/{name}" if artifact_dir else name, staged)]))

    def log_json(self, obj: Any, artifact_file: str) -> None:
        self._check_local_disk()
        staged = self._stage_dir() / artifact_file.rpartition("/")[2]
        staged.write_text(json_text(obj))
        self._enqueue_file(FileRecord([StagedFile(artifact_file, staged)]))

    def log_written(self, writer: Callable[[Path], None], artifact_file: str) -> None:
        """Queues `artifact_file`, to be written by `writer(path)` on the background thread (for
        large files whose content the caller has already snapshotted in memory)."""
        self._check_local_disk()
        staged = self._stage_dir() / artifact_file.rpartition("/")[2]
        self._enqueue_file(FileRecord([StagedFile(artifact_file, staged, writer)]))

    def log_together(
        self, artifact_dir: str, contents: Mapping[str, bytes], tags: Mapping[str, object] | None = None,
        slot: str | None = None,
    ) -> None:
        """Queues files that must always describe the same thing (a checkpoint and its description):
        uploaded into `artifact_dir` in this order, one right after the other, then `tags` in one
        call (a pointer to the files moves only once they are all stored). A newer set of the same
        paths replaces a waiting one as a whole, and so does one of the same `slot` while the store is
        behind (`_enqueue_file`). The bytes are written to disk on the background thread."""
        self._check_local_disk()
        directory = self._stage_dir()
        self._enqueue_file(FileRecord(
            [StagedFile(f"{artifact_dir}/{name}", directory / name, _bytes_writer(data))
             for name, data in contents.items()],
            tags=[RunTag(key, str(value)) for key, value in (tags or {}).items()],
            slot=slot,
        ))

    def log_model(
        self, name: str, step: int, writer: Callable[[Path, LoggedModel], None], tags: Mapping[str, object],
        slot: str, reuse_existing: bool = False, copy_run_params: bool = False,
    ) -> ModelRecord:
        """Queues an MLflow model as a LoggedModel of the run, output of the run at `step` (see
        `ModelRecord`); `writer(directory, logged_model)` writes its files on the background thread.
        Returns the record, for `link_model_metrics` and `delete_model`."""
        self._check_local_disk()
        record = ModelRecord(name, step, self._stage_dir() / name, writer, {k: str(v) for k, v in tags.items()},
                             slot, reuse_existing, copy_run_params)
        self._enqueue_file(record)
        return record

    def link_model_metrics(self, model: ModelRecord, keys: tuple[str, ...]) -> None:
        """Queues the link of the run's metrics `keys` at the model's step to the model, from the
        values queued (or remembered) here: no read of the store. Queue it after those metrics."""
        self._check_local_disk()
        metrics = [self._metrics[key, model.step] for key in keys if (key, model.step) in self._metrics]
        self._enqueue(ModelMetricsLink(model, metrics))

    def delete_model(self, model: ModelRecord) -> None:
        """Queues the deletion of `model`'s LoggedModel (after its creation, in queue order)."""
        self._check_local_disk()
        self._enqueue(ModelDeletion(model))

    # -- waiting ---------------------------------------------------------------------------

    @property
    def pending(self) -> list[str]:
        """What is queued and not yet delivered, in order."""
        with self._condition:
            return [record.describe() for record in self._pending]

    @property
    def in_outage(self) -> bool:
        """True while the store is unreachable (the last attempt failed for a transient reason)."""
        return self._outage_since is not None

    def export_pending(self, directory: Path) -> list[str]:
        """Writes what is still undelivered to `directory`: files under `artifacts/` at their
        artifact paths, metrics and tags in `pending_records.json`. Returns their descriptions."""
        with self._condition:
            pending = list(self._pending)
        records: list[dict[str, object]] = []
        for record in pending:
            if isinstance(record, FileRecord):
                for file in record.files:
                    target = directory / "artifacts" / file.artifact_path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if file.writer is not None:
                        file.writer(target)
                    else:
                        shutil.copyfile(file.staged_path, target)
                records += [{"tag": t.key, "value": t.value} for t in record.tags]
            elif isinstance(record, Batch):  # a checkpoint's logged model: its file is in the unit before it
                records += [{"metric": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}
                            for m in record.metrics]
                records += [{"tag": t.key, "value": t.value} for t in record.tags]
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "pending_records.json").write_text(json.dumps(records, indent=1) + "\n")
        return [record.describe() for record in pending]

    def wait_until_delivered(self, timeout: float | None = None) -> bool:
        """Waits until the queue is empty (delivered or rejected); False when the timeout passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while self._pending and self._local_error is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True

    def flush(self, timeout: float | None = None) -> None:
        """Waits until everything queued so far is delivered.

        Raises:
            LocalStorageError: a file could not be staged on the local disk (at once, no waiting).
            RecordingError: when the timeout passes with records still pending, or when a record
                was rejected by the store.
        """
        self.wait_until_delivered(timeout)
        self._check_local_disk()
        with self._condition:
            undelivered = [record.describe() for record in self._pending]
            failures = list(self._failures)
        if undelivered:
            raise RecordingError(
                f"tracking store unreachable; not recorded: {_summarize(undelivered)}"
            )
        if failures:
            raise RecordingError(f"tracking store rejected: {_summarize(failures)}")

    def close(self, timeout: float | None = None) -> None:
        """Flushes (see `flush`) and stops the background thread."""
        try:
            self.flush(timeout)
        finally:
            with self._condition:
                self._closed = True
                self._stop_retrying.set()
                self._condition.notify_all()

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        """On an error, still delivers what was queued (completed epochs stay recorded), waiting at
        most `abandon_timeout` seconds and never raising over the error; `close()` was not reached.
        What is still undelivered then (the last good checkpoint among it) goes to `rescue_dir`."""
        if exc_type is None or self._closed:
            return
        try:
            self.close(timeout=0 if self._local_error else self.abandon_timeout)
        except (RecordingError, LocalStorageError) as error:
            logger.warning("Not all records reached the tracking store: %s", error)
            self.rescue_pending()

    def rescue_pending(self) -> Path | None:
        """Writes what is still undelivered to `rescue_dir`/unsent (see `export_pending`) and says
        where in the log; returns that directory, or None when nothing was pending or kept."""
        if not self.pending or self.rescue_dir is None:
            return None
        directory = self.rescue_dir / "unsent"
        try:
            kept = self.export_pending(directory)
        except OSError as error:
            logger.error("The undelivered records could not be kept in %s either: %s", directory, first_line(error))
            return None
        logger.warning("Kept locally in %s: %s", directory, _summarize(kept))
        return directory

    # -- internals -------------------------------------------------------------------------

    def _check_local_disk(self) -> None:
        """Raises the local disk error the background thread met, on the caller's thread."""
        if self._local_error is not None:
            raise LocalStorageError(str(self._local_error))

    def _stage_dir(self) -> Path:
        directory = self._staging_dir / f"{next(self._sequence):06d}"
        directory.mkdir()
        return directory

    def _enqueue_batch(self, metrics: list[Metric] | None = None, tags: list[RunTag] | None = None) -> None:
        self._check_local_disk()
        metrics, tags = list(metrics or []), list(tags or [])
        with self._condition:
            tail = self._pending[-1] if self._pending else None
            if self._delivering and len(self._pending) == 1:
                tail = None  # being sent: a batch in flight never grows
            if isinstance(tail, Batch) and tail.can_take(len(metrics), len(tags)):
                tail.metrics.extend(metrics)
                tail.tags.extend(tags)
                self._note_if_behind()
                return
        batch = Batch()
        for item in [*tags, *metrics]:  # tags first: a batch of one call's tags stays whole
            is_metric = isinstance(item, Metric)
            if not batch.can_take(int(is_metric), int(not is_metric)):
                self._enqueue(batch)
                batch = Batch()
            (batch.metrics if is_metric else batch.tags).append(item)
        self._enqueue(batch)

    def _enqueue_file(self, record: FileRecord | ModelRecord) -> None:
        """Queues files. A newer version of files still waiting in the queue (the same artifact
        paths) replaces the old ones in their place, as a whole, with their tags; while the store is
        behind or unreachable, so does a record of the same slot (the next best checkpoint replaces
        a waiting one): the queue stays bounded (one entry per artifact path or slot, however many
        epochs pass), what arrives is always the latest version, and files queued together are never
        separated. A store that keeps up gets every best. The entry being sent is never replaced: the
        newer version goes after it. After that send failed, both wait (the first to be sent again): the
        next version replaces them both, in the first one's place, so no older one is sent after it."""
        with self._condition:
            self._note_if_behind()
            behind = self._behind_since is not None or self._outage_since is not None
            older = [
                index for index, pending in enumerate(self._pending)
                if not (index == 0 and self._delivering)  # being sent: the newer version goes after it
                and type(pending) is type(record)
                and (pending.version_of == record.version_of or behind and pending.replaces == record.replaces)
            ]
            if older:
                replaced = [self._pending[index] for index in older]
                for index in reversed(older[1:]):
                    del self._pending[index]
                self._pending[older[0]] = record
                for pending in replaced:
                    shutil.rmtree(pending.staging_dir, ignore_errors=True)
                return
        self._enqueue(record)

    def _enqueue(self, record: Record) -> None:
        with self._condition:
            if self._closed:
                raise RuntimeError("RunRecorder is closed")
            self._pending.append(record)
            self._note_if_behind()
            self._condition.notify_all()

    def _note_if_behind(self) -> None:
        """Called as a record is queued, with the condition held: says once that the store is behind
        when the oldest waiting record has waited longer than `behind_after`."""
        if self._behind_since is not None or not self._pending:
            return
        waited = time.monotonic() - self._pending[0].queued_at
        if waited > self.behind_after:
            self._start_backlog(self._pending[0].queued_at, waited)

    def _start_backlog(self, since: float, waited: float) -> None:
        self._behind_since = since
        if self._outage_since is None:  # an outage has said so already
            logger.warning(
                "Tracking store is %.0f s behind this training (%d records waiting); training goes on, "
                "records are sent in order as it catches up", waited, len(self._pending),
            )

    def _note_delivered(self, record: Record) -> None:
        """Called once `record` left the queue, with the condition held. When a backlog has just been
        sent, says so and queues the tag recording the longest wait."""
        lag = time.monotonic() - record.queued_at
        if record is not self._lag_report:  # the report of the last backlog neither counts nor starts one
            self.max_lag = max(self.max_lag, lag)
            if self._behind_since is None and lag > self.behind_after:
                self._start_backlog(record.queued_at, lag)
        if self._pending or self._behind_since is None:
            return
        logger.info(
            "Tracking store caught up after %.0f s; a record waited up to %.0f s (tag %s)",
            time.monotonic() - self._behind_since, self.max_lag, names.TAG_RECORDING_MAX_LAG,
        )
        self._behind_since = None
        self._lag_report = Batch(tags=[RunTag(names.TAG_RECORDING_MAX_LAG, f"{self.max_lag:.1f}")])
        self._pending.append(self._lag_report)

    def _deliver_forever(self) -> None:
        """Delivers the head of the queue until it goes through; it leaves the queue only then, so
        `pending` and `export_pending` always include the record being sent."""
        pauses = self._backoff.pauses()
        while True:
            with self._condition:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if not self._pending:
                    return
                record = self._pending[0]
                self._delivering = True
            try:
                self._deliver(record)
            except Exception as error:  # noqa: BLE001 - every failure is retried or kept
                if is_local_storage_error(error):
                    self._note_local_error(error)
                    return
                if is_transient(error):
                    with self._condition:
                        self._delivering = False  # first: once `in_outage` says so, the record may be replaced
                        self._condition.notify_all()
                    self._note_outage(error)
                    if self._stop_retrying.wait(next(pauses)):
                        return
                    continue
                if isinstance(record, Batch) and record.size > 1:
                    # one bad value must not take its batch-mates down: retry them one by one
                    with self._condition:
                        self._pending.popleft()
                        self._pending.extendleft(reversed(record.split()))
                        self._delivering = False
                    continue
                logger.error("Tracking store rejected %s: %s", record.describe(), first_line(error))
                with self._condition:
                    self._failures.append(f"{record.describe()} ({first_line(error)})")
            pauses = self._backoff.pauses()
            self._note_recovery()  # delivered or rejected: either way the store answered
            with self._condition:
                self._pending.popleft()
                self._note_delivered(record)
                self._delivering = False
                self._condition.notify_all()
            if isinstance(record, (FileRecord, ModelRecord)):
                shutil.rmtree(record.staging_dir, ignore_errors=True)

    def _note_local_error(self, error: OSError) -> None:
        """A staged file could not be written (disk full, read-only): delivery stops here, and the
        training thread is told at its next call."""
        failure = local_storage_error(self._staging_dir, error)
        logger.error("%s", failure)
        with self._condition:
            self._local_error = failure
            self._delivering = False
            self._condition.notify_all()

    def _note_outage(self, error: BaseException) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning(
                "Tracking store unreachable (%s); training goes on, records are kept", first_line(error)
            )

    def _note_recovery(self) -> None:
        if self._outage_since is not None:
            logger.info(
                "Tracking store reachable again after %.0f s; sending the backlog",
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None

    def _deliver(self, record: Record) -> None:
        if isinstance(record, Batch):
            self.client.log_batch(self.run_id, metrics=record.metrics, tags=record.tags, synchronous=True)
            return
        if isinstance(record, ModelRecord):
            self._deliver_model(record)
            return
        if isinstance(record, ModelMetricsLink):
            self._deliver_link(record)
            return
        if isinstance(record, ModelDeletion):
            self._deliver_deletion(record)
            return
        for file in record.files:  # all written first: a full disk stops the unit before any upload
            if file.writer is not None:
                try:
                    file.writer(file.staged_path)
                except OSError as error:  # a failed write() names no file: this one
                    raise OSError(error.errno, error.strerror, error.filename or str(file.staged_path)) from error
                file.writer = None
        unit = next(self._units) if len(record.files) > 1 else None
        for index, file in enumerate(record.files):
            if index and unit is not None:
                wait_at_barrier(BARRIER_VARIABLE, BARRIER_SECONDS, waiting=f"{unit}.waiting", go=f"{unit}.go")
            self.client.log_artifact(self.run_id, str(file.staged_path), file.artifact_dir)
        if record.tags:  # only once every file is stored: a pointer never names a half-stored unit
            self.client.log_batch(self.run_id, tags=record.tags, synchronous=True)

    def _deliver_model(self, record: ModelRecord) -> None:
        """Creates the LoggedModel (once: a retry reuses it), writes and uploads its files, marks it
        READY and makes it an output of the run at its step."""
        if record.model_id is None and record.reuse_existing:
            record.model_id = self._existing_model(record)
            if record.model_id is not None:
                record.done.add("reused")  # its metrics are linked already
                return
        if record.model_id is None:
            params = None
            if self._experiment_id is None or record.copy_run_params:
                run = self.client.get_run(self.run_id)
                self._experiment_id = run.info.experiment_id
                params = run.data.params if record.copy_run_params else None
            record.model_id = self.client.create_logged_model(
                self._experiment_id, name=record.name, source_run_id=self.run_id, tags=record.tags, params=params
            ).model_id
        if "uploaded" not in record.done:
            shutil.rmtree(record.staged_dir, ignore_errors=True)
            try:
                record.writer(record.staged_dir, self.client.get_logged_model(record.model_id))
            except OSError as error:
                raise OSError(error.errno, error.strerror, error.filename or str(record.staged_dir)) from error
            self.client.log_model_artifacts(record.model_id, str(record.staged_dir))
            record.done.add("uploaded")  # each step once, also when a later one is retried
        if "output" not in record.done:
            self.client.log_outputs(self.run_id, [LoggedModelOutput(record.model_id, step=record.step)])
            record.done.add("output")
        self.client.finalize_logged_model(record.model_id, LoggedModelStatus.READY)

    def _deliver_deletion(self, record: ModelDeletion) -> None:
        """Deletes the model (MLflow's delete is idempotent). An account that may not delete (a team
        server's training account holds EDIT, deleting takes MANAGE) keeps it: said once, not a failure."""
        model = record.model
        if model.model_id is None:
            return
        try:
            self.client.delete_logged_model(model.model_id)
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(PERMISSION_DENIED):
                raise
            logger.warning("The logged model %s of step %d is kept (%s): deleting it takes MANAGE on the experiment",
                           model.name, model.step, first_line(error, 160))

    def _existing_model(self, record: ModelRecord) -> str | None:
        """The id of a READY model of the run with this record's name and step, if any."""
        outputs = self.client.get_run(self.run_id).outputs
        for output in (outputs.model_outputs if outputs else None) or []:
            if output.step != record.step:
                continue
            try:
                model = self.client.get_logged_model(output.model_id)
            except MlflowException as error:
                if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                    continue  # deleted (a checkpoint the final model replaced)
                raise
            if model.name == record.name and model.status == LoggedModelStatus.READY:
                return model.model_id
        return None

    def _deliver_link(self, record: ModelMetricsLink) -> None:
        model = record.model
        if model.model_id is None or "reused" in model.done:
            return  # never created (a newer one replaced it while it waited), or linked before
        metrics = [
            Metric(metric.key, metric.value, metric.timestamp, metric.step, model_id=model.model_id)
            for metric in record.metrics
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)


Record = Batch | FileRecord | ModelRecord | ModelMetricsLink | ModelDeletion


def json_text(obj: Any) -> str:
    """How the recorder writes a JSON artifact."""
    return json.dumps(obj, indent=2) + "\n"


def _bytes_writer(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _summarize(items: list[str], limit: int = 5) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")
