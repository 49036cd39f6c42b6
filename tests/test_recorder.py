"""The asynchronous recorder on a real SQLite store: order, batching, replacement, flush, failures."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.errors import RecordingError
from pipeline.tracking.recorder import RunRecorder


@pytest.fixture
def run(sqlite_store):
    client = MlflowClient()
    return client, client.create_run(client.create_experiment("recorder")).info.run_id


class _Gate:
    """Holds the recorder's thread inside its next delivery until opened, so a test can queue
    records while the store is, for the recorder, busy."""

    def __init__(self, recorder: RunRecorder) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        deliver = recorder._deliver

        def gated(record):
            self.entered.set()
            self.release.wait(30)
            deliver(record)

        recorder._deliver = gated


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


def test_queue_stays_bounded_while_the_store_is_busy(run, tmp_path):
    client, run_id = run
    recorder = RunRecorder(client, run_id, tmp_path / "staging")
    gate = _Gate(recorder)
    recorder.log_metrics({"loss": 0.0}, step=0)
    assert gate.entered.wait(10)  # the first record is in flight, held
    for epoch in range(1, 200):
        recorder.log_json({"epoch": epoch}, "state/state.json")
        recorder.log_metrics({"loss": float(epoch)}, step=epoch)
    # one file entry (the latest version replaced the older ones in place) and one metrics batch
    assert recorder.pending == ["metrics/tags loss", "artifact state/state.json", "metrics/tags loss"]
    gate.release.set()
    recorder.close(timeout=60)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(200))
    local = Path(client.download_artifacts(run_id, "state/state.json", str(tmp_path / "out")))
    assert json.loads(local.read_text()) == {"epoch": 199}


def test_snapshots_are_taken_when_queued(run, tmp_path):
    client, run_id = run
    source = tmp_path / "best_model.keras"
    source.write_text("epoch 1")
    with RunRecorder(client, run_id, tmp_path / "staging") as recorder:
        gate = _Gate(recorder)
        recorder.log_file(source, "checkpoints")
        assert gate.entered.wait(10)
        source.write_text("epoch 2, written while the upload waited")
        gate.release.set()
        recorder.close(timeout=60)
    local = Path(client.download_artifacts(run_id, "checkpoints/best_model.keras", str(tmp_path / "out")))
    assert local.read_text() == "epoch 1"


def test_an_error_in_the_with_block_still_delivers_what_was_queued(run, tmp_path):
    client, run_id = run
    with pytest.raises(KeyboardInterrupt), RunRecorder(client, run_id, tmp_path / "staging") as recorder:
        gate = _Gate(recorder)
        for step in range(5):
            recorder.log_metrics({"loss": float(step)}, step=step)
        threading.Timer(0.5, gate.release.set).start()
        raise KeyboardInterrupt
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(5))


def test_a_rejected_value_is_reported_and_does_not_take_its_batch_down(run, tmp_path):
    client, run_id = run
    recorder = RunRecorder(client, run_id, tmp_path / "staging")
    gate = _Gate(recorder)
    recorder.log_metrics({"warmup": 0.0}, step=0)
    assert gate.entered.wait(10)
    # queued behind the held record, these three coalesce into one batch; MLflow rejects "bad#name"
    recorder.log_metrics({"loss": 1.0, "bad#name": 2.0}, step=0)
    recorder.set_tags({"phase": "train"})
    gate.release.set()
    with pytest.raises(RecordingError, match=r"rejected: metrics/tags bad#name \(Invalid value"):
        recorder.close(timeout=30)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0]
    assert client.get_run(run_id).data.tags["phase"] == "train"


def test_flush_timeout_names_what_is_still_pending(run, tmp_path):
    client, run_id = run
    recorder = RunRecorder(client, run_id, tmp_path / "staging")
    gate = _Gate(recorder)
    recorder.log_metrics({"loss": 1.0}, step=0)
    recorder.log_json({"a": 1}, "lr_changes.json")
    assert gate.entered.wait(10)
    with pytest.raises(RecordingError, match="not recorded: metrics/tags loss; artifact lr_changes.json"):
        recorder.flush(timeout=0.5)
    exported = recorder.export_pending(tmp_path / "rescue")
    assert exported == ["metrics/tags loss", "artifact lr_changes.json"]
    assert json.loads((tmp_path / "rescue" / "artifacts" / "lr_changes.json").read_text()) == {"a": 1}
    records = json.loads((tmp_path / "rescue" / "pending_records.json").read_text())
    assert records[0]["metric"] == "loss" and records[0]["step"] == 0
    gate.release.set()
    recorder.close(timeout=30)
