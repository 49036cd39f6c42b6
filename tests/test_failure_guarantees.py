"""README "What happens when things fail": the guarantees proven end to end with real CLI processes
and real stores: an unwritable TMPDIR, an unreachable tracking server, a batch that cannot be split
across replicas, a value the store refuses (the one command run in pytest's process), a NaN in the middle of
training, and trainings that create a new SQLite store at the same instant."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.callbacks.best_checkpoint import download_best_checkpoint
from pipeline.training.data import load_dataset, split_validation
from tests.helpers import (
    MNIST_SMALL,
    PROJECT_DIR,
    fail_fast_bound,
    free_ports,
    new_sqlite_store,
    one_line_error,
    project_env,
    run_cli,
    run_cli_here,
)

pytestmark = pytest.mark.slow

SMALL = ["--dataset", str(MNIST_SMALL), "--hidden-units", "32", "--target-accuracy", "0"]

# The real CLI (`python -m mlflow_project ARGS`) in a process that first runs SETUP: what a test cannot
# set from outside (two logical CPUs for `mirrored`, a fault injected into training). TensorFlow is
# imported as the CLI imports it, its start-up messages kept off stderr.
CLI_AFTER_SETUP = """
import sys
from mlflow_project.common import import_tensorflow_quietly

import_tensorflow_quietly()
{setup}
from mlflow_project.__main__ import main

sys.argv = ["mnist-pipeline", *sys.argv[1:]]
main()
"""

TWO_LOGICAL_CPUS = """
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""

# At the start of epoch NAN_EPOCH (0-based) the learning rate jumps to 1e30: real training diverges
# there, after NAN_EPOCH good epochs (the fault of test_callbacks.py, injected into the CLI's fit).
NAN_EPOCH = 2
LEARNING_RATE_JUMP = f"""
import keras


class RaiseLearningRate(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == {NAN_EPOCH}:
            self.model.optimizer.learning_rate = 1e30


fit = keras.Model.fit


def fit_with_fault(self, *args, callbacks=(), **kwargs):
    return fit(self, *args, callbacks=[RaiseLearningRate(), *callbacks], **kwargs)


keras.Model.fit = fit_with_fault
"""


def _cli_after_setup(setup: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CLI_AFTER_SETUP.format(setup=setup), *args], cwd=cwd, env=project_env(**env),
        capture_output=True, text=True, timeout=300,
    )


def _all_runs(client: MlflowClient) -> list:
    return client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])


def test_unwritable_tmpdir_fails_the_run_in_one_line(tmp_path, monkeypatch):
    """TMPDIR on a read-only filesystem: Python would quietly use /tmp instead; the pipeline says so."""
    monkeypatch.chdir(tmp_path)  # the experiment's artifacts (./mlruns) go there
    store = new_sqlite_store(tmp_path)
    client = MlflowClient(store)
    experiment_id = client.create_experiment("tmpdir")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)], check=True)
    try:
        result = run_cli(
            ["train", "--epochs", "1", *SMALL, "--experiment-name", "tmpdir"], cwd=tmp_path, timeout=300,
            MLFLOW_TRACKING_URI=store, TMPDIR=str(read_only),
        )
    finally:
        subprocess.run(["umount", str(read_only)], check=True)
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_line_error(result)
    assert line.startswith(f"error: cannot write the run's local files in {read_only} (Read-only file system)")
    [run] = client.search_runs([experiment_id])
    assert run.info.status == "FAILED"
    assert not client.list_artifacts(run.info.run_id)
    assert not client.search_logged_models([experiment_id])


class _SilentServer:
    """A TCP port that accepts connections (the kernel completes the handshake) but never answers."""

    def __enter__(self) -> int:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        return self.socket.getsockname()[1]

    def __exit__(self, *exc_info) -> None:
        self.socket.close()


def _timed_cli(args: list[str], cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = run_cli(args, cwd=cwd, timeout=300, **env)
    return result, time.monotonic() - started


def test_unreachable_tracking_server_fails_at_start_in_one_line_within_the_timeout(tmp_path):
    train = ["train", "--epochs", "1", "--hidden-units", "32", "--dataset"]
    # Baseline: the same start-up (TensorFlow, MLflow) up to a one-line failure that asks no server.
    missing = str(tmp_path / "missing.npz")
    baseline, startup = _timed_cli(
        [*train, missing], tmp_path, MLFLOW_TRACKING_URI="postgresql+psycopg2://postgres@127.0.0.1:1/x"
    )
    assert baseline.returncode == 2 and missing in one_line_error(baseline)
    bound = fail_fast_bound(startup)

    [closed_port] = free_ports(1)
    train.append(str(MNIST_SMALL))
    with tempfile.TemporaryDirectory() as blocker:  # the check comes before TensorFlow is loaded
        Path(blocker, "tensorflow.py").write_text("raise ImportError('TensorFlow was imported before the check')\n")
        closed, seconds = _timed_cli(train, tmp_path, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{closed_port}",
                                     PYTHONPATH=f"{blocker}{os.pathsep}{PROJECT_DIR}")
    assert closed.returncode == 1, closed.stderr[-3000:]
    assert one_line_error(closed) == (
        f"error: tracking server http://127.0.0.1:{closed_port} is unreachable (connection refused); check that it "
        "runs and that MLFLOW_TRACKING_URI points at it"
    )
    assert seconds < bound, (seconds, startup)
    assert "Epoch" not in closed.stdout  # nothing trained

    with _SilentServer() as silent_port:
        silent, seconds = _timed_cli(train, tmp_path, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{silent_port}")
    assert silent.returncode == 1, silent.stderr[-3000:]
    assert seconds < bound, (seconds, startup)
    assert one_line_error(silent) == (
        f"error: tracking server http://127.0.0.1:{silent_port} is unreachable (no answer within 10 s); check that "
        "it runs and that MLFLOW_TRACKING_URI points at it"
    )
    assert "Epoch" not in silent.stdout
    assert list(tmp_path.iterdir()) == []  # no store, no run, nothing written


def test_batch_size_not_a_multiple_of_the_mirrored_replicas_is_one_line_exit_2(tmp_path):
    store = new_sqlite_store(tmp_path)
    result = _cli_after_setup(
        TWO_LOGICAL_CPUS, ["train", "--epochs", "1", *SMALL, "--strategy", "mirrored", "--batch-size", "127"],
        tmp_path, MLFLOW_TRACKING_URI=store,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert one_line_error(result) == (
        "error: parameter batch_size=127 is invalid: allowed is a multiple of the 2 replicas of strategy=mirrored "
        "(the global batch is split evenly across them)"
    )
    assert "Epoch" not in result.stdout
    assert not _all_runs(MlflowClient(store))


def test_a_value_the_store_refuses_exits_1_naming_it_in_one_line(postgres_store, tmp_path, monkeypatch):
    """The experiment name is the value a user gives that the store checks: MLflow's stores refuse a
    name over 500 characters (here the session's PostgreSQL database, as a team's server would). The command runs
    in this process: the refusal comes from the store, not from anything a process of its own would change."""
    name = "x" * 501
    monkeypatch.chdir(tmp_path)
    result = run_cli_here(["train", "--epochs", "1", *SMALL, "--experiment-name", name],
                          MLFLOW_TRACKING_URI=postgres_store)
    assert result.returncode == 1, result.stderr[-3000:]
    assert one_line_error(result) == (
        "error: the tracking store failed: 'name' exceeds the maximum length of 500 characters"
    )
    client = MlflowClient(postgres_store)
    assert client.get_experiment_by_name(name) is None
    assert "Epoch" not in result.stdout


def test_nan_mid_training_fails_the_run_and_keeps_an_earlier_loadable_checkpoint(tmp_path):
    store = new_sqlite_store(tmp_path)
    result = _cli_after_setup(
        LEARNING_RATE_JUMP,
        ["train", "--epochs", "4", *SMALL, "--batch-size", "32", "--es-patience", "20", "--experiment-name", "nan"],
        tmp_path, MLFLOW_TRACKING_URI=store,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_line_error(result)
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    run_id, tags = run.info.run_id, run.data.tags
    assert run.info.status == "FAILED"
    assert tags[names.TAG_STOP_REASON] == names.STOP_NAN_LOSS
    assert tags[names.TAG_NAN_AT].startswith(f"epoch {NAN_EPOCH} batch ")
    assert f"training diverged: the loss became NaN/inf at {tags[names.TAG_NAN_AT]} " in line
    # Only the good epochs are recorded, and the best checkpoint is one of them.
    assert [m.step for m in client.get_metric_history(run_id, names.LOSS)] == list(range(NAN_EPOCH))
    checkpoint_file, best = download_best_checkpoint(client, run_id, tmp_path / "downloaded")
    assert best["epoch"] < NAN_EPOCH and str(best["epoch"]) == tags[names.TAG_BEST_EPOCH]
    kept = f"the best checkpoint (epoch {best['epoch']}) is kept in the run as {names.checkpoint_file(best['epoch'])}"
    assert kept in line
    model = keras.models.load_model(checkpoint_file)
    dataset = load_dataset(str(MNIST_SMALL))
    _, _, x_val, y_val = split_validation(dataset.x_train, dataset.y_train, 0.2)
    probabilities = keras.ops.convert_to_numpy(model(x_val, training=False))
    assert probabilities.shape == (len(x_val), 10) and np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    accuracy = float((probabilities.argmax(1) == y_val.argmax(1)).mean())
    assert accuracy == pytest.approx(best["val_accuracy"], abs=1e-6)  # the checkpoint of that epoch
    # a diverged run logs no model, only its good epochs' checkpoints
    models = client.search_logged_models([run.info.experiment_id])
    assert {model.name for model in models} == {names.CHECKPOINT_MODEL_NAME}
    assert {model.tags[names.MODEL_TAG_EPOCH] for model in models} >= {str(best["epoch"])}


# Trainings started together on a new store. Without the lock of pipeline.tracking.store.prepare_sqlite_store,
# at least one of the three crashed in each of two tries here (and 15 of 16 `compare` processes started
# four at a time).
TRAININGS = 3


def _waiting_for_flock(directory: Path) -> set[int]:
    """The processes waiting for a flock on `directory`: Linux's /proc/locks lists each blocked request as
    `N: -> FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> ...`."""
    status = directory.stat()
    inode = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    waiting = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1:3] == ["->", "FLOCK"] and fields[6] == inode:
            waiting.add(int(fields[5]))
    return waiting


def test_trainings_creating_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """Every process that opens a new SQLite store first creates its tables; done at once, MLflow's
    migrations collide (alembic: "Online migration expected to match one row ... 0 found", "table
    _alembic_tmp_experiments already exists").

    The moment is forced from outside: the test holds the store's lock (a flock on its directory) until every
    training waits for it, with no store created yet, then lets them all go at once."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lock = os.open(tmp_path, os.O_RDONLY)
    processes: list[subprocess.Popen] = []
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "mlflow_project", "train", "--epochs", "1", *SMALL, "--hidden-units", "16"],
                cwd=tmp_path, env=project_env(MLFLOW_TRACKING_URI=store), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )
            for _ in range(TRAININGS)
        ]
        deadline = time.monotonic() + 240
        while (waiting := _waiting_for_flock(tmp_path)) != {process.pid for process in processes}:
            exited = [process.pid for process in processes if process.poll() is not None]
            assert not exited and time.monotonic() < deadline, f"waiting {waiting}, exited without waiting {exited}"
            time.sleep(0.05)
        assert not (tmp_path / "mlflow.db").exists()  # nobody opened the store before taking the lock
    except BaseException:
        for process in processes:
            process.kill()
            process.wait()
        raise
    finally:
        os.close(lock)  # all three go
    errors = [process.communicate(timeout=240)[1] for process in processes]
    for process, err in zip(processes, errors, strict=True):
        assert process.returncode == 0 and "Traceback" not in err, err[-3000:]
    runs = _all_runs(MlflowClient(store))
    assert len(runs) == TRAININGS and {run.info.status for run in runs} == {"FINISHED"}
    # ... and left in SQLite's write-ahead-log mode, where a sweep's workers do not queue behind each other's reads
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
