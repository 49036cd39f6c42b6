"""The team tracking server, run natively as compose runs it: a real `mlflow server` process started by
docker/start-mlflow-server.sh, basic-auth on, artifacts proxied, the session's PostgreSQL database,
real `mlflow run` processes and real data."""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.tracking import MlflowClient

from mlflow_project.server import _announce
from pipeline import constants as names
from pipeline.config import TrainingConfig
from pipeline.experiments.runs import logged_models_by_run
from pipeline.tracking.process_group import signals_held
from pipeline.tracking.server import SERVER_SCRIPT, TrackingServer
from pipeline.tracking.server_stores import AdminCredentials, choose_backend_store
from pipeline.tracking.store import CREDENTIAL_VARIABLES
from tests.conftest import drop_database
from tests.helpers import (
    MNIST_SMALL,
    fail_fast_bound,
    live_processes_in_group,
    mlflow_project_run,
    project_env,
    run_cli,
    stdout_lines,
)
from tests.run_contract import EXPECTED_ARTIFACTS, assert_run_contract

TRAINED_VALUES = {"epochs": "2", "dataset": str(MNIST_SMALL), "lr_patience": "1"}
EXPERIMENT = "team-server"


def mlflow_run(server: TrackingServer, workdir: Path, params: dict[str, str], **environment: str):
    """`mlflow run . --env-manager local` against the server, as a user runs it; returns (result, seconds)."""
    started = time.monotonic()
    result = mlflow_project_run("main", params, EXPERIMENT, workdir, server.client_environment() | environment)
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def trained_run(tracking_server: TrackingServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The id of one training run made by `mlflow run` against the server, shared by the tests that read it."""
    workdir = tmp_path_factory.mktemp("mlflow-run")
    result, _ = mlflow_run(tracking_server, workdir, TRAINED_VALUES)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(workdir) == [], "the client kept something locally: artifacts must go through the server"
    [run_id] = re.findall(r"^Run (\w+): test_accuracy=", result.stdout, flags=re.MULTILINE)
    return run_id


@pytest.mark.slow
@pytest.mark.timeout(600)  # the shared `mlflow run` training may run in its set-up
def test_mlflow_run_against_the_server_records_the_whole_contract(server_store, trained_run, tmp_path):
    client = MlflowClient()
    run = client.get_run(trained_run)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    config = TrainingConfig.from_values(TRAINED_VALUES)
    # MLproject leaves the run option register_as out while it is empty: `mlflow run` logs no such param
    assert_run_contract(client, trained_run, config, tmp_path)
    # the server keeps the artifacts in its local artifact directory (compose: the S3 bucket)
    stored = {path.name for path in server_store.artifacts_dir.rglob("*") if path.is_file()}
    assert {names.BEST_MODEL_FILE, names.CLASSIFICATION_REPORT_FILE, names.TRAINING_LOG_FILE} <= stored


# One process of the race below: ready once it has reached the store, then, on "go", it activates the
# experiment (named by its argument, or when that is empty by MLFLOW_EXPERIMENT_NAME) and starts a run in
# it, as a training does.
_RACER = """
import pathlib, sys, time
import mlflow
from pipeline.tracking.store import use_experiment
name, ready, go = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
mlflow.MlflowClient().search_experiments(max_results=1)  # connected, so that the racers start level
ready.touch()
while not go.exists():
    time.sleep(0.001)
use_experiment(name or None)
with mlflow.start_run() as run:
    print(run.info.run_id)
"""


@pytest.mark.timeout(120)
def test_processes_creating_one_new_experiment_at_once_all_run_in_it(server_store, tmp_path):
    racers, name, go = 4, f"race-{uuid.uuid4().hex}", tmp_path / "go"
    processes = [
        subprocess.Popen(
            # half of them name the experiment, half leave it to MLFLOW_EXPERIMENT_NAME
            [sys.executable, "-c", _RACER, name if index % 2 else "", str(tmp_path / f"ready-{index}"), str(go)],
            env=project_env(**server_store.client_environment(), MLFLOW_EXPERIMENT_NAME=name),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for index in range(racers)
    ]
    deadline = time.monotonic() + 90
    while len(list(tmp_path.glob("ready-*"))) < racers:
        assert time.monotonic() < deadline, "the racers did not start"
        time.sleep(0.05)
    go.touch()
    outputs = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0] * racers, [err[-1500:] for _, err in outputs]
    client = MlflowClient(server_store.uri)
    experiment_id = client.get_experiment_by_name(name).experiment_id
    runs = {run.info.run_id for run in client.search_runs([experiment_id])}
    assert runs == {out.split()[0] for out, _ in outputs}  # no run went to the Default experiment


@pytest.mark.slow
def test_the_api_refuses_requests_without_the_right_credentials(tracking_server):
    search = f"{tracking_server.uri}/api/2.0/mlflow/experiments/search"
    artifacts = f"{tracking_server.uri}/api/2.0/mlflow-artifacts/artifacts"
    admin = (tracking_server.username, tracking_server.password)
    wrong = (tracking_server.username, tracking_server.password + "x")
    assert requests.get(search, params={"max_results": 1}, timeout=30).status_code == 401
    assert requests.get(search, params={"max_results": 1}, auth=wrong, timeout=30).status_code == 401
    assert requests.get(artifacts, timeout=30).status_code == 401
    assert requests.get(search, params={"max_results": 1}, auth=admin, timeout=30).status_code == 200
    # the health check needs no credentials (compose and the launcher poll it)
    assert requests.get(f"{tracking_server.uri}/health", timeout=30).status_code == 200


# README: a server that refuses the credentials fails the command in one line before any training,
# after one request with a 10 s timeout (pipeline.tracking.store.check_tracking_store): tests.helpers.fail_fast_bound.


@functools.cache
def _start_up_seconds() -> float:
    """How long starting Python and importing MLflow and TensorFlow takes on this machine: what a command does
    before it asks the server, measured (once for the module's tests, which run in a row on one worker) so that
    the bound is on the rest."""
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", "import mlflow, tensorflow"], cwd=tempfile.gettempdir(), env=project_env(),
        check=True, capture_output=True, timeout=300,
    )
    return time.monotonic() - started


@pytest.mark.slow
def test_training_with_a_wrong_password_fails_fast_in_one_line(server_store, tmp_path):
    experiment = f"wrong-password-{uuid.uuid4().hex[:6]}"
    start_up = _start_up_seconds()
    started = time.monotonic()
    result = run_cli(
        ["train", "--epochs", "1", "--dataset", str(MNIST_SMALL), "--experiment-name", experiment],
        cwd=tmp_path,
        timeout=300,
        **(server_store.client_environment() | {"MLFLOW_TRACKING_PASSWORD": "not-the-password"}),
    )
    assert time.monotonic() - started < fail_fast_bound(start_up), start_up
    assert "Epoch" not in result.stdout  # before any training
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: tracking server {server_store.uri} refused the credentials (HTTP 401); check {CREDENTIAL_VARIABLES}"
    ]
    assert mlflow.get_experiment_by_name(experiment) is None


@pytest.mark.slow
def test_mlflow_run_with_a_wrong_password_fails_before_any_training(server_store, tmp_path):
    before = len(MlflowClient().search_runs(experiment_ids=_all_experiment_ids()))
    start_up = _start_up_seconds()
    result, seconds = mlflow_run(
        server_store, tmp_path, {"epochs": "1", "dataset": str(MNIST_SMALL)},
        MLFLOW_TRACKING_PASSWORD="not-the-password",
    )
    assert result.returncode != 0
    assert seconds < fail_fast_bound(start_up), start_up
    assert "Epoch" not in result.stdout
    assert "401" in result.stderr
    assert len(MlflowClient().search_runs(experiment_ids=_all_experiment_ids())) == before


def _all_experiment_ids() -> list[str]:
    return [experiment.experiment_id for experiment in MlflowClient().search_experiments()]


def _snapshot(client: MlflowClient, run_id: str, workdir: Path) -> dict:
    """Everything about a run that must survive a server restart, read through the server."""
    run = client.get_run(run_id)
    model_id = logged_models_by_run(client, run.info.experiment_id, run_id)[run_id]  # the model, not a checkpoint
    report = client.download_artifacts(run_id, names.CLASSIFICATION_REPORT_FILE, str(workdir))
    return {
        "info": (run.info.status, run.info.artifact_uri, run.info.experiment_id),
        "data": (run.data.params, run.data.metrics, run.data.tags),
        "histories": {
            metric: [(m.step, m.value) for m in client.get_metric_history(run_id, metric)]
            for metric in names.EPOCH_METRICS
        },
        "artifacts": _files(partial(client.list_artifacts, run_id)),
        "model": _files(partial(client.list_logged_model_artifacts, model_id)),
        "report": Path(report).read_bytes(),
    }


def _files(list_artifacts: Callable[[str | None], list], path: str | None = None) -> dict[str, int]:
    """Every file that `list_artifacts` (of a run or a logged model) finds under `path`, with its size."""
    found = {}
    for item in list_artifacts(path):
        found |= _files(list_artifacts, item.path) if item.is_dir else {item.path: item.file_size}
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)  # the shared `mlflow run` training may run in its set-up
def test_runs_metrics_and_artifacts_survive_a_restart(server_store, trained_run, tmp_path):
    client = MlflowClient()
    before = _snapshot(client, trained_run, tmp_path / "before")
    assert set(before["artifacts"]) >= EXPECTED_ARTIFACTS
    assert {"MLmodel", "data/model.keras"} <= set(before["model"])
    old_group, uri, backend = server_store.pid, server_store.uri, server_store.backend_store_uri
    assert len(live_processes_in_group(old_group)) > 1  # mlflow server, uvicorn and its workers

    server_store.stop()
    assert live_processes_in_group(old_group) == []
    assert not _answers(uri)
    server_store.start()

    assert (server_store.uri, server_store.backend_store_uri) == (uri, backend)
    assert server_store.pid != old_group
    assert _snapshot(client, trained_run, tmp_path / "after") == before


def _answers(uri: str) -> bool:
    try:
        requests.get(f"{uri}/health", timeout=5)
    except requests.ConnectionError:
        return False
    return True


# A terminal gives its foreground command SIGINT at its default action. pytest itself may run with
# SIGINT ignored (a CI job started in the background by a non-interactive shell), which its children
# inherit: the server command is started through this exec, as a terminal would start it.
_AS_IN_A_TERMINAL = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.executable, sys.argv[1:])"
)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_server_command_prints_what_to_export_and_stops_cleanly_on_ctrl_c(tmp_path):
    database = tmp_path / "store.db"
    command = subprocess.Popen(
        [sys.executable, "-c", _AS_IN_A_TERMINAL, sys.executable, "-m", "mlflow_project", "server",
         "--root", str(tmp_path / "root"), "--backend-store-uri", f"sqlite:///{database}"],
        cwd=tmp_path,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = stdout_lines(command)
    group = None
    try:
        output = _read_until(lines, "stops the server", timeout=180)
        [group] = [int(found) for found in re.findall(r"process group (\d+)", output)]
        assert output.splitlines()[-1] == "Ctrl-C stops the server.", output
        exported = dict(re.findall(r"^  export (MLFLOW_TRACKING_\w+)=(\S+)$", output, flags=re.MULTILINE))
        assert set(exported) == {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        assert f"Backend store: sqlite:///{database} (given)" in output
        search = f"{exported['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search"
        credentials = (exported["MLFLOW_TRACKING_USERNAME"], exported["MLFLOW_TRACKING_PASSWORD"])
        assert requests.get(search, params={"max_results": 1}, auth=credentials, timeout=30).status_code == 200
        assert requests.get(search, params={"max_results": 1}, timeout=30).status_code == 401
        assert len(live_processes_in_group(group)) > 1  # mlflow server and uvicorn
        # Ctrl-C, and again while the server stops (as an impatient user does): the second one must
        # not cut the stop short. The stop is bounded (SIGTERM, SIGKILL after 30 s); the slack is for load.
        command.send_signal(signal.SIGINT)
        time.sleep(0.1)
        command.send_signal(signal.SIGINT)
        assert command.wait(timeout=150) == 0
        assert live_processes_in_group(group) == []  # gone when the command returns, not later
    finally:
        _stop_for_good(command, group)
    rest = _read_until(lines, None, timeout=30)
    assert rest.splitlines()[-1:] == ["Stopped."], rest
    assert "killing it" not in rest and "Traceback" not in rest  # stopped by SIGTERM, in time
    assert database.exists()
    assert (tmp_path / "root" / "admin-credentials.json").stat().st_mode & 0o077 == 0


def _stop_for_good(command: subprocess.Popen, group: int | None) -> None:
    """After a failed test: the command and the server group it started (in its own session) are gone."""
    if command.poll() is None:
        command.terminate()  # the command stops its server group on SIGTERM
        try:
            command.wait(timeout=90)
        except subprocess.TimeoutExpired:
            command.kill()
            command.wait(timeout=30)
    if group is not None and live_processes_in_group(group):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def test_a_signal_while_the_server_starts_or_stops_takes_effect_once_that_step_is_over():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever pytest inherited
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt), signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # a Ctrl-C not held would interrupt this sleep
            steps.append("step finished")
        assert steps == ["step finished"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_server_command_started_with_ctrl_c_ignored_says_how_to_stop_it(tmp_path, capsys):
    server = TrackingServer(tmp_path, port=5000)
    _announce(server, ctrl_c_stops=False)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"Started with Ctrl-C ignored (a background job): `kill {os.getpid()}` stops the server."


def _read_until(lines: queue.Queue, marker: str | None, timeout: float) -> str:
    """What the process printed until a line holding `marker` (or until it closed its output)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if marker and marker in line:
            break
    return "".join(seen)


def test_a_server_that_cannot_start_is_reported_in_one_line(tmp_path):
    result = run_cli(
        ["server", "--root", str(tmp_path / "root"), "--backend-store-uri", f"sqlite:///{tmp_path / 'x.db'}"],
        cwd=tmp_path,
        timeout=60,
        MLFLOW_AUTH_DEFAULT_PERMISSION="EVERYTHING",
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: the MLflow server exited with status 2 before answering /health: "
        "MLFLOW_AUTH_DEFAULT_PERMISSION=EVERYTHING is invalid: allowed are READ, EDIT, MANAGE, NO_PERMISSIONS "
        f"(the whole log: {tmp_path / 'root' / 'server.log'})"
    ]


def test_admin_credentials_are_generated_once_and_readable_only_by_their_owner(tmp_path):
    path = tmp_path / "root" / "admin-credentials.json"
    first = AdminCredentials.load_or_create(path)
    assert AdminCredentials.load_or_create(path) == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert first.username == "admin" and len(first.password) >= 24 and len(first.flask_secret_key) >= 32
    assert AdminCredentials.load_or_create(tmp_path / "other.json").password != first.password


def test_backend_store_is_the_given_uri_else_local_postgres_else_sqlite(tmp_path, database_uri):
    given = choose_backend_store(tmp_path, "postgresql+psycopg2://team:s3cret@db.example:5432/mlflow")
    assert given.uri == "postgresql+psycopg2://team:s3cret@db.example:5432/mlflow"
    assert "s3cret" not in given.description and "team:***@db.example" in given.description

    nothing_there = choose_backend_store(tmp_path, postgres_port=9)  # the discard port: nothing listens
    assert nothing_there.uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert "no PostgreSQL answers on 127.0.0.1:9" in nothing_there.description

    database = f"mnist_choice_{uuid.uuid4().hex[:8]}"
    chosen = choose_backend_store(tmp_path, database=database)
    if database_uri.startswith("sqlite:"):  # no PostgreSQL on this machine
        assert chosen.uri.startswith("sqlite:///")
        return
    try:
        assert chosen.uri == f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}"
        assert chosen.description == f"PostgreSQL database {database} on 127.0.0.1:5432"
        assert choose_backend_store(tmp_path, database=database) == chosen  # found, not created twice
    finally:
        drop_database(database)


@pytest.mark.parametrize(
    ("missing", "extra"),
    [
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", {}),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", {}),
        (None, {"MLFLOW_AUTH_DEFAULT_PERMISSION": "EVERYTHING"}),
    ],
)
def test_start_script_refuses_incomplete_settings_before_starting_anything(tmp_path, missing, extra):
    settings = TrackingServer(tmp_path, port=5000).server_environment() | extra
    settings.pop(missing, None)
    result = subprocess.run(
        ["bash", str(SERVER_SCRIPT)],
        env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)} | settings,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert (missing or "MLFLOW_AUTH_DEFAULT_PERMISSION=EVERYTHING is invalid") in result.stderr
    assert not list(tmp_path.glob("mlflow-basic-auth.*"))  # refused before writing the auth config
