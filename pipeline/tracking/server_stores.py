"""Where the native tracking server keeps things: the backend store it chooses (a given URI, else a
local PostgreSQL database, else SQLite), the artifact store, and the generated admin credentials."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import socket
from pathlib import Path

from pipeline.errors import TrackingServerError, first_line

logger = logging.getLogger(__name__)

ADMIN_USERNAME = "admin"
SQLITE_FILE = "mlflow.db"
DEFAULT_DATABASE = "mnist_pipeline"
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclasses.dataclass(frozen=True)
class AdminCredentials:
    """The admin account a server creates on its first start, and the Flask secret it signs with."""

    username: str
    password: str
    flask_secret_key: str

    @classmethod
    def load_or_create(cls, path: Path) -> AdminCredentials:
        """The credentials saved at `path`, or new random ones saved there, readable by this user only.

        MLflow creates the admin user once, from the password given at the first start against an
        empty user store, and ignores it afterwards: a later start must reuse the same password.

        Args:
            path: the credentials file (JSON).
        """
        if path.exists():
            return cls(**json.loads(path.read_text()))
        credentials = cls(ADMIN_USERNAME, secrets.token_urlsafe(24), secrets.token_hex(32))
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            json.dump(dataclasses.asdict(credentials), stream)
        return credentials


@dataclasses.dataclass(frozen=True)
class ArtifactStore:
    """Where a server keeps the artifacts it proxies, when not in a directory of its root.

    Args:
        destination: what `mlflow server --artifacts-destination` gets, e.g. `s3://mlflow/`.
        environment: what the server needs to reach it (MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
            AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION); given to the server process only, never to clients.
    """

    destination: str
    environment: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BackendStore:
    """Where a server keeps runs, metrics, params, users and permissions.

    Args:
        uri: the SQLAlchemy URI MLflow gets.
        description: for people: which database, and why this one.
    """

    uri: str
    description: str


def choose_backend_store(
    root: Path,
    uri: str | None = None,
    database: str = DEFAULT_DATABASE,
    postgres_host: str = "127.0.0.1",
    postgres_port: int = 5432,
) -> BackendStore:
    """The given URI; else a PostgreSQL database when PostgreSQL answers on host:port; else SQLite in root.

    Args:
        root: the server's root directory (the SQLite file goes there).
        uri: an explicit backend store URI; used as given.
        database: the database to use (created when missing) on the local PostgreSQL.
        postgres_host: where to look for PostgreSQL.
        postgres_port: its port.

    Raises:
        TrackingServerError: PostgreSQL answers but refuses us, or `database` is not a plain name.
    """
    if uri:
        return BackendStore(uri, f"{redacted(uri)} (given)")
    postgres_uri = local_postgres_database(database, postgres_host, postgres_port)
    if postgres_uri:
        return BackendStore(postgres_uri, f"PostgreSQL database {database} on {postgres_host}:{postgres_port}")
    sqlite_path = Path(root).resolve() / SQLITE_FILE
    return BackendStore(
        f"sqlite:///{sqlite_path}",
        f"SQLite file {sqlite_path} (no PostgreSQL answers on {postgres_host}:{postgres_port})",
    )


def local_postgres_database(database: str, host: str = "127.0.0.1", port: int = 5432) -> str | None:
    """The URI of `database` on the PostgreSQL at host:port, created when missing; None when nothing listens.

    The user is PGUSER (default `postgres`); a password comes from PGPASSWORD or ~/.pgpass, as libpq
    reads them, so it never appears in the URI.

    Args:
        database: a plain lower-case name.
        host: PostgreSQL's address.
        port: its port.

    Raises:
        TrackingServerError: something listens there but does not let us in, or the name is not plain.
    """
    if not _DATABASE_NAME.fullmatch(database):
        raise TrackingServerError(
            f"database name {database!r} is invalid: allowed are lower-case letters, digits and _ (max 63)"
        )
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return None
    import psycopg2

    user = os.environ.get("PGUSER", "postgres")
    try:
        connection = psycopg2.connect(host=host, port=port, user=user, dbname="postgres", connect_timeout=5)
    except psycopg2.Error as error:
        raise TrackingServerError(
            f"PostgreSQL on {host}:{port} refused user {user} ({first_line(error, 1000)}); set PGUSER/PGPASSWORD "
            "or pass a backend store URI"
        ) from None
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{database}"')
                logger.info("created database %s on %s:%s", database, host, port)
    finally:
        connection.close()
    return f"postgresql+psycopg2://{user}@{host}:{port}/{database}"


def redacted(uri: str) -> str:
    """The URI with any password replaced by ***, fit to print."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", uri)
