"""Facts about the tracking store: is it usable, and where does the UI show a run or a comparison.

MLflow's REST client retries an unreachable server for minutes and reports a wrong password deep
inside a traceback; `check_tracking_store` asks the server once, with a short timeout, before any
work starts, and says in one line what is wrong and what to check. For a SQLite store it creates the
database, one process at a time (see `prepare_sqlite_store`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlencode

import mlflow
from mlflow.entities import Experiment
from mlflow.environment_variables import MLFLOW_EXPERIMENT_NAME
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from pipeline.errors import TrackingUnavailable

logger = logging.getLogger(__name__)

CREDENTIAL_VARIABLES = "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
# Where `mlflow ui` serves a local store (SQLite, PostgreSQL, files) by default.
LOCAL_UI_URL = "http://127.0.0.1:5000"
# The UI's address for people when it is not the tracking URI: a trainer inside the compose network
# reaches the server as http://mlflow:5000, which nobody outside it can open.
UI_URL_VARIABLE = "MNIST_PIPELINE_UI_URL"


def is_server_uri(uri: str) -> bool:
    """Whether the tracking URI is a server (http or https), not a local store."""
    return uri.startswith(("http://", "https://"))


def check_tracking_store(uri: str | None = None, timeout: float = 10.0, open_sqlite: bool = True) -> None:
    """Raises TrackingUnavailable when the tracking server does not answer or refuses us.

    Other local stores (PostgreSQL URIs, files) are not checked here: they fail at once anyway. A
    SQLite store is opened here (`prepare_sqlite_store`), and created if it is new, one process at a time.

    Args:
        uri: the tracking URI; by default MLflow's current one (MLFLOW_TRACKING_URI).
        timeout: seconds to wait for the one request (no retries).
        open_sqlite: False for a caller that validates its input first, and calls `prepare_sqlite_store`
            itself before it uses the store (bad input must not leave a new store behind).
    """
    uri = uri or mlflow.get_tracking_uri()
    if open_sqlite:
        prepare_sqlite_store(uri)
    if not is_server_uri(uri):
        return
    try:
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            params={"max_results": 1},
            max_retries=0,
            timeout=timeout,
            raise_on_status=False,
        )
    except MlflowException as error:
        reason = _connection_failure(str(error), timeout)
        raise TrackingUnavailable(
            f"tracking server {uri} is unreachable ({reason}); check that it runs and that "
            "MLFLOW_TRACKING_URI points at it"
        ) from None
    if response.status_code in (401, 403):
        raise TrackingUnavailable(
            f"tracking server {uri} refused the credentials (HTTP {response.status_code}); "
            f"check {CREDENTIAL_VARIABLES}"
        )
    if response.status_code >= 400:
        raise TrackingUnavailable(
            f"tracking server {uri} answered HTTP {response.status_code} to a simple query; "
            "check that MLFLOW_TRACKING_URI points at an MLflow tracking server"
        )


def use_experiment(name: str | None, client: MlflowClient | None = None) -> Experiment | None:
    """Makes the experiment `name` (else MLFLOW_EXPERIMENT_NAME) the active one, creating it when it does
    not exist yet; None, and nothing changed, when neither names one (MLflow's `Default` then).

    Trainings started together on a new experiment name all try to create it. MLflow's own paths lose
    that race: `mlflow.set_experiment` returns the experiment without activating it (the run goes to
    `Default`), and `start_run` with MLFLOW_EXPERIMENT_NAME fails. Here the loser uses the winner's.
    """
    name = name or MLFLOW_EXPERIMENT_NAME.get()
    if not name:
        return None
    client = client or MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return mlflow.set_experiment(experiment_id=experiment.experiment_id)
    try:
        experiment_id = client.create_experiment(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        experiment_id = client.get_experiment_by_name(name).experiment_id  # created by another process
    return mlflow.set_experiment(experiment_id=experiment_id)


def prepare_sqlite_store(uri: str) -> None:
    """Opens the SQLite store at `uri` (any other URI: does nothing), creating its tables if it is new,
    while holding an exclusive lock (flock) on the database's directory.

    MLflow creates a new database's tables and runs its migrations in every process that opens it
    first; processes doing so at once (trainings started together on a new store) break each
    other's migrations (alembic's "Online migration expected to match one row ... 0 found", "table
    _alembic_tmp_params already exists"). With the lock, the first process creates the store and the
    others find it complete. A directory that cannot be opened is left for MLflow to report.

    The database is then switched to SQLite's write-ahead log (`journal_mode=WAL`, kept in the file):
    in its default mode every reader blocks a writer, and a sweep's workers (each with its recorder,
    heartbeat and system-metrics threads) queue on the file's lock for seconds at a time, long enough
    that a stopped worker took over 20 s to record its end. With WAL, readers and the one writer do not
    wait for each other. A database that another process holds at that moment keeps its mode.
    """
    from sqlalchemy.engine import make_url

    if not uri.startswith("sqlite:"):
        return
    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        directory = os.open(Path(database).resolve().parent, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        MlflowClient(uri).search_experiments(max_results=1)  # creates the tables if they are missing
        _use_write_ahead_log(database)
    finally:
        os.close(directory)  # releases the lock


def _use_write_ahead_log(database: str) -> None:
    """Puts the SQLite database in WAL mode (see `prepare_sqlite_store`), unless another process holds it."""
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=1.0)) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as error:
        logger.debug("SQLite store %s keeps its journal mode: %s", database, error)


def _connection_failure(text: str, timeout: float) -> str:
    lowered = text.lower()
    if "refused" in lowered:
        return "connection refused"
    if "timed out" in lowered or "timeout" in lowered:
        return f"no answer within {timeout:.0f} s"
    if "name or service not known" in lowered or "nodename nor servname" in lowered:
        return "unknown host"
    return "cannot connect"


def run_ui_url(experiment_id: str, run_id: str, uri: str | None = None) -> str | None:
    """The MLflow UI page of a run, when the store is a server (None for local stores)."""
    uri = uri or mlflow.get_tracking_uri()
    if not is_server_uri(uri):
        return None
    return f"{_ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def compare_runs_url(experiment_id: str, run_ids: Sequence[str], uri: str | None = None) -> str:
    """The MLflow UI's compare view of exactly these runs: the page its "Compare" button opens.

    For a server it is on the server; for a local store, on `mlflow ui`'s default address.
    """
    uri = uri or mlflow.get_tracking_uri()
    base = _ui_base(uri) if is_server_uri(uri) else LOCAL_UI_URL
    query = urlencode({
        "runs": json.dumps(list(run_ids), separators=(",", ":")),
        "experiments": json.dumps([experiment_id], separators=(",", ":")),
    })
    return f"{base}/#/compare-runs?{query}"


def _ui_base(server_uri: str) -> str:
    return (os.environ.get(UI_URL_VARIABLE) or server_uri).rstrip("/")
