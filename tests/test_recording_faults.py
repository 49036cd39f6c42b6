"""The recorder's faults through the CLI, in real training processes: only the recorder's staging
write meets a full local disk; a training diverges while the tracking server is down."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import keras
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from tests.helpers import MNIST_SMALL, new_sqlite_store, one_line_error, project_env, run_cli
from tests.test_failure_guarantees import CLI_AFTER_SETUP
from tests.test_recorder import _small_disk

pytestmark = pytest.mark.slow

# Room for the training thread's checkpoint of a 784-1024-10 model (~10 MB), not for a second copy
# of it staged by the recorder's thread (the checkpoint unit, then the state that holds it too).
STAGING_FULL_DISK = "14m"


def test_a_full_disk_under_the_recorder_alone_fails_the_run_at_once_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the store and its artifacts on the big disk
    store = new_sqlite_store(tmp_path)
    client = MlflowClient(store)
    experiment_id = client.create_experiment("staging-full")
    with _small_disk(tmp_path / "small-disk", STAGING_FULL_DISK) as disk:
        started = time.monotonic()
        result = run_cli(
            ["train", "--epochs", "3", "--dataset", str(MNIST_SMALL), "--hidden-units", "1024",
             "--target-accuracy", "0", "--experiment-name", "staging-full"],
            cwd=tmp_path, timeout=300, MLFLOW_TRACKING_URI=store, TMPDIR=str(disk),
        )
        elapsed = time.monotonic() - started
        assert list(disk.glob("mnist-run-*")) == []  # the run's local directory was removed
    assert result.returncode == 1, result.stderr[-3000:]
    assert "unreachable" not in result.stdout + result.stderr  # not taken for an outage
    # The recorder's thread meets the full disk (staging the checkpoint); the training thread may meet
    # it too, at its next checkpoint: whichever comes first, one line names the run's directory and errno.
    line = one_line_error(result, "(No space left on device) [Errno 28 ENOSPC]", "free disk space")
    assert line.startswith(f"error: cannot write the run's local files in {disk}/mnist-run-")
    assert f"cannot write the run's local files in {disk}/mnist-run-" in result.stdout  # the recorder's own line
    assert "/staging (No space left on device) [Errno 28 ENOSPC] writing " in result.stdout
    assert elapsed < 60, elapsed  # no flush or abandon timeout waited (the training itself takes ~15 s)
    [run] = client.search_runs([experiment_id])
    assert run.info.status == "FAILED"
    assert names.EPOCHS_COMPLETED not in run.data.metrics  # training stopped: it did not run on to the end
    assert not client.search_logged_models([experiment_id])


# The training waits at the start of epoch 1 until the test has stopped the tracking server, then
# diverges at the start of epoch 2 (learning rate 1e30): the divergence meets the outage.
NAN_EPOCH = 2
DIVERGE_DURING_OUTAGE = f"""
import os
import time
from pathlib import Path

import keras

READY, GO = Path(os.environ["TEST_READY_FILE"]), Path(os.environ["TEST_GO_FILE"])


class OutageThenDivergence(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            READY.touch()
            while not GO.exists():
                time.sleep(0.05)
        if epoch == {NAN_EPOCH}:
            self.model.optimizer.learning_rate = 1e30


fit = keras.Model.fit


def fit_with_fault(self, *args, callbacks=(), **kwargs):
    return fit(self, *args, callbacks=[OutageThenDivergence(), *callbacks], **kwargs)


keras.Model.fit = fit_with_fault
"""


def test_a_divergence_during_an_outage_is_a_divergence_and_keeps_the_last_good_checkpoint(server_store, tmp_path):
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = project_env(
        **server_store.client_environment(), MNIST_PIPELINE_FLUSH_TIMEOUT="5", HOME=str(tmp_path),
        TEST_READY_FILE=str(ready), TEST_GO_FILE=str(go),
    )
    args = ["train", "--epochs", "4", "--dataset", str(MNIST_SMALL), "--hidden-units", "32", "--batch-size", "32",
            "--target-accuracy", "0", "--es-patience", "20"]
    process = subprocess.Popen(
        [sys.executable, "-c", CLI_AFTER_SETUP.format(setup=DIVERGE_DURING_OUTAGE), *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "training did not reach epoch 1"
            time.sleep(0.05)
        server_store.stop()
        go.touch()
        stdout, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr[-3000:]
    # one error line (MLflow's system-metrics thread adds its own warnings about the server being down)
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    [line] = lines
    assert line.startswith(f"error: training diverged: the loss became NaN/inf at epoch {NAN_EPOCH} batch ")
    assert "tracking store unreachable; not recorded: " in line
    [rescue] = (tmp_path / ".cache" / "mnist-pipeline" / "unrecorded").iterdir()
    assert line.endswith(f"and the unsent records are in {rescue}")
    # the last good checkpoint is kept locally, and loads
    model = keras.models.load_model(rescue / names.BEST_MODEL_FILE)
    assert model.output_shape == (None, 10)
    unsent = list((rescue / "unsent" / "artifacts").glob(f"{names.CHECKPOINT_DIR}/*/{names.BEST_MODEL_INFO_FILE}"))
    # a newer best replaces a waiting pair, never the one being sent when the store went away (CI saw both)
    assert len(unsent) <= 2, unsent
    if unsent:  # the newest pair never reached the store
        info_file = max(unsent, key=lambda path: json.loads(path.read_text())["epoch"])
        best = json.loads(info_file.read_text())
        assert best["epoch"] < NAN_EPOCH and info_file.parent.name == f"{names.CHECKPOINT_EPOCH_PREFIX}{best['epoch']}"
        assert (info_file.parent / names.BEST_MODEL_FILE).read_bytes() == (rescue / names.BEST_MODEL_FILE).read_bytes()
        assert f"the best checkpoint (epoch {best['epoch']})" in line
    pending = json.loads((rescue / "unsent" / "pending_records.json").read_text())
    assert {"tag": names.TAG_NAN_AT, "value": line.split(" at ", 1)[1].split(" (")[0]} in pending
