#!/usr/bin/env python3
"""Creates the database that keeps the Optuna studies of cluster sweeps, once: when it exists, nothing happens.

docker-compose.yml runs it as a one-shot job of the `cluster` profile; the sweep containers start only
after it succeeded. Settings come from the environment: POSTGRES_HOST, POSTGRES_USER, POSTGRES_PASSWORD,
POSTGRES_DB (the database to connect to first: MLflow's) and STUDY_DATABASE. While PostgreSQL is still
starting it tries again for up to CREATE_DATABASE_TIMEOUT seconds (default 60). Exit status 0 when the
database is there, 1 otherwise. The password is never printed.
"""

from __future__ import annotations

import os
import re
import sys
import time

import psycopg2
from psycopg2 import errors, sql


def ensure_database(connection, name: str) -> str:
    """Creates database `name` unless it exists; says which happened."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cursor.fetchone():
            return f"database {name} exists"
        try:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except (errors.DuplicateDatabase, errors.UniqueViolation):  # another job created it meanwhile
            return f"database {name} exists"
    return f"database {name} created"


def main() -> int:
    name = os.environ.get("STUDY_DATABASE", "optuna")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
        print(f"create-study-database: STUDY_DATABASE={name!r} is not a plain database name", file=sys.stderr)
        return 1
    deadline = time.monotonic() + float(os.environ.get("CREATE_DATABASE_TIMEOUT", "60"))
    while True:
        try:
            connection = psycopg2.connect(
                host=os.environ.get("POSTGRES_HOST", "postgres"), user=os.environ["POSTGRES_USER"],
                password=os.environ["POSTGRES_PASSWORD"], dbname=os.environ.get("POSTGRES_DB", "postgres"),
                connect_timeout=5,
            )
            break
        except psycopg2.OperationalError as error:
            if time.monotonic() > deadline:
                print(f"create-study-database: PostgreSQL unreachable: {str(error).strip()[:200]}", file=sys.stderr)
                return 1
            time.sleep(1)
    connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        print(f"create-study-database: {ensure_database(connection, name)}", flush=True)
    finally:
        connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
