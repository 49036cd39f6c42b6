"""Shared fixtures: the committed real-data fixtures, real MLflow tracking stores, real PostgreSQL."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

POSTGRES_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


@pytest.fixture
def sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking store; the test runs in tmp_path so MLflow's ./mlruns lands there."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def _postgres_available() -> bool:
    try:
        import psycopg2

        psycopg2.connect(POSTGRES_ADMIN_DSN).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means: no PostgreSQL here
        return False


@pytest.fixture(scope="session")
def database_uri() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (dropped afterwards), or, on a machine
    without PostgreSQL on 127.0.0.1:5432, a SQLite file, with a notice in the test report."""
    if not _postgres_available():
        directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"mnist-tests-{uuid.uuid4().hex[:8]}"
        directory.mkdir(parents=True)
        print("\nNOTICE: no PostgreSQL on 127.0.0.1:5432; backend-store tests use SQLite instead")
        os.environ["MNIST_TESTS_BACKEND"] = "sqlite"
        yield f"sqlite:///{directory / 'backend.db'}"
        shutil.rmtree(directory, ignore_errors=True)
        return
    import psycopg2

    name = f"mnist_tests_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(POSTGRES_ADMIN_DSN)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    os.environ["MNIST_TESTS_BACKEND"] = "postgresql"
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def pytest_report_header(config: pytest.Config) -> str:
    where = "PostgreSQL on 127.0.0.1:5432" if _postgres_available() else "SQLite (no PostgreSQL found)"
    return f"backend-store tests use: {where}"


@pytest.fixture
def postgres_store(database_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session's PostgreSQL database as the tracking store of one test."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", database_uri)
    mlflow.set_tracking_uri(database_uri)
    yield database_uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def shared_tracking_uri(database_uri: str) -> str:
    """The tracking store that the model-selection tests (register, compare, sweep, serving) and
    the processes they start share: today the session's PostgreSQL database. To run them against
    the launched tracking server (issue 3), return that server's URL here; nothing else changes."""
    return database_uri
