"""Fault injection against a real tracking server: stopped and restarted mid-run, never back, slow,
and four trainings at once; and no secret in anything a run recorded."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.experiments.registry import Registration, register_best_run
from pipeline.experiments.runs import Ranking
from pipeline.tracking.training_state import TrainingState
from tests.helpers import MNIST_SMALL, cli_options, project_env

pytestmark = pytest.mark.slow


class TrainingProcess:
    """`python -m mlflow_project train ...` as a real process whose console lines are read live."""

    def __init__(self, env: dict[str, str], cwd: Path, *args: str) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow_project", "train", *args],
            cwd=cwd, env=project_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def epochs_printed(self) -> int:
        return sum(1 for line in self.lines if line.startswith("Epoch ") and "loss=" in line)

    def wait_for_epochs(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.epochs_printed < count:
            assert self.process.poll() is None, self.finish()
            assert time.monotonic() < deadline, "training did not progress"
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        stderr = self.process.stderr.read()
        self.process.wait(timeout)
        self._reader.join(10)
        return self.process.returncode, stderr

    @property
    def run_id(self) -> str:
        return next(line.split()[1].rstrip(":") for line in self.lines if line.startswith("Run "))


def _args(**values: str) -> list[str]:
    base = {"dataset": str(MNIST_SMALL), "hidden_units": "64", "target_accuracy": "0", "es_patience": "100"}
    return cli_options(base | values)


def _assert_every_epoch_once(client: MlflowClient, run_id: str, epochs: int) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in names.EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(epochs)), key
    assert int(run.data.metrics[names.EPOCHS_COMPLETED]) == epochs
    assert names.TEST_ACCURACY in run.data.metrics


def test_server_stopped_and_restarted_mid_run_loses_nothing(server_store, tmp_path):
    epochs = 30
    training = TrainingProcess(server_store.client_environment(), tmp_path, *_args(epochs=str(epochs), batch_size="16"))
    training.wait_for_epochs(3)
    server_store.stop()
    down_at = training.epochs_printed
    training.wait_for_epochs(down_at + 4)  # training goes on while the server is down
    server_store.start()
    code, stderr = training.finish()
    assert code == 0, stderr
    assert training.epochs_printed == epochs
    console = training.lines + stderr.splitlines()
    assert any("Tracking store unreachable" in line for line in console)  # the outage was noticed...
    assert any("reachable again" in line for line in console)
    client = MlflowClient(server_store.uri)
    _assert_every_epoch_once(client, training.run_id, epochs)  # ...and nothing was lost or doubled
    assert client.get_run(training.run_id).data.tags[names.TAG_STOP_REASON] == names.STOP_COMPLETED


def test_server_never_back_finishes_training_and_keeps_local_copies(server_store, tmp_path):
    training = TrainingProcess(
        server_store.client_environment() | {"MNIST_PIPELINE_FLUSH_TIMEOUT": "5", "HOME": str(tmp_path)},
        tmp_path, *_args(epochs="12", batch_size="32"),
    )
    training.wait_for_epochs(2)
    server_store.stop()
    started = time.monotonic()
    code, stderr = training.finish()
    assert code == 1
    assert training.epochs_printed == 12  # training still finished
    assert time.monotonic() - started < 120
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    # the line names the first five unsent records in queue order (checkpoints and their model links may come
    # first) and counts the rest; the whole list is in the rescue directory, whose unsent metrics are checked below
    assert "not recorded: " in lines[0] and ("metrics/tags" in lines[0] or "; and " in lines[0]), lines[0]
    [rescue] = (tmp_path / ".cache" / "mnist-pipeline" / "unrecorded").iterdir()
    assert str(rescue) in lines[0]
    assert (rescue / names.BEST_MODEL_FILE).stat().st_size > 0
    assert (rescue / names.MODEL_NAME / "MLmodel").exists()
    assert (rescue / names.TRAINING_LOG_FILE).read_text().count("\n") == 13
    pending = json.loads((rescue / "unsent" / "pending_records.json").read_text())
    [test_accuracy] = [record["value"] for record in pending if record.get("metric") == names.TEST_ACCURACY]
    # the unsent value is the test accuracy of the rescued best checkpoint, computed here from the raw test split
    assert test_accuracy == pytest.approx(_test_accuracy(rescue / names.BEST_MODEL_FILE), abs=1e-6)
    for epoch in (10, 11):  # both state slots, each with the last state of its epochs' parity
        assert TrainingState.load(rescue / "unsent" / "artifacts" / names.state_artifact(epoch)).epoch == epoch
    # nothing was lost: every epoch's loss is either in the store or among the unsent records
    # (the rescue directory is named after the run)
    server_store.start()
    stored = {metric.step for metric in MlflowClient(server_store.uri).get_metric_history(rescue.name, "loss")}
    unsent = {record["step"] for record in pending if record.get("metric") == "loss"}
    assert stored | unsent == set(range(12)), (stored, unsent)
    assert unsent, "the outage began at epoch 2: later epochs cannot all have been delivered"


def _test_accuracy(checkpoint: Path) -> float:
    """The accuracy of a saved Keras model on MNIST_SMALL's test split, as the pipeline loads it."""
    import keras
    import numpy as np

    from pipeline.training.data import load_dataset

    dataset = load_dataset(str(MNIST_SMALL))
    predicted = keras.models.load_model(checkpoint).predict(dataset.x_test, verbose=0).argmax(axis=1)
    return float(np.mean(predicted == dataset.y_test.argmax(axis=1)))


class _SlowProxy(socketserver.ThreadingTCPServer):
    """A TCP proxy on loopback that delays every chunk it forwards: a slow network to a real server."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target, self.delay = target, delay
        super().__init__(("127.0.0.1", 0), _SlowProxyHandler)


class _SlowProxyHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        upstream = socket.create_connection(self.server.target)

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(65536):
                    time.sleep(self.server.delay)
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for end in (source, sink):
                    with contextlib.suppress(OSError):
                        end.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=pump, args=(upstream, self.request), daemon=True)
        back.start()
        pump(self.request, upstream)
        back.join()
        upstream.close()


def test_a_server_that_falls_behind_loses_no_metric_and_the_run_says_so(server_store, tmp_path):
    """Every chunk delayed 0.05 s (each request at least 0.1 s there and back): a 3 MB state takes seconds to
    send, far past a 1 s `behind` bound, while an epoch takes about one."""
    with _SlowProxy((server_store.host, server_store.port), delay=0.05) as proxy:
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        env = server_store.client_environment() | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{proxy.server_address[1]}",
                                                   "MNIST_PIPELINE_BEHIND_SECONDS": "1"}
        training = TrainingProcess(env, tmp_path, *_args(epochs="4", batch_size="64"))
        code, stderr = training.finish()
        proxy.shutdown()
    assert code == 0, stderr
    client = MlflowClient(server_store.uri)
    _assert_every_epoch_once(client, training.run_id, 4)
    console = "\n".join(training.lines)
    # each backlog said once as it starts and once as it is sent (the queue may empty between epochs)
    behind, caught_up = console.count("s behind this training ("), console.count("Tracking store caught up after ")
    assert behind >= 1 and caught_up == behind, console[-3000:]
    # said as soon as a record had waited the 1 s asked for, not the 30 s default (the slow uploads wait longer)
    first_wait = int(re.search(r"Tracking store is (\d+) s behind this training", console).group(1))
    assert first_wait < 30, console[-3000:]
    assert float(client.get_run(training.run_id).data.tags[names.TAG_RECORDING_MAX_LAG]) > 1


def test_four_trainings_at_once_and_a_concurrent_register(server_store, tmp_path):
    client = MlflowClient(server_store.uri)
    experiment = f"load-{time.time_ns()}"
    configs = [
        {"hidden_units": units, "seed": seed, "epochs": str(epochs)}
        for units, seed, epochs in (("16", "1", "2"), ("32", "2", "3"), ("48", "3", "2"), ("64", "4", "3"))
    ]
    trainings = [
        TrainingProcess(server_store.client_environment(), tmp_path, *_args(**config), "--experiment-name", experiment)
        for config in configs
    ]
    results = [training.finish() for training in trainings]
    assert [code for code, _ in results] == [0, 0, 0, 0], [stderr[-2000:] for _, stderr in results]
    for training, config in zip(trainings, configs, strict=True):
        run = client.get_run(training.run_id)
        assert (run.data.params["hidden_units"], run.data.params["seed"]) == (config["hidden_units"], config["seed"])
        _assert_every_epoch_once(client, training.run_id, int(config["epochs"]))
        summary = client.download_artifacts(training.run_id, names.MODEL_SUMMARY_FILE, str(tmp_path / run.info.run_id))
        assert f"(None,{config['hidden_units']})" in Path(summary).read_text().replace(" ", "")  # its own model

    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    model_name = f"load-model-{time.time_ns()}"
    registrations: list[Registration | None] = [None] * 3
    failures: list[BaseException | None] = [None] * 3

    def register(index: int) -> None:
        try:
            registrations[index] = register_best_run(
                MlflowClient(server_store.uri), experiment_id, model_name, Ranking()
            )
        except BaseException as error:  # noqa: BLE001 - surfaced by the assertion below
            failures[index] = error

    threads = [threading.Thread(target=register, args=(index,), daemon=True) for index in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a register call did not return within 120 s"
    assert failures == [None] * 3, failures
    # The best run, ranked here by the README's rule: highest test_accuracy, ties to the lower test_loss,
    # then to the earlier run; from the experiment's search, as every client ranks them.
    runs = client.search_runs([experiment_id])
    assert sorted(run.info.run_id for run in runs) == sorted(training.run_id for training in trainings)
    ranked = sorted(
        runs, key=lambda run: (-run.data.metrics[names.TEST_ACCURACY], run.data.metrics[names.TEST_LOSS],
                               run.info.start_time, run.info.run_id),
    )
    best = ranked[0].info.run_id
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert len(versions) == 1
    [version] = versions
    models = {model.source_run_id: str(model.status) for model in client.search_logged_models([experiment_id])}
    assert version.run_id == best, [  # each run as searched, as read one by one, and its logged model's status
        (run.info.run_id, run.info.start_time, run.data.metrics[names.TEST_ACCURACY],
         run.data.metrics[names.TEST_LOSS], client.get_run(run.info.run_id).data.metrics[names.TEST_ACCURACY],
         models.get(run.info.run_id))
        for run in ranked
    ]
    assert client.get_registered_model(model_name).aliases == {names.CHAMPION_ALIAS: version.version}
    # every process registered that run, agrees on its one version and on the champion; one of them created it
    assert all(isinstance(registration, Registration) for registration in registrations), registrations
    assert {(r.model_name, r.run_id, str(r.version), str(r.champion_version), r.dry_run) for r in registrations} == {
        (model_name, best, str(version.version), str(version.version), False)
    }
    assert sorted(r.created for r in registrations) == [False, False, True], registrations

    # No secret anywhere a run recorded: params, tags, metrics' names, artifacts, console output.
    password = server_store.password
    for training, (_, stderr) in zip(trainings, results, strict=True):
        run = client.get_run(training.run_id)
        recorded = json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
        assert password not in recorded
        assert password not in "\n".join(training.lines) + stderr
    # every stored artifact of every run, the logged models' files included
    for path in server_store.artifacts_dir.rglob("*"):
        if path.is_file():
            assert password.encode() not in path.read_bytes(), path


def test_a_run_that_loses_the_race_to_create_its_dataset_links_the_one_created(server_store, database_uri):
    # Trainings starting together on one dataset race to create its entity: the server checks that the
    # dataset is not there, then inserts it. Forced here: an open transaction holds the same dataset's row,
    # so the server's insert waits on it; the transaction commits, and the server's insert fails with the
    # unique violation a losing run gets.
    import mlflow
    import psycopg2

    from pipeline.training.data import load_dataset
    from pipeline.training.run_header import log_run_header

    if not database_uri.startswith("postgresql"):
        pytest.fail("this race needs the PostgreSQL backend store")
    client = MlflowClient(server_store.uri)
    experiment_id = client.create_experiment(f"dataset-race-{time.time_ns()}")
    dataset = load_dataset(str(MNIST_SMALL))
    holder = psycopg2.connect(_libpq_uri(database_uri))
    try:
        with holder.cursor() as cursor:
            cursor.execute(
                "INSERT INTO datasets (dataset_uuid, experiment_id, name, digest, dataset_source_type, dataset_source)"
                " VALUES (%s, %s, %s, %s, 'local', %s)",
                (uuid.uuid4().hex, int(experiment_id), dataset.name, dataset.digest, dataset.source),
            )
        failure: list[BaseException] = []
        run_ids: list[str] = []

        def header() -> None:  # a run of its own, as a training process starts one
            try:
                with mlflow.start_run(experiment_id=experiment_id) as run:
                    run_ids.append(run.info.run_id)
                    log_run_header(client, run.info.run_id, {"epochs": "1"}, dataset)
            except BaseException as error:  # noqa: BLE001 - surfaced by the assertion below
                failure.append(error)

        thread = threading.Thread(target=header, daemon=True)
        thread.start()
        _wait_for_an_insert_waiting_on_a_lock(database_uri, "INSERT INTO datasets", thread)
        holder.commit()
        thread.join(60)
    finally:
        holder.close()
    assert not thread.is_alive() and failure == [], failure
    [run_id] = run_ids
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert [(item.dataset.name, item.dataset.digest) for item in inputs] == [(dataset.name, dataset.digest)]


def _libpq_uri(uri: str) -> str:
    return uri.replace("postgresql+psycopg2://", "postgresql://")


def _wait_for_an_insert_waiting_on_a_lock(database_uri: str, statement: str, thread: threading.Thread) -> None:
    """Waits (at most 60 s, while `thread` lives) until a session of the database waits on a lock in a
    statement starting with `statement`."""
    import psycopg2

    watcher = psycopg2.connect(_libpq_uri(database_uri))
    watcher.autocommit = True
    deadline = time.monotonic() + 60
    try:
        with watcher.cursor() as cursor:
            while True:
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                               " AND starts_with(query, %s)", (statement,))
                if cursor.fetchone()[0]:
                    return
                assert thread.is_alive(), "the call ended before it waited on the lock"
                assert time.monotonic() < deadline, f"no {statement} waited on the lock within 60 s"
                time.sleep(0.05)
    finally:
        watcher.close()
