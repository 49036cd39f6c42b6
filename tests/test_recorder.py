"""The asynchronous recorder on a real SQLite store: order, batching, replacement, flush, failures.

The store is made busy at will by `HeldStore` (the real client, each delivery held until the test
lets it through), so every interleaving a test asserts on is forced, never hoped for."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from pipeline import constants as names
from pipeline.callbacks.best_checkpoint import BestCheckpoint
from pipeline.errors import LocalStorageError, RecordingError
from pipeline.tracking.recorder import RunRecorder
from pipeline.tracking.retry import Backoff

pytestmark = pytest.mark.timeout(120)


class HeldStore(MlflowClient):
    """The real MLflow client of the test's store, as busy as the test wants: once `hold()` is called,
    each delivery (`log_batch`, `log_artifact`) starts, is counted, and waits until the test lets it
    through (`allow(n)`, `open()`) or fails it (`fail(error)`). No timeout lets a held delivery go on its own: a
    test that never opens it is stopped by pytest-timeout, never passes by luck. `before_each(path)` is called as
    each delivery starts (the artifact path, or None for a batch), and every `log_batch` is noted, and
    every read of a metric's history counted."""

    def __init__(self) -> None:
        super().__init__()
        self._condition = threading.Condition()
        self._permits = math.inf
        self.started = 0
        self.batches: list[tuple[int, int]] = []  # (metrics, tags) of each log_batch call
        self.history_reads = 0
        self.before_each: Callable[[str | None], None] | None = None
        self._failures: list[BaseException] = []

    def hold(self) -> None:
        with self._condition:
            self._permits = 0

    def allow(self, count: int) -> None:
        with self._condition:
            self._permits += count
            self._condition.notify_all()

    def open(self) -> None:
        self.allow(math.inf)

    def fail(self, error: BaseException) -> None:
        """Lets the next held delivery through as a failure: it raises `error` instead of reaching the store."""
        with self._condition:
            self._failures.append(error)
        self.allow(1)

    def wait_started(self, count: int, timeout: float = 30) -> None:
        """Waits until the `count`-th delivery has started (and, when held, waits for its permit)."""
        with self._condition:
            assert self._condition.wait_for(lambda: self.started >= count, timeout), (self.started, count)

    def _pass(self, path: str | None) -> None:
        if self.before_each is not None:
            self.before_each(path)
        with self._condition:
            self.started += 1
            self._condition.notify_all()
            self._condition.wait_for(lambda: self._permits > 0)
            self._permits -= 1
            if self._failures:
                raise self._failures.pop(0)

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **options):
        self._pass(None)
        self.batches.append((len(metrics), len(tags)))
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **options)

    def get_metric_history(self, run_id, key):
        self.history_reads += 1
        return super().get_metric_history(run_id, key)

    def log_artifact(self, run_id, local_path, artifact_path=None):
        self._pass(f"{artifact_path}/{Path(local_path).name}" if artifact_path else Path(local_path).name)
        return super().log_artifact(run_id, local_path, artifact_path)


@pytest.fixture
def run(sqlite_store):
    client = MlflowClient()
    return client, client.create_run(client.create_experiment("recorder")).info.run_id


@pytest.fixture
def held(run) -> Iterator[HeldStore]:
    store = HeldStore()
    yield store
    store.open()  # a failed test never leaves a recorder thread waiting


def test_metrics_tags_and_files_arrive_in_order_and_complete(run, tmp_path):
    client, run_id = run
    with RunRecorder(client, run_id, tmp_path / "staging") as recorder:
        for step in range(25):
            recorder.log_metrics({"loss": 1.0 / (step + 1), "accuracy": step / 25}, step=step)
            recorder.set_tags({"last_step": step})
            recorder.log_json({"step": step}, "progress/state.json")
        recorder.close(timeout=60)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(25))
    assert [m.value for m in client.get_metric_history(run_id, "accuracy")] == [s / 25 for s in range(25)]
    assert client.get_run(run_id).data.tags["last_step"] == "24"
    local = Path(client.download_artifacts(run_id, "progress/state.json", str(tmp_path / "out")))
    assert json.loads(local.read_text()) == {"step": 24}
    assert not any((tmp_path / "staging").iterdir())  # staged copies are removed once delivered
    assert names.TAG_RECORDING_MAX_LAG not in client.get_run(run_id).data.tags  # never behind: not said


def test_queue_stays_bounded_while_the_store_is_busy(run, held, tmp_path):
    client, run_id = run
    recorder = RunRecorder(held, run_id, tmp_path / "staging")
    held.hold()
    recorder.log_metrics({"loss": 0.0}, step=0)
    held.wait_started(1)  # the first record (metrics) is in flight, held
    for epoch in range(1, 100):
        recorder.log_json({"epoch": epoch}, "state/state.json")
        recorder.log_metrics({"loss": float(epoch)}, step=epoch)
    # one file entry (the latest version replaced the older ones in place) and one metrics batch
    assert recorder.pending == ["metrics/tags loss", "artifact state/state.json", "metrics/tags loss"]
    held.allow(1)  # the metrics go through; now the state file is in flight, held
    held.wait_started(2)
    for epoch in range(100, 200):
        recorder.log_json({"epoch": epoch}, "state/state.json")
        recorder.log_metrics({"loss": float(epoch)}, step=epoch)
    # the file being sent is never replaced: its newer version waits behind it, and is replaced there
    assert recorder.pending == [
        "artifact state/state.json", "metrics/tags loss", "artifact state/state.json", "metrics/tags loss"
    ]
    held.open()
    recorder.close(timeout=60)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(200))
    local = Path(client.download_artifacts(run_id, "state/state.json", str(tmp_path / "out")))
    assert json.loads(local.read_text()) == {"epoch": 199}


def test_a_newer_version_replaces_every_waiting_one_after_a_failed_send(run, held, tmp_path):
    """A version whose send failed stays first in the queue, and one queued while it was in flight waits behind
    it. The next version must leave one entry, the newest: had it replaced the first alone, the one behind it would
    be sent (or kept locally) after it, and the older state would win (a CI run beside a training rescued epoch
    8's state in the slot of epoch 10's)."""
    client, run_id = run
    recorder = RunRecorder(held, run_id, tmp_path / "staging", backoff=Backoff(first=0.5, longest=0.5, jitter=0))
    held.hold()
    recorder.log_json({"epoch": 6}, "state/state.json")
    held.wait_started(1)  # epoch 6 in flight, held
    recorder.log_json({"epoch": 8}, "state/state.json")  # the entry being sent is never replaced: 8 waits behind
    assert recorder.pending == ["artifact state/state.json"] * 2
    held.fail(ConnectionError("the store went away"))  # epoch 6's send fails: it stays first, to be sent again
    deadline = time.monotonic() + 30
    while not recorder.in_outage:
        assert time.monotonic() < deadline, "the failed send was never noted"
        time.sleep(0.01)
    recorder.log_json({"epoch": 10}, "state/state.json")
    assert recorder.pending == ["artifact state/state.json"]
    recorder.export_pending(tmp_path / "kept")  # what a training that ends now keeps locally
    assert json.loads((tmp_path / "kept" / "artifacts" / "state" / "state.json").read_text()) == {"epoch": 10}
    held.open()
    recorder.close(timeout=60)
    local = Path(client.download_artifacts(run_id, "state/state.json", str(tmp_path / "out")))
    assert json.loads(local.read_text()) == {"epoch": 10}


def test_a_store_that_falls_behind_is_said_once_and_the_longest_wait_recorded(run, held, tmp_path, caplog):
    """The store answers, slower than records come: the first record is held past `behind_after`."""
    client, run_id = run
    recorder = RunRecorder(held, run_id, tmp_path / "staging", behind_after=0.2)
    held.hold()
    with caplog.at_level(logging.INFO, logger="pipeline.tracking.recorder"):
        recorder.log_metrics({"loss": 0.0}, step=0)
        held.wait_started(1)  # in flight, held
        recorder.log_metrics({"loss": 1.0}, step=1)
        assert not _lines(caplog, "behind")  # not yet waited long enough
        time.sleep(0.3)  # the time being measured: the held record ages past behind_after
        for step in range(2, 6):
            recorder.log_metrics({"loss": float(step)}, step=step)
            recorder.log_json({"epoch": step}, "state/state.json")
        [behind] = _lines(caplog, "behind")  # said once, as the training queues, not per record
        said_behind = re.match(r"Tracking store is (\d+) s behind this training \(2 records waiting\)", behind)
        assert said_behind, behind
        assert not _lines(caplog, "caught up")
        started = 1
        while not _lines(caplog, "caught up"):  # one delivery at a time, until the backlog is through
            held.allow(1)
            started += 1
            held.wait_started(started)
        # the tag reporting the longest wait is in flight now, held longer than any record waited: it is a report,
        # not a record of the training, and its own wait must not change the figure it reports
        longest = recorder.max_lag
        time.sleep(longest + 0.5)
        held.open()
        recorder.close(timeout=60)
    [caught_up] = _lines(caplog, "caught up")
    # The seconds depend on how fast the store takes the backlog (a loaded machine: "after 1 s"), so they are checked
    # against what the recorder measured: the longest wait, a backlog at least that long, the first wait within it.
    said = re.match(r"Tracking store caught up after (\d+) s; a record waited up to (\d+) s \(tag (\w+)\)$", caught_up)
    assert said and said[3] == names.TAG_RECORDING_MAX_LAG, caught_up
    assert recorder.max_lag == longest >= 0.3
    assert int(said[2]) == round(recorder.max_lag) and int(said[1]) >= int(said[2]) >= int(said_behind[1]), caught_up
    assert float(client.get_run(run_id).data.tags[names.TAG_RECORDING_MAX_LAG]) == round(recorder.max_lag, 1)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(6))  # all of it, in order


def _lines(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if word in record.getMessage()]


def test_snapshots_are_taken_when_queued(run, held, tmp_path):
    client, run_id = run
    source = tmp_path / "best_model.keras"
    source.write_text("epoch 1")
    with RunRecorder(held, run_id, tmp_path / "staging") as recorder:
        held.hold()
        recorder.log_file(source, "checkpoints")
        held.wait_started(1)
        source.write_text("epoch 2, written while the upload waited")
        held.open()
        recorder.close(timeout=60)
    local = Path(client.download_artifacts(run_id, "checkpoints/best_model.keras", str(tmp_path / "out")))
    assert local.read_text() == "epoch 1"


def test_an_error_in_the_with_block_still_delivers_what_was_queued(run, held, tmp_path):
    client, run_id = run
    with pytest.raises(KeyboardInterrupt), RunRecorder(held, run_id, tmp_path / "staging") as recorder:
        held.hold()
        for step in range(5):
            recorder.log_metrics({"loss": float(step)}, step=step)
        threading.Timer(0.5, held.open).start()
        raise KeyboardInterrupt
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(5))


def test_a_rejected_value_is_reported_and_does_not_take_its_batch_down(run, held, tmp_path):
    client, run_id = run
    recorder = RunRecorder(held, run_id, tmp_path / "staging")
    held.hold()
    recorder.log_metrics({"warmup": 0.0}, step=0)
    held.wait_started(1)
    # queued behind the held record, these three coalesce into one batch; MLflow rejects "bad#name"
    recorder.log_metrics({"loss": 1.0, "bad#name": 2.0}, step=0)
    recorder.set_tags({"phase": "train"})
    held.open()
    with pytest.raises(RecordingError, match=r"rejected: metrics/tags bad#name \(Invalid value"):
        recorder.close(timeout=30)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0]
    assert client.get_run(run_id).data.tags["phase"] == "train"


def test_flush_timeout_names_what_is_still_pending(run, held, tmp_path):
    client, run_id = run
    recorder = RunRecorder(held, run_id, tmp_path / "staging")
    held.hold()
    recorder.log_metrics({"loss": 1.0}, step=0)
    recorder.log_json({"a": 1}, "lr_changes.json")
    held.wait_started(1)
    with pytest.raises(RecordingError, match="not recorded: metrics/tags loss; artifact lr_changes.json"):
        recorder.flush(timeout=0.5)
    exported = recorder.export_pending(tmp_path / "rescue")
    assert exported == ["metrics/tags loss", "artifact lr_changes.json"]
    assert json.loads((tmp_path / "rescue" / "artifacts" / "lr_changes.json").read_text()) == {"a": 1}
    records = json.loads((tmp_path / "rescue" / "pending_records.json").read_text())
    assert records[0]["metric"] == "loss" and records[0]["step"] == 0
    held.open()
    recorder.close(timeout=30)


def _checkpoint(tmp_path: Path, recorder: RunRecorder) -> BestCheckpoint:
    """A BestCheckpoint of a small real Keras model (its MLflow model template is saved from it)."""
    checkpoint = BestCheckpoint(tmp_path / "best.keras", recorder)
    checkpoint.set_model(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    return checkpoint


def _new_best(checkpoint: BestCheckpoint, epoch: int) -> None:
    """What BestCheckpoint does at a new best, with a file whose content says its epoch."""
    checkpoint.best_record = {"epoch": epoch, names.VAL_ACCURACY: 0.5 + epoch / 100, names.VAL_LOSS: 1.0 / epoch}
    checkpoint.best_file = f"checkpoint of epoch {epoch}".encode()
    checkpoint.upload()


def test_a_checkpoint_and_its_description_always_describe_the_same_epoch(run, held, tmp_path):
    """Epoch 4 becomes the best while epoch 3's checkpoint is being sent: whatever moment a kill comes
    (looked at as each delivery starts, between a checkpoint and its description too), the tags
    `mlflow.latest_checkpoint_artifact` and `best_epoch` name one epoch whose checkpoint and
    description are both stored and are that epoch's, and at the end they name epoch 4."""
    client, run_id = run
    seen: list[int | str | None] = []

    def pointed_epoch() -> None:
        tags = client.get_run(run_id).data.tags
        pointer = tags.get(names.TAG_LATEST_CHECKPOINT)
        if pointer is None:
            assert names.TAG_BEST_EPOCH not in tags
            seen.append(None)
            return
        local = Path(client.download_artifacts(run_id, pointer.rpartition("/")[0], str(tmp_path / f"seen{len(seen)}")))
        epoch = json.loads((local / names.BEST_MODEL_INFO_FILE).read_text())["epoch"]
        assert (local / names.BEST_MODEL_FILE).read_text() == f"checkpoint of epoch {epoch}", pointer
        assert pointer == names.checkpoint_file(epoch) and tags[names.TAG_BEST_EPOCH] == str(epoch)
        seen.append(epoch)

    def before_each(path: str | None) -> None:
        try:
            pointed_epoch()
        except Exception as error:  # noqa: BLE001 - noted, asserted on the test's thread, not the recorder's
            seen.append(f"broken before {path}: {error!r}")

    held.before_each = before_each
    recorder = RunRecorder(held, run_id, tmp_path / "staging")
    checkpoint = _checkpoint(tmp_path, recorder)
    held.hold()
    _new_best(checkpoint, 3)
    held.wait_started(1)  # epoch 3's checkpoint is being sent...
    _new_best(checkpoint, 4)  # ...when epoch 4 is the new best
    recorder.log_metrics({"loss": 0.1}, step=4)
    held.open()
    recorder.close(timeout=60)
    pointed_epoch()
    # looked at before each of: 3's two files and tags, 4's two files and tags, the metrics; and at the end
    assert seen == [None, None, None, 3, 3, 3, 4, 4], seen
    stored = {item.path for item in client.list_artifacts(run_id, names.CHECKPOINT_DIR)}
    assert stored == {names.checkpoint_dir(3), names.checkpoint_dir(4)}


def test_a_new_bests_metrics_are_linked_from_the_values_queued_without_reading_the_store(run, held, tmp_path):
    """Epochs 0-3, new bests at 1 and 3: each checkpoint's LoggedModel gets exactly its epoch's metrics
    (the values and timestamps queued, so the run keeps one value per epoch), and no metric history
    is read from the store for it."""
    client, run_id = run
    recorder = RunRecorder(held, run_id, tmp_path / "staging")
    checkpoint = _checkpoint(tmp_path, recorder)
    queued = {}
    for epoch in range(4):
        checkpoint.on_epoch_begin(epoch)  # links the previous epoch's new best, as in a training
        if epoch in (1, 3):
            _new_best(checkpoint, epoch)
        queued[epoch] = {names.LOSS: 1 / (epoch + 1), names.VAL_ACCURACY: 0.5 + epoch / 100, names.VAL_LOSS: 2 - epoch}
        recorder.log_metrics(queued[epoch], step=epoch)
        assert recorder.wait_until_delivered(60)  # each epoch delivered before the next
    checkpoint.on_train_end()
    recorder.close(timeout=60)
    assert held.history_reads == 0
    outputs = client.get_run(run_id).outputs.model_outputs
    assert sorted(output.step for output in outputs) == [1, 3]
    for output in outputs:
        model = client.get_logged_model(output.model_id)
        linked = {(metric.key, metric.step): metric.value for metric in model.metrics}
        assert linked == {(key, output.step): value for key, value in queued[output.step].items()}, output.step
    for key in (names.LOSS, names.VAL_ACCURACY, names.VAL_LOSS):  # linking added no value to the run's own
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1, 2, 3], key


def _five_bests_behind_a_held_metric(recorder: RunRecorder, held: HeldStore, tmp_path: Path) -> None:
    """Holds the store on the first record (metrics of epoch 0) and queues new bests at epochs 1-5 behind it."""
    checkpoint = _checkpoint(tmp_path, recorder)
    held.hold()
    recorder.log_metrics({"loss": 0.5}, step=0)
    held.wait_started(1)
    for epoch in range(1, 6):
        _new_best(checkpoint, epoch)


def test_a_store_that_keeps_up_gets_every_best_checkpoint(run, held, tmp_path):
    """The store holds the first record while five new bests are queued, within `behind_after`: it is
    slower than the epochs but not behind, so no best is replaced; each is stored under its own epoch."""
    client, run_id = run
    recorder = RunRecorder(held, run_id, tmp_path / "staging")  # behind after 30 s, the default
    _five_bests_behind_a_held_metric(recorder, held, tmp_path)
    assert len(recorder.pending) == 1 + 2 * 5, recorder.pending  # the metrics, then each best's files and model
    held.open()
    recorder.close(timeout=60)
    stored = {item.path for item in client.list_artifacts(run_id, names.CHECKPOINT_DIR)}
    assert stored == {names.checkpoint_dir(epoch) for epoch in range(1, 6)}
    assert sorted(output.step for output in client.get_run(run_id).outputs.model_outputs) == [1, 2, 3, 4, 5]
    assert client.get_run(run_id).data.tags[names.TAG_BEST_EPOCH] == "5"


def test_a_newer_checkpoint_replaces_a_waiting_one_as_a_whole_when_the_store_is_behind(run, held, tmp_path):
    client, run_id = run
    recorder = RunRecorder(held, run_id, tmp_path / "staging", behind_after=0)  # any wait is behind
    _five_bests_behind_a_held_metric(recorder, held, tmp_path)
    directory = names.checkpoint_dir(5)
    unit = (f"artifact {directory}/{names.BEST_MODEL_FILE} + {directory}/{names.BEST_MODEL_INFO_FILE} "
            f"then tags {names.TAG_BEST_EPOCH}, {names.TAG_LATEST_CHECKPOINT}")
    # and one LoggedModel, the newest: the older ones were replaced while they waited
    assert recorder.pending == ["metrics/tags loss", unit, f"logged model {names.CHECKPOINT_MODEL_NAME} (step 5)"]
    held.open()
    recorder.close(timeout=60)
    stored = {item.path for item in client.list_artifacts(run_id, names.CHECKPOINT_DIR)}
    assert stored == {directory}  # epochs 1-4 were replaced while they waited: never sent
    [output] = client.get_run(run_id).outputs.model_outputs
    assert output.step == 5 and client.get_logged_model(output.model_id).name == names.CHECKPOINT_MODEL_NAME
    local = Path(client.download_artifacts(run_id, directory, str(tmp_path / "out")))
    assert (local / names.BEST_MODEL_FILE).read_text() == "checkpoint of epoch 5"
    assert json.loads((local / names.BEST_MODEL_INFO_FILE).read_text())["epoch"] == 5
    tags = client.get_run(run_id).data.tags
    assert (tags[names.TAG_BEST_EPOCH], tags[names.TAG_LATEST_CHECKPOINT]) == ("5", names.checkpoint_file(5))


def test_batches_stay_within_mlflows_limits_for_one_request(run, held, tmp_path):
    """1000 metrics and a tag queued behind a busy store: MLflow's limit is 1000 entities per
    request (metrics, params and tags together), not 1000 metrics plus 100 tags."""
    client, run_id = run
    recorder = RunRecorder(held, run_id, tmp_path / "staging")
    held.hold()
    recorder.log_metrics({"warmup": 0.0}, step=0)
    held.wait_started(1)
    recorder.log_metrics({f"m{index:04d}": float(index) for index in range(MAX_METRICS_PER_BATCH)}, step=0)
    recorder.set_tags({"phase": "train"})
    recorder.set_tags({f"t{index}": index for index in range(MAX_PARAMS_TAGS_PER_BATCH + 1)})
    held.open()
    recorder.close(timeout=60)
    assert held.batches[0] == (1, 0)
    for metrics, tags in held.batches:
        assert metrics <= MAX_METRICS_PER_BATCH and tags <= MAX_PARAMS_TAGS_PER_BATCH, held.batches
        assert metrics + tags <= MAX_ENTITIES_PER_BATCH, held.batches
    assert len(held.batches) <= 5  # still batched: not one request per value
    stored = client.get_run(run_id).data
    assert len(stored.metrics) == MAX_METRICS_PER_BATCH + 1
    assert stored.tags["phase"] == "train"
    assert stored.tags[f"t{MAX_PARAMS_TAGS_PER_BATCH}"] == str(MAX_PARAMS_TAGS_PER_BATCH)


@contextlib.contextmanager
def _small_disk(mount_point: Path, size: str = "64k") -> Iterator[Path]:
    """A real tmpfs of `size` at `mount_point` (the tests run as root), unmounted afterwards."""
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.mark.parametrize("fault", ["ENOSPC", "EROFS"])
def test_a_full_or_read_only_staging_disk_is_a_local_error_not_an_outage(run, held, tmp_path, caplog, fault):
    """The state snapshot is written on the recorder's thread, into the staging directory: a full
    (ENOSPC) or read-only (EROFS) disk there stops recording at once, in one line naming the path and
    the errno; what was delivered before stays, nothing after the failed record is sent."""
    client, run_id = run
    with _small_disk(tmp_path / "disk") as disk:
        staging = disk / "staging"
        recorder = RunRecorder(held, run_id, staging)
        held.hold()
        recorder.log_metrics({"loss": 0.0}, step=0)
        held.wait_started(1)
        state = b"x" * (256 * 1024 if fault == "ENOSPC" else 16)  # larger than the 64 KB disk
        recorder.log_written(lambda path: path.write_bytes(state), "state/training_state.npz")
        recorder.log_metrics({"loss": 1.0}, step=1)
        if fault == "EROFS":
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="pipeline"):
            held.open()
            with pytest.raises(LocalStorageError) as raised:
                recorder.flush(timeout=30)
        assert time.monotonic() - started < 10
        message = str(raised.value)
        assert "\n" not in message
        assert message.startswith(f"cannot write the run's local files in {staging} (")
        assert f"[Errno {28 if fault == 'ENOSPC' else 30} {fault}]" in message
        assert f"writing {staging}/" in message and "training_state.npz" in message
        with pytest.raises(LocalStorageError):  # the training thread is stopped at its next record
            recorder.log_metrics({"loss": 2.0}, step=2)
        with pytest.raises(LocalStorageError):
            recorder.close(timeout=30)
        assert time.monotonic() - started < 10
    assert not any("unreachable" in record.getMessage() for record in caplog.records), caplog.text
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0]  # delivered before: kept
    assert not client.list_artifacts(run_id, "state")


def test_an_error_with_records_undelivered_keeps_them_locally(run, held, tmp_path, caplog):
    """Any error that ends the `with` block while the store does not answer: after `abandon_timeout`,
    what is undelivered (the last good checkpoint among it) is kept in the rescue directory, and the
    log says where."""
    _, run_id = run
    rescue = tmp_path / "rescue" / run_id
    recorder = RunRecorder(held, run_id, tmp_path / "staging", abandon_timeout=0.5, rescue_dir=rescue)
    checkpoint = _checkpoint(tmp_path, recorder)
    held.hold()
    with caplog.at_level(logging.INFO, logger="pipeline"), pytest.raises(ZeroDivisionError), recorder:
        recorder.log_metrics({"loss": 0.5}, step=0)
        _new_best(checkpoint, 2)
        held.wait_started(1)
        _ = 1 / 0  # an error after fit (evaluation, plots, ...)
    kept = rescue / "unsent" / "artifacts" / names.checkpoint_dir(2)
    assert (kept / names.BEST_MODEL_FILE).read_text() == "checkpoint of epoch 2"
    assert json.loads((kept / names.BEST_MODEL_INFO_FILE).read_text())["epoch"] == 2
    pending = json.loads((rescue / "unsent" / "pending_records.json").read_text())
    assert {"tag": names.TAG_LATEST_CHECKPOINT, "value": names.checkpoint_file(2)} in pending
    assert f"Kept locally in {rescue / 'unsent'}" in caplog.text
