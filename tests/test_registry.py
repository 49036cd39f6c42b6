"""Compare and register: real training runs in the shared store, real processes, real serving.

A few small runs are trained once for the module (plus runs that must never be picked: a diverged
run, a finished "training" run without a model, a non-training run with a better metric and a
model); every test registers under its own model name, so the tests do not depend on each other.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import TrainingConfig
from pipeline.errors import ParameterError, RunSelectionError, TrainingDiverged
from pipeline.experiments.comparison import COLUMNS, compare_runs
from pipeline.experiments.registry import NEW_VERSION, register_best_run, register_run
from pipeline.experiments.registry_writes import create_registered_model
from pipeline.experiments.runs import Ranking, resolve_experiment, runs_frame, training_runs
from pipeline.training.data import load_dataset
from pipeline.training.run import run_training
from tests.helpers import (
    MNIST_SMALL,
    invoke,
    mlflow_project_run,
    models_serve,
    one_line_error,
    project_env,
    run_cli,
    run_cli_here,
)

pytestmark = pytest.mark.slow


@dataclasses.dataclass(frozen=True)
class Store:
    uri: str
    workdir: Path
    client: MlflowClient
    env: dict[str, str]  # what a child process needs to use the store (URI and credentials)


@dataclasses.dataclass(frozen=True)
class TrainedRuns:
    """The module's experiment: three finished training runs, and decoys."""

    experiment_id: str
    experiment_name: str
    run_ids: tuple[str, ...]  # the finished training runs, in training order
    failed_run_id: str
    decoy_run_ids: tuple[str, ...]  # better metric, but no model / not a training run

    def best(self, client: MlflowClient) -> str:
        """The expected winner, computed here: highest test_accuracy, then lowest test_loss, then earliest."""
        runs = [client.get_run(run_id) for run_id in self.run_ids]
        return min(runs, key=lambda run: (
            -run.data.metrics[names.TEST_ACCURACY], run.data.metrics[names.TEST_LOSS], run.info.start_time
        )).info.run_id

    def worst(self, client: MlflowClient) -> str:
        runs = [client.get_run(run_id) for run_id in self.run_ids]
        return min(runs, key=lambda run: run.data.metrics[names.TEST_ACCURACY]).info.run_id


# Given, so that logging the stand-in skips MLflow's requirement inference (a model-loading subprocess, ~30 s).
STAND_IN_PIP = ["mlflow", "numpy"]


class ConstantModel(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return np.zeros((len(model_input), 10))


def _model_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def store(shared_tracking: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("selection")
    uri = shared_tracking["MLFLOW_TRACKING_URI"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        for name, value in shared_tracking.items():
            patch.setenv(name, value)
        mlflow.set_tracking_uri(uri)
        yield Store(uri, workdir, MlflowClient(uri), shared_tracking)
        mlflow.set_tracking_uri(None)


def _config(**values: str) -> TrainingConfig:
    return TrainingConfig.from_values({"dataset": str(MNIST_SMALL), "target_accuracy": "0"} | values)


@pytest.fixture(scope="module")
def trained(store: Store) -> TrainedRuns:
    name = _model_name("selection")
    experiment_id = store.client.create_experiment(name)
    configs = (
        _config(hidden_units="32", epochs="2", learning_rate="0.003"),
        _config(hidden_units="16", epochs="1", learning_rate="0.001"),
        _config(hidden_units="64", epochs="3", learning_rate="0.003"),
    )
    run_ids = tuple(run_training(config, experiment_name=name).run_id for config in configs)
    with pytest.raises(TrainingDiverged):
        run_training(_config(hidden_units="16", learning_rate="1e30"), experiment_name=name)
    [failed] = store.client.search_runs([experiment_id], "attributes.status = 'FAILED'")
    # A finished training run with the best metric but no model, and a model with the best metric
    # in a run that is not a training run: neither may ever be registered or compared.
    no_model = store.client.create_run(experiment_id, tags={names.TAG_RUN_TYPE: names.RUN_TYPE_TRAINING})
    store.client.log_metric(no_model.info.run_id, names.TEST_ACCURACY, 0.999)
    store.client.set_terminated(no_model.info.run_id, "FINISHED")
    with mlflow.start_run(experiment_id=experiment_id, tags={names.TAG_RUN_TYPE: names.RUN_TYPE_COMPARISON}) as other:
        mlflow.log_metric(names.TEST_ACCURACY, 1.0)
        mlflow.pyfunc.log_model(name=names.MODEL_NAME, python_model=ConstantModel(), pip_requirements=STAND_IN_PIP)
    return TrainedRuns(experiment_id, name, run_ids, failed.info.run_id, (no_model.info.run_id, other.info.run_id))


def _versions(client: MlflowClient, model_name: str) -> list:
    return sorted(client.search_model_versions(f"name = '{model_name}'"), key=lambda v: int(v.version))


def _champion(client: MlflowClient, model_name: str) -> str | None:
    version = client.get_registered_model(model_name).aliases.get(names.CHAMPION_ALIAS)
    return None if version is None else str(version)


# --- register -----------------------------------------------------------------------------------


def test_register_picks_the_best_finished_run_and_tags_its_version(store, trained):
    client, model_name = store.client, _model_name("pick")
    registration = register_best_run(client, trained.experiment_id, model_name, Ranking())

    best = client.get_run(trained.best(client))
    assert registration.run_id == best.info.run_id
    assert registration.created and registration.champion_moved
    [version] = _versions(client, model_name)
    assert str(version.version) == registration.version == registration.champion_version
    assert _champion(client, model_name) == registration.version
    assert version.run_id == best.info.run_id
    assert version.tags[names.TAG_VERSION_RUN_ID] == best.info.run_id
    assert version.tags[names.TAG_DATASET_DIGEST] == best.data.tags[names.TAG_DATASET_DIGEST]
    assert float(version.tags[names.TEST_ACCURACY]) == best.data.metrics[names.TEST_ACCURACY]
    assert float(version.tags[names.TEST_LOSS]) == best.data.metrics[names.TEST_LOSS]
    assert "there was no champion" in registration.reason
    # the registered version loads and predicts like the run's model
    x_test = load_dataset(str(MNIST_SMALL)).x_test[:20]
    registered = mlflow.pyfunc.load_model(f"models:/{model_name}@{names.CHAMPION_ALIAS}").predict(x_test)
    logged = mlflow.pyfunc.load_model(f"runs:/{best.info.run_id}/model").predict(x_test)
    np.testing.assert_allclose(registered, logged, atol=1e-6)


def test_registering_the_same_run_again_makes_no_new_version(store, trained):
    client, model_name = store.client, _model_name("again")
    first = register_best_run(client, trained.experiment_id, model_name, Ranking())
    second = register_best_run(client, trained.experiment_id, model_name, Ranking())
    third = register_run(client, first.run_id, model_name)
    assert not second.created and not third.created
    assert first.version == second.version == third.version
    assert len(_versions(client, model_name)) == 1
    assert "already points at" in second.reason and not second.champion_moved


def test_a_worse_run_never_demotes_the_champion_and_says_why(store, trained):
    client, model_name = store.client, _model_name("keep")
    champion = register_best_run(client, trained.experiment_id, model_name, Ranking())
    worse = register_run(client, trained.worst(client), model_name)
    assert worse.created and worse.version != champion.version
    assert not worse.champion_moved
    assert worse.champion_version == champion.version == _champion(client, model_name)
    assert f"stays at version {champion.version}" in worse.reason and "does not beat it" in worse.reason
    assert len(_versions(client, model_name)) == 2


def test_a_better_run_takes_the_champion_over(store, trained):
    client, model_name = store.client, _model_name("better")
    worse = register_run(client, trained.worst(client), model_name)
    better = register_best_run(client, trained.experiment_id, model_name, Ranking())
    assert worse.champion_moved and better.champion_moved
    assert _champion(client, model_name) == better.version != worse.version
    assert f"it beats version {worse.version}" in better.reason


def test_dry_run_shows_the_decision_and_writes_nothing(store, trained):
    client, model_name = store.client, _model_name("dry")
    plan = register_best_run(client, trained.experiment_id, model_name, Ranking(), dry_run=True)
    assert plan.dry_run and plan.created and plan.version == NEW_VERSION
    assert plan.run_id == trained.best(client)
    assert "would move to a new version" in plan.reason
    assert not client.search_registered_models(f"name = '{model_name}'")

    register_run(client, trained.worst(client), model_name)
    plan = register_best_run(client, trained.experiment_id, model_name, Ranking(), dry_run=True)
    assert "would move" in plan.reason and plan.champion_moved
    assert len(_versions(client, model_name)) == 1 and _champion(client, model_name) == "1"


def test_ranking_breaks_ties_by_lower_test_loss_then_the_earlier_run(store, tmp_path):
    client = store.client
    experiment_id = client.create_experiment(_model_name("ties"))

    def run(accuracy: float, loss: float) -> str:
        created = client.create_run(experiment_id, tags={names.TAG_RUN_TYPE: names.RUN_TYPE_TRAINING})
        client.log_metric(created.info.run_id, names.TEST_ACCURACY, accuracy)
        client.log_metric(created.info.run_id, names.TEST_LOSS, loss)
        client.set_terminated(created.info.run_id, "FINISHED")
        time.sleep(0.01)  # distinct start times
        return created.info.run_id

    early_tie, lower_loss, late_tie, worse = run(0.9, 0.3), run(0.9, 0.2), run(0.9, 0.3), run(0.8, 0.1)
    runs = training_runs(client, experiment_id)
    ranked = [r.info.run_id for r in Ranking().best_first(runs)]
    assert ranked == [lower_loss, early_tie, late_tie, worse]
    by_loss = [r.info.run_id for r in Ranking(names.TEST_LOSS, "min").best_first(runs)]
    assert by_loss == [worse, lower_loss, early_tie, late_tie]
    # the same rule on mlflow.search_runs' DataFrame (compare and sweep tables)
    frame = runs_frame(client, experiment_id, "")
    assert list(Ranking().sort(frame)["run_id"]) == ranked
    assert list(Ranking(names.TEST_LOSS, "min").sort(frame)["run_id"]) == by_loss


def test_non_training_runs_are_never_candidates(store, trained):
    client = store.client
    candidates = {run.info.run_id for run in training_runs(client, trained.experiment_id)}
    assert set(trained.run_ids) <= candidates
    assert trained.decoy_run_ids[1] not in candidates  # a model and test_accuracy=1.0, but not training
    assert trained.failed_run_id not in candidates
    registration = register_best_run(client, trained.experiment_id, _model_name("decoys"), Ranking())
    assert registration.run_id in trained.run_ids  # not the model-less 0.999 run either


def test_register_with_nothing_to_register_exits_2_in_one_line(store, tmp_path):
    empty = _model_name("empty")
    store.client.create_experiment(empty)
    result = run_cli(["register", "--experiment-name", empty], cwd=tmp_path, timeout=120,
                     **store.env)
    assert result.returncode == 2, result.stderr
    one_line_error(result, f"experiment {empty!r} has no finished training run")

    model_less = _model_name("model-less")
    experiment_id = store.client.create_experiment(model_less)
    run = store.client.create_run(experiment_id, tags={names.TAG_RUN_TYPE: names.RUN_TYPE_TRAINING})
    store.client.set_terminated(run.info.run_id, "FINISHED")
    with pytest.raises(RunSelectionError, match="none of the 1 finished training runs .* has a logged model 'model'"):
        register_best_run(store.client, experiment_id, _model_name("none"), Ranking())
    with pytest.raises(RunSelectionError, match="experiment 'no-such-experiment' does not exist"):
        resolve_experiment(store.client, "no-such-experiment")


@pytest.fixture(scope="module")
def project_registration(store: Store, trained: TrainedRuns) -> subprocess.CompletedProcess:
    """`mlflow run . -e register` on the module's experiment: mnist-mlp@champion, served below."""
    return mlflow_project_run("register", {}, trained.experiment_name, store.workdir, store.env)


def test_mlflow_run_register_records_its_decision_in_a_registration_run(store, trained, project_registration):
    client = store.client
    assert project_registration.returncode == 0, project_registration.stderr[-3000:]
    best = trained.best(client)
    version = client.get_model_version_by_alias("mnist-mlp", names.CHAMPION_ALIAS)
    assert version.run_id == best
    assert f"for run {best}" in project_registration.stdout
    assert "models:/mnist-mlp@champion" in project_registration.stdout
    [registration_run] = client.search_runs(
        [trained.experiment_id], f"tags.{names.TAG_RUN_TYPE} = '{names.RUN_TYPE_REGISTRATION}'"
    )
    tags = registration_run.data.tags
    assert registration_run.info.status == "FINISHED"
    assert tags[names.TAG_REGISTERED_MODEL] == "mnist-mlp"
    assert tags[names.TAG_REGISTERED_RUN_ID] == best
    assert tags[names.TAG_REGISTERED_VERSION] == tags[names.TAG_CHAMPION_VERSION] == str(version.version)
    assert tags[names.TAG_REGISTRATION_DECISION].startswith("mnist-mlp@champion")
    assert registration_run.data.params == {"model_name": "mnist-mlp", "metric": "test_accuracy", "mode": "max",
                                            "dry_run": "false", "change_rule": "false"}
    # the registration run is not a training run: the candidates are unchanged
    finished = {run.info.run_id for run in training_runs(client, trained.experiment_id)}
    assert registration_run.info.run_id not in finished


# A process that registers: `register` through the CLI, or one run through register_run. It imports everything,
# says it is ready and waits for the signal to go, so that all of them reach the registry within a second or two.
_RACER = """
import sys, time
from pathlib import Path
import mlflow.tracking, pipeline.experiments.registry
from mlflow_project.cli import cli
signals, me, mode, *args = sys.argv[1:]
(Path(signals) / f"ready-{me}").touch()
while not (Path(signals) / "go").exists():
    time.sleep(0.005)
if mode == "cli":
    cli(args)
else:
    run_id, model_name = args
    registration = pipeline.experiments.registry.register_run(mlflow.tracking.MlflowClient(), run_id, model_name)
    print(registration.version, registration.champion_version)
"""


def _connect(database_uri: str):
    import psycopg2

    return psycopg2.connect(database_uri.replace("postgresql+psycopg2://", "postgresql://"))


def _creating_a_version(cursor) -> int:
    """How many connections to the test's database wait for a lock to create a model version: MLflow's
    create_model_version updates the registered model's row, then inserts the version (PostgreSQL's own view)."""
    cursor.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
        "AND (query LIKE 'INSERT INTO model_versions %' OR query LIKE 'UPDATE registered_models %')"
    )
    return cursor.fetchone()[0]


# The racers' create requests wait at the server while the test holds the table, until the last racer is there too:
# on a loaded machine that took longer than the 3 x 30 s MLflow's client waits here (a racer failed with
# ReadTimeoutError in a CI run). Re-sent requests have their own test:
# test_a_create_the_client_re_sent_leaves_one_version_even_when_its_first_copy_lands_last.
WAIT_FOR_THE_LOCK = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "400"}


def _exited(processes: list[subprocess.Popen]) -> list[tuple[list[str], str]]:
    """The racers that exited already, each with the end of what it wrote to stderr."""
    return [(process.args[5:], process.communicate()[1][-2000:]) for process in processes if process.poll() is not None]


@pytest.mark.timeout(600)  # five processes' start-up on a loaded 2-core machine, then the race
def test_concurrent_registers_leave_one_version_per_run_and_the_best_champion(store, trained, database_uri, tmp_path):
    """Five processes create versions of one model at the same moment: the race is forced by holding MLflow's
    model_versions table locked (PostgreSQL, the tracking server's backend store) until every one of them waits
    to insert its version, so each has already seen its run without a version. Three of them register the best
    run: two duplicates (at least) are created, and must be deleted."""
    if not database_uri.startswith("postgresql"):
        pytest.skip("the race is forced with a PostgreSQL lock (MNIST_TESTS_WITHOUT_POSTGRES=1)")
    client, model_name = store.client, _model_name("race")
    best = trained.best(client)
    # the model exists, as the first registration leaves it: each racer goes straight to creating its version (one
    # that created the model itself would wait behind the held table in a request of its own)
    create_registered_model(client, model_name, Ranking())
    racers = [["cli", "register", "--experiment-name", trained.experiment_name, "--model-name", model_name]] * 2
    racers += [["run", run_id, model_name] for run_id in trained.run_ids]
    holder, monitor = _connect(database_uri), _connect(database_uri)
    monitor.autocommit = True
    processes: list[subprocess.Popen] = []
    try:
        # EXCLUSIVE: reads go on (each racer finds no version of its run), every insert waits
        holder.cursor().execute("LOCK TABLE model_versions IN EXCLUSIVE MODE")
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", _RACER, str(tmp_path), str(number), *args], cwd=tmp_path,
                env=project_env(**store.env, **WAIT_FOR_THE_LOCK), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )
            for number, args in enumerate(racers)
        ]
        deadline = time.monotonic() + 300
        while len(list(tmp_path.glob("ready-*"))) < len(racers):
            exited = _exited(processes)
            assert not exited and time.monotonic() < deadline, exited
            time.sleep(0.05)
        (tmp_path / "go").touch()
        watching = monitor.cursor()
        while (waiting := _creating_a_version(watching)) < len(racers):
            exited = _exited(processes)
            assert not exited and time.monotonic() < deadline, (waiting, exited)
            time.sleep(0.05)
        holder.commit()  # all five go
        outputs = [process.communicate(timeout=120) for process in processes]
        for process, (_, stderr) in zip(processes, outputs, strict=True):
            assert process.returncode == 0, stderr[-3000:]

        # The race happened: each racer created a version, so the best run got three or more (MLflow's client may
        # also re-send a create that waited past its timeout). Each run keeps one; the others were deleted (MLflow
        # keeps a deleted version's row, its run id redacted).
        cursor = monitor.cursor()
        cursor.execute("SELECT run_id, version, current_stage FROM model_versions WHERE name = %s ORDER BY version",
                       (model_name,))
        created = cursor.fetchall()
    finally:
        holder.close()
        monitor.close()
        for process in processes:  # after a failure above
            if process.poll() is None:
                process.kill()
                process.wait()
    live = {run_id: str(version) for run_id, version, stage in created if stage != "Deleted_Internal"}
    deleted = sum(stage == "Deleted_Internal" for _, _, stage in created)
    assert len(created) >= len(racers) and deleted >= 2, created
    # ... and was handled: one version per run, the best champion, every racer told the surviving version
    versions = _versions(client, model_name)
    assert sorted(v.run_id for v in versions) == sorted(trained.run_ids)  # one version per run, no duplicate
    champion = client.get_model_version_by_alias(model_name, names.CHAMPION_ALIAS)
    surviving = {v.run_id: str(v.version) for v in versions}
    assert surviving == live and champion.run_id == best
    for (stdout, _), args in zip(outputs[2:], racers[2:], strict=True):
        assert stdout.split() == [surviving[args[1]], surviving[best]]
    for stdout, _ in outputs[:2]:
        assert f"{model_name} version {surviving[best]} " in stdout


class _HoldingProxy:
    """An HTTP proxy on loopback in front of the tracking server that holds the first `create model version`
    request it gets. MLflow's client, after MLFLOW_HTTP_REQUEST_TIMEOUT without an answer, sends it again; that copy
    goes through. The held one goes through only when the client, after that answer, looks for its run's versions a
    second time (`release`), or when the test releases it: so it creates its version after the client's first look
    for duplicates (a slow server that lands the first copy last)."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import http.server
        import threading

        target = urlsplit(upstream)
        self.creates = self.run_searches = 0
        self.answered, self.release, self.landed = threading.Event(), threading.Event(), threading.Event()
        lock, proxy = threading.Lock(), self

        class Forward(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                create = self.command == "POST" and self.path.endswith("/model-versions/create")
                with lock:
                    proxy.creates += create
                    held = create and proxy.creates == 1
                if held:
                    proxy.release.wait(120)
                upstream_connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream_connection.request(self.command, self.path, body, headers)
                response = upstream_connection.getresponse()
                data = response.read()
                upstream_connection.close()
                try:
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    self.wfile.flush()
                except OSError:  # the client gave up on the held request long ago
                    pass
                if held:
                    proxy.landed.set()
                elif create:
                    proxy.answered.set()
                elif proxy.answered.is_set() and "/model-versions/search" in self.path and "run_id" in unquote(
                    self.path
                ):
                    with lock:
                        proxy.run_searches += 1
                    if proxy.run_searches >= 2:
                        proxy.release.set()

            do_GET = do_POST = do_PATCH = do_DELETE = forward

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_create_the_client_re_sent_leaves_one_version_even_when_its_first_copy_lands_last(
    store, trained, database_uri, tmp_path
):
    """MLflow's HTTP client re-sends a create that got no answer within MLFLOW_HTTP_REQUEST_TIMEOUT; the server may
    create both copies, the first one last (forced by _HoldingProxy: after the register process's first look for
    duplicates). The process waits for the copies it sent and deletes the late one; a copy later still (after the
    process ended) is deleted by the next registration."""
    client, model_name = store.client, _model_name("resent")
    best = trained.best(client)
    register = ["register", "--experiment-name", trained.experiment_name, "--model-name", model_name]
    proxy = _HoldingProxy(store.uri)
    try:
        through_the_proxy = {"MLFLOW_TRACKING_URI": proxy.uri, "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
                             "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
        result = run_cli(register, cwd=tmp_path, timeout=180, **store.env | through_the_proxy)
        released_by_the_process = proxy.release.is_set()
        proxy.release.set()  # if the process did not wait for it, it lands now, after the process ended
        assert proxy.landed.wait(60), "the held copy never reached the server"
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr[-3000:]
    assert proxy.creates == 2  # one create call, its request sent twice by MLflow's client; both created a version
    [version] = _versions(client, model_name)  # one live version: the late copy was deleted
    assert released_by_the_process  # ... by the process that sent it, which waited for it
    assert version.run_id == best and _champion(client, model_name) == str(version.version)
    assert f"Registered {model_name} version {version.version} for run {best}" in result.stdout

    # A copy that lands after its process ended (beyond its wait): the next registration deletes it.
    client.create_model_version(model_name, source=version.source, run_id=best,
                                model_id=version.source.removeprefix("models:/"))
    assert run_cli(register, cwd=tmp_path, timeout=180, **store.env).returncode == 0
    assert [(v.run_id, v.version) for v in _versions(client, model_name)] == [(best, version.version)]
    if database_uri.startswith("postgresql"):  # MLflow keeps a deleted version's row
        monitor = _connect(database_uri)
        try:
            cursor = monitor.cursor()
            cursor.execute("SELECT version, current_stage FROM model_versions WHERE name = %s ORDER BY version",
                           (model_name,))
            assert [stage == "Deleted_Internal" for _, stage in cursor.fetchall()] == [False, True, True]
        finally:
            monitor.close()


# --- compare ------------------------------------------------------------------------------------


def test_compare_writes_the_table_the_plot_and_the_compare_view_url(store, trained, tmp_path):
    client = store.client
    output = tmp_path / "out"
    result = run_cli(
        ["compare", "--experiment-name", trained.experiment_name, "--top", "2", "--output-dir", str(output),
         "--log-run", "true"],
        cwd=tmp_path, timeout=120, **store.env,
    )
    assert result.returncode == 0, result.stderr
    # every training run counts, finished or not, with a model or not: the model-less 0.999 run leads
    training_ids = (*trained.run_ids, trained.failed_run_id, trained.decoy_run_ids[0])
    training = [client.get_run(run_id) for run_id in training_ids]
    expected = sorted(training, key=lambda run: -run.data.metrics.get(names.TEST_ACCURACY, -1))[:2]
    assert [run.info.run_id for run in expected] == [trained.decoy_run_ids[0], trained.best(client)]

    with open(output / names.COMPARISON_TABLE_FILE, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert tuple(rows[0]) == COLUMNS
    assert [row["run_id"] for row in rows] == [run.info.run_id for run in expected]
    for row, run in zip(rows, expected, strict=True):
        for param in ("learning_rate", "hidden_units", "epochs", "batch_size", "dropout"):
            assert row[param] == run.data.params.get(param, "")
        assert float(row[names.TEST_ACCURACY]) == run.data.metrics[names.TEST_ACCURACY]
        val_loss = run.data.metrics.get(names.VAL_LOSS)
        assert row[names.VAL_LOSS] == ("" if val_loss is None else repr(val_loss))
        assert row[names.TAG_STOP_REASON] == run.data.tags.get(names.TAG_STOP_REASON, "")
        assert run.info.run_id[:8] in result.stdout and f"{run.data.metrics[names.TEST_ACCURACY]:.4f}" in result.stdout
    assert rows[1][names.VAL_LOSS] and rows[1]["hidden_units"]  # the trained run has them all
    # the best epoch beside the last: the best val_accuracy of the history, and the epoch that reached it
    history = [m.value for m in sorted(client.get_metric_history(rows[1]["run_id"], names.VAL_ACCURACY),
                                        key=lambda m: m.step)]
    assert float(rows[1][names.BEST_VAL_ACCURACY]) == pytest.approx(max(history))
    assert int(rows[1][names.TAG_BEST_EPOCH]) == history.index(max(history))
    assert int(rows[1][names.EPOCHS_COMPLETED]) == len(history)

    from matplotlib.image import imread

    plot = output / names.COMPARISON_PLOT_FILE
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = imread(plot).shape
    assert width > 800 and height > 200

    [url] = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("Compare view: ")]
    parts = urlsplit(url)
    assert parts.fragment.startswith("/compare-runs?")
    query = parse_qs(parts.fragment.split("?", 1)[1])
    assert json.loads(query["runs"][0]) == [run.info.run_id for run in expected]
    assert json.loads(query["experiments"][0]) == [trained.experiment_id]

    # the comparison run holds the outputs, and is never compared or registered itself
    [logged] = client.search_runs(
        [trained.experiment_id],
        f"tags.{names.TAG_RUN_TYPE} = '{names.RUN_TYPE_COMPARISON}' and attributes.status = 'FINISHED'"
        f" and tags.{names.TAG_COMPARED_RUNS} != ''",
    )
    assert logged.data.tags[names.TAG_COMPARED_RUNS] == ",".join(run.info.run_id for run in expected)
    assert logged.data.tags[names.TAG_COMPARE_URL] == url
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} == {
        names.COMPARISON_TABLE_FILE, names.COMPARISON_PLOT_FILE
    }
    again = compare_runs(client, client.get_experiment(trained.experiment_id), "", 100, Ranking())
    assert logged.info.run_id not in again.run_ids
    assert set(again.run_ids) == set(trained.run_ids) | {trained.failed_run_id, trained.decoy_run_ids[0]}


def test_compare_filters_runs_and_refuses_a_bad_filter(store, trained):
    client = store.client
    experiment = client.get_experiment(trained.experiment_id)
    result = compare_runs(client, experiment, "params.hidden_units = '16' and attributes.status = 'FINISHED'",
                          10, Ranking())
    assert [client.get_run(run_id).data.params["hidden_units"] for run_id in result.run_ids] == ["16"]
    with pytest.raises(ParameterError, match="filter"):
        compare_runs(client, experiment, "params.hidden_units ==", 10, Ranking())
    with pytest.raises(RunSelectionError, match="no training run matching"):
        compare_runs(client, experiment, "params.hidden_units = '999'", 10, Ranking())


# --- main with register_as ----------------------------------------------------------------------


def test_mlflow_run_main_registers_the_run_it_trained(store):
    client, model_name = store.client, _model_name("trained-as")
    experiment = _model_name("register-as")
    client.create_experiment(experiment)
    result = mlflow_project_run(
        "main", {"epochs": "1", "hidden_units": "16", "dataset": str(MNIST_SMALL), "register_as": model_name},
        experiment, store.workdir, store.env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["register_as"] == model_name
    [version] = _versions(client, model_name)
    assert version.run_id == run.info.run_id
    assert _champion(client, model_name) == str(version.version)
    assert f"Registered {model_name} version {version.version} for run {run.info.run_id}" in result.stdout
    # a new model gets the default champion rule, stored with it
    assert client.get_registered_model(model_name).tags[names.TAG_CHAMPION_RULE] == Ranking().rule_text


# --- one champion rule per model ------------------------------------------------------------------


def _run_with_model(client: MlflowClient, experiment_id: str, accuracy: float, loss: float) -> str:
    """A finished training run with these test metrics and a logged model (no training needed)."""
    with mlflow.start_run(experiment_id=experiment_id, tags={names.TAG_RUN_TYPE: names.RUN_TYPE_TRAINING}) as run:
        mlflow.log_metrics({names.TEST_ACCURACY: accuracy, names.TEST_LOSS: loss})
        mlflow.pyfunc.log_model(name=names.MODEL_NAME, python_model=ConstantModel(), pip_requirements=STAND_IN_PIP)
    return run.info.run_id


def test_the_champion_follows_the_models_one_rule_whichever_command_registers(store, tmp_path, monkeypatch):
    """The first registration stores the rule; `train --register-as` and `register` keep to it; another rule is
    refused in one line (exit 2) unless change_rule=true, which re-picks the champion by the new rule."""
    client, model_name = store.client, _model_name("rule")
    # Two experiments, so that each `register` picks the run we want: the best by accuracy has a worse loss.
    by_accuracy, by_loss = _model_name("rule-accuracy"), _model_name("rule-loss")
    accurate = _run_with_model(client, client.create_experiment(by_accuracy), accuracy=0.99, loss=0.30)
    low_loss = _run_with_model(client, client.create_experiment(by_loss), accuracy=0.50, loss=0.01)

    def register(experiment: str, *options: str, process: bool = False) -> subprocess.CompletedProcess:
        """`python -m mlflow_project register ...`; in this process (the same command, without ~10 s of start-up
        on a loaded machine) unless `process`."""
        args = ["register", "--experiment-name", experiment, "--model-name", model_name, *options]
        return run_cli(args, cwd=tmp_path, timeout=120, **store.env) if process else run_cli_here(args, **store.env)

    def version_of(run_id: str) -> str:
        [version] = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
        return str(version.version)

    by_loss_rule = ("--metric", names.TEST_LOSS, "--mode", "min")
    for experiment in (by_loss, by_accuracy):  # the first registration sets the rule: test_loss min
        result = register(experiment, *by_loss_rule)
        assert result.returncode == 0, result.stderr[-3000:]
    assert _champion(client, model_name) == version_of(low_loss)

    # train --register-as ranks by the model's rule: the accurate run's higher test_accuracy does not win
    monkeypatch.chdir(tmp_path)
    trained = run_cli_here(["train", "--epochs", "1", "--hidden-units", "16", "--dataset", str(MNIST_SMALL),
                            "--target-accuracy", "0", "--experiment-name", by_loss, "--register-as", model_name],
                           **store.env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert len(_versions(client, model_name)) == 3
    assert _champion(client, model_name) == version_of(low_loss)
    assert f"{model_name}@champion stays at version {version_of(low_loss)}" in trained.stdout
    assert client.get_registered_model(model_name).tags[names.TAG_CHAMPION_RULE] == "test_loss min"

    # another rule (here the default one) is refused in one line, and changes nothing
    refused = register(by_accuracy, process=True)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert one_line_error(refused) == (
        f"error: registered model {model_name} picks its champion by 'test_loss min' (test_loss, lower is better), "
        "not by 'test_accuracy max': register with metric=test_loss mode=min, or with change_rule=true to pick it "
        "by 'test_accuracy max' from now on"
    )
    assert refused.stdout == ""
    assert len(_versions(client, model_name)) == 3 and _champion(client, model_name) == version_of(low_loss)
    # a dry run of the change says what would happen, and writes nothing
    plan = register(by_accuracy, "--change-rule", "true", "--dry-run", "true")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert f"{model_name}@champion would move to version {version_of(accurate)}" in plan.stdout
    assert f"{model_name}'s champion rule would change from 'test_loss min' to 'test_accuracy max'" in plan.stdout
    assert client.get_registered_model(model_name).tags[names.TAG_CHAMPION_RULE] == "test_loss min"
    assert _champion(client, model_name) == version_of(low_loss)

    # asked to: the rule changes, and the champion is re-picked among the existing versions by it
    changed = register(by_accuracy, "--change-rule", "true")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert client.get_registered_model(model_name).tags[names.TAG_CHAMPION_RULE] == "test_accuracy max"
    assert len(_versions(client, model_name)) == 3  # the accurate run was registered already
    assert _champion(client, model_name) == version_of(accurate)
    assert f"Run {accurate} is already {model_name} version {version_of(accurate)}" in changed.stdout
    assert f"{model_name}'s champion rule changed from 'test_loss min' to 'test_accuracy max'" in changed.stdout
    # ... and from now on the old rule is the other one, refused
    again = register(by_loss, *by_loss_rule)
    assert again.returncode == 2, again.stderr[-3000:]
    one_line_error(again, "picks its champion by 'test_accuracy max'")
    assert _champion(client, model_name) == version_of(accurate)


def test_a_model_without_a_stored_rule_has_the_default_one_and_a_bad_rule_is_named(store, tmp_path):
    client, model_name = store.client, _model_name("untagged")
    experiment = _model_name("untagged")
    _run_with_model(client, client.create_experiment(experiment), accuracy=0.9, loss=0.2)
    client.create_registered_model(model_name)  # by hand, or before the rule was stored: no tag

    def register(*options: str) -> subprocess.CompletedProcess:
        return run_cli_here(["register", "--experiment-name", experiment, "--model-name", model_name, *options],
                            **store.env)

    refused = register("--metric", names.TEST_LOSS, "--mode", "min")
    assert refused.returncode == 2
    one_line_error(refused, f"registered model {model_name} picks its champion by 'test_accuracy max'")
    assert names.TAG_CHAMPION_RULE not in client.get_registered_model(model_name).tags and not _versions(
        client, model_name)
    assert register().returncode == 0  # the default rule, now written
    assert client.get_registered_model(model_name).tags[names.TAG_CHAMPION_RULE] == "test_accuracy max"

    client.set_registered_model_tag(model_name, names.TAG_CHAMPION_RULE, "accuracy highest")  # edited by hand
    refused = register()
    assert refused.returncode == 2
    one_line_error(refused, f"registered model {model_name} has tag champion_rule='accuracy highest', which is not "
                            "a rule: allowed is '<metric> max' or '<metric> min'")
    changed = register("--change-rule", "true")
    assert changed.returncode == 0, changed.stderr
    assert "champion rule changed from 'accuracy highest' to 'test_accuracy max'" in changed.stdout
    assert client.get_registered_model(model_name).tags[names.TAG_CHAMPION_RULE] == "test_accuracy max"


# --- serving ------------------------------------------------------------------------------------


def test_the_champion_serves_with_the_runs_test_accuracy(store, trained, project_registration, tmp_path):
    assert project_registration.returncode == 0, project_registration.stderr[-3000:]
    dataset = load_dataset(str(MNIST_SMALL))
    with models_serve("models:/mnist-mlp@champion", tmp_path, project_env(**store.env)) as url:
        probabilities = invoke(url, dataset.x_test)
    assert probabilities.shape == (len(dataset.x_test), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == dataset.y_test.argmax(axis=1)))
    champion = store.client.get_model_version_by_alias("mnist-mlp", names.CHAMPION_ALIAS)
    test_accuracy = store.client.get_run(champion.run_id).data.metrics[names.TEST_ACCURACY]
    assert accuracy == pytest.approx(test_accuracy, abs=1e-6)
