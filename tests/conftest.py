"""Shared fixtures: the committed real-data fixtures, real MLflow tracking stores, real PostgreSQL,
and a real MLflow tracking server process (auth on, artifacts proxied)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.tracking.server import TrackingServer
from tests.helpers import new_sqlite_store

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# --- Two workers that end together (make test: `-n 2 --dist loadgroup`) ------------------------------------------
# Each worker takes the next unit of work when it is almost idle, in collection order. So the collection is sorted
# longest unit first (the classic "longest processing time first" rule): the long process tests start at once and
# the short ones fill the gaps at the end. A unit is one test, except the modules below, whose module-scoped fixture
# trains or starts servers: their tests stay together on one worker (an xdist_group), so it is built once.
KEPT_ON_ONE_WORKER = {
    "tests/test_registry.py": "trains the selection's runs and registers them once",
    "tests/test_s3_artifacts.py": "starts an S3 server and a tracking server on it",
    "tests/test_scale_out.py": "trains the single-device reference",
    "tests/test_model_and_callbacks_contract.py": "trains the plateau run",
    "tests/test_tracking_server.py": "trains one run through `mlflow run` against the server",
    "tests/test_sweep_ui.py": "runs the sweep its tests read",
    "tests/test_team_permissions.py": "starts the team server with its accounts",
}
# Seconds each test took (set-up and tear-down included) in a whole run on this machine; written by a run with
# MNIST_TESTS_RECORD_DURATIONS=1 (docs/tests.md, "Time"). Only the order depends on it: a test missing from it
# counts as UNKNOWN_TEST_SECONDS.
DURATIONS_FILE = Path(__file__).with_name("durations.json")
RECORD_DURATIONS = "MNIST_TESTS_RECORD_DURATIONS"
UNKNOWN_TEST_SECONDS = 1.0

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_ADMIN_DSN = f"host={POSTGRES_HOST} port={POSTGRES_PORT} user=postgres dbname=postgres connect_timeout=3"
# Set to 1 on a machine without PostgreSQL: the backend-store tests then use SQLite (CI never sets it).
WITHOUT_POSTGRES = "MNIST_TESTS_WITHOUT_POSTGRES"


@contextlib.contextmanager
def _tracking_store(uri: str, environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`uri` as this process's tracking store for one test (with `environment` set), reset after it."""
    import mlflow

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    mlflow.set_tracking_uri(uri)
    yield
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def create_database(prefix: str) -> tuple[str, str]:
    """A new, empty PostgreSQL database of the tests: its name and its SQLAlchemy URI."""
    import psycopg2

    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(POSTGRES_ADMIN_DSN)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    return name, f"postgresql+psycopg2://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"


def drop_database(name: str) -> None:
    """Drops a PostgreSQL database of the tests, even while connections to it are open."""
    import psycopg2

    admin = psycopg2.connect(POSTGRES_ADMIN_DSN)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


# What MLflow and the pipeline write into a working directory by default (git ignores them): a test
# that leaves one in the project directory ran something in the wrong place.
_DEFAULT_OUTPUTS = ("mlruns", "mlartifacts", "mlflow.db", "comparison", "mlflow-server")


@pytest.fixture(autouse=True)
def _nothing_written_into_the_project() -> Iterator[None]:
    """Fails the test after which a default store or output appeared in the project directory."""
    project = Path(__file__).resolve().parents[1]
    before = {name for name in _DEFAULT_OUTPUTS if (project / name).exists()}
    yield
    appeared = sorted(name for name in _DEFAULT_OUTPUTS if (project / name).exists() and name not in before)
    assert not appeared, f"written into the project directory {project}: {appeared} (run it in tmp_path)"


@pytest.fixture
def sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A new SQLite tracking store; the test runs in tmp_path so MLflow's ./mlruns lands there."""
    uri = new_sqlite_store(tmp_path)
    monkeypatch.chdir(tmp_path)
    with _tracking_store(uri, {"MLFLOW_TRACKING_URI": uri}, monkeypatch):
        yield uri


def _without_postgres() -> bool:
    """Whoever runs the tests said there is no PostgreSQL here (never set in CI)."""
    return os.environ.get(WITHOUT_POSTGRES) == "1"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stops the session before any test when PostgreSQL does not answer: the backend-store tests
    must never quietly run on SQLite instead."""
    if _without_postgres():
        return
    import psycopg2

    try:
        psycopg2.connect(POSTGRES_ADMIN_DSN).close()
    except psycopg2.Error as error:
        reason = " ".join(str(error).split())
        raise pytest.UsageError(
            f"PostgreSQL on {POSTGRES_HOST}:{POSTGRES_PORT} (user postgres) is unreachable ({reason}); the "
            f"backend-store tests need it: start it, or set {WITHOUT_POSTGRES}=1 to run them on SQLite instead"
        ) from None


@pytest.fixture(scope="session")
def database_uri() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (dropped afterwards); a SQLite file only
    when MNIST_TESTS_WITHOUT_POSTGRES=1 (the report header says so)."""
    if _without_postgres():
        directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"mnist-tests-{uuid.uuid4().hex[:8]}"
        directory.mkdir(parents=True)
        yield f"sqlite:///{directory / 'backend.db'}"
        shutil.rmtree(directory, ignore_errors=True)
        return
    name, uri = create_database("mnist_tests")
    try:
        yield uri
    finally:
        drop_database(name)


def pytest_report_header(config: pytest.Config) -> str:
    if _without_postgres():
        return f"backend-store tests use: SQLite ({WITHOUT_POSTGRES}=1: PostgreSQL is NOT tested)"
    return f"backend-store tests use: PostgreSQL on {POSTGRES_HOST}:{POSTGRES_PORT} (a fresh database per session)"


@pytest.fixture
def postgres_store(database_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The session's PostgreSQL database as the tracking store of one test."""
    monkeypatch.chdir(tmp_path)
    with _tracking_store(database_uri, {"MLFLOW_TRACKING_URI": database_uri}, monkeypatch):
        yield database_uri


@pytest.fixture(scope="session")
def shared_tracking(tracking_server: TrackingServer) -> dict[str, str]:
    """The tracking store that the model-selection tests (register, compare, sweep, serving) and the
    processes they start share, as the environment a client needs: the session's tracking server
    (basic-auth on, artifacts proxied), so these tests run what a team runs."""
    return tracking_server.client_environment()


@pytest.fixture(scope="session")
def tracking_server(database_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """A real `mlflow server` for the session, started by docker/start-mlflow-server.sh as compose
    starts it: basic-auth on (generated admin credentials), artifacts proxied to a local directory,
    the session's database as backend store. Its whole process group is stopped at the end.

    Tests may stop, start or restart() it (same port, database and artifacts); they must leave it
    running. Child processes reach it with project_env(**tracking_server.client_environment()).
    """
    with TrackingServer(tmp_path_factory.mktemp("tracking-server"), database_uri) as server:
        yield server


@pytest.fixture
def server_store(tracking_server: TrackingServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[TrackingServer]:
    """The session's tracking server as the store of one test: URI and admin credentials set in this
    process (MLflow reads MLFLOW_TRACKING_USERNAME / _PASSWORD at each request). It is running
    again after the test, whatever the test did to it."""
    tracking_server.start()  # does nothing when it runs
    with _tracking_store(tracking_server.uri, tracking_server.client_environment(), monkeypatch):
        yield tracking_server
    tracking_server.start()


def _recorded_durations() -> dict[str, float]:
    """DURATIONS_FILE's seconds per test id (none when it is missing)."""
    return json.loads(DURATIONS_FILE.read_text()) if DURATIONS_FILE.exists() else {}


def _unit(item: pytest.Item) -> str:
    """What one worker runs as a whole: a module of KEPT_ON_ONE_WORKER, or one test."""
    module = item.nodeid.split("::", 1)[0]
    return module if module in KEPT_ON_ONE_WORKER else item.nodeid


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest unit first (a unit's own tests keep their order); KEPT_ON_ONE_WORKER's modules as xdist groups."""
    seconds = _recorded_durations()
    cost: dict[str, float] = {}
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        unit = _unit(item)
        cost[unit] = cost.get(unit, 0.0) + seconds.get(item.nodeid, UNKNOWN_TEST_SECONDS)
        first.setdefault(unit, index)
        if unit != item.nodeid:
            item.add_marker(pytest.mark.xdist_group(unit))
    items.sort(key=lambda item: (-cost[_unit(item)], first[_unit(item)]))


def _without_group(nodeid: str) -> str:
    """A test id without xdist's "@group" suffix."""
    return nodeid.rsplit("@", 1)[0] if "@" in nodeid and nodeid.rfind("@") > nodeid.rfind("]") else nodeid


# The tests the workers collected that DURATIONS_FILE does not hold (in the controller: the order matters only there)
_unmeasured: set[str] = set()


def _note_unmeasured(ids: list[str]) -> None:
    seconds = _recorded_durations()
    _unmeasured.update(nodeid for nodeid in map(_without_group, ids) if nodeid not in seconds)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Names the tests run without a recorded duration: each counted 1 s, a long one among them ran last and
    kept the other worker idle (refresh DURATIONS_FILE: docs/tests.md, "Time")."""
    if _unmeasured:
        terminalreporter.write_line(
            f"{len(_unmeasured)} tests not in {DURATIONS_FILE.name} (ordered as {UNKNOWN_TEST_SECONDS:g} s each), e.g. "
            f"{min(_unmeasured)}: refresh it with a whole run under {RECORD_DURATIONS}=1")


def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """Stops the run when a worker's test ids came without KEPT_ON_ONE_WORKER's groups: `--dist loadgroup` would
    spread those modules over every worker, each building the module's training or servers again (pytest 9.2
    with xdist 3.8 did so silently, pytest-xdist#1386; pyproject.toml keeps pytest below 9.2)."""
    _note_unmeasured(ids)
    if node.config.getvalue("dist") != "loadgroup":
        return
    lost = [nodeid for nodeid in ids if nodeid.split("::", 1)[0] in KEPT_ON_ONE_WORKER and "@" not in nodeid]
    if lost:
        pytest.exit(f"xdist did not group {lost[0]} (and {len(lost) - 1} more) with its module: "
                    "--dist loadgroup would run it on every worker; see KEPT_ON_ONE_WORKER in tests/conftest.py",
                    returncode=pytest.ExitCode.USAGE_ERROR)


_durations: dict[str, float] = {}
# Set to a file: each test's CPU-seconds (this process's and its ended child processes') appended to it as a JSON line,
# from each worker: where the suite's CPU goes (docs/tests.md, "Time"). A module fixture's servers count towards the
# test during which they end.
RECORD_CPU = "MNIST_TESTS_RECORD_CPU"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """With MNIST_TESTS_RECORD_CPU=FILE: records the CPU time each test took (set-up and tear-down included)."""
    target = os.environ.get(RECORD_CPU)
    if not target:
        yield
        return
    import resource
    import time

    def cpu() -> tuple[float, float]:
        own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime

    (own, children), wall = cpu(), time.monotonic()
    yield
    (own_after, children_after), wall = cpu(), time.monotonic() - wall
    with open(target, "a") as records:
        records.write(json.dumps({"test": _without_group(item.nodeid), "cpu": round(own_after - own, 2),
                                  "children_cpu": round(children_after - children, 2), "wall": round(wall, 2)}) + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With MNIST_TESTS_RECORD_DURATIONS=1: adds up each test's phases (in the controller, from every worker)."""
    if os.environ.get(RECORD_DURATIONS) == "1":
        nodeid = _without_group(report.nodeid)
        _durations[nodeid] = _durations.get(nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """With MNIST_TESTS_RECORD_DURATIONS=1: writes tests/durations.json (the controller's, or a run without xdist)."""
    if os.environ.get(RECORD_DURATIONS) == "1" and _durations and not hasattr(session.config, "workerinput"):
        DURATIONS_FILE.write_text(
            json.dumps({nodeid: round(value, 1) for nodeid, value in sorted(_durations.items())}, indent=0) + "\n"
        )
