#!/usr/bin/env python3
"""Creates the team server's training and serving accounts and their grants (pipeline/tracking/accounts.py).

docker/start-mlflow-server.sh starts it in the background just before it becomes the server, when the
accounts' settings are given; it waits for the server's /health, signs in as the admin, makes the accounts
match the settings, then writes the file MLFLOW_ACCOUNTS_READY_FILE, which the compose healthcheck waits
for: the trainer and the serve service start only once their accounts exist. Settings (environment):
MLFLOW_TRAINING_USERNAME / _PASSWORD, MLFLOW_SERVING_USERNAME / _PASSWORD, MLFLOW_TRAINING_EXPERIMENT,
MLFLOW_SERVED_MODEL, the admin's MLFLOW_AUTH_ADMIN_USERNAME / _PASSWORD, MLFLOW_HOST, MLFLOW_PORT,
MLFLOW_ACCOUNTS_READY_FILE and ACCOUNTS_TIMEOUT (seconds to wait for the server, default 120).
Exit status 0 once done, 1 when the server did not answer or refused a step (the reason on stderr).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import requests
from mlflow.exceptions import MlflowException

from pipeline.tracking.accounts import Account, ensure_accounts


def _wait_for(uri: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


def main() -> int:
    environment = os.environ
    host = environment.get("MLFLOW_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    uri = f"http://{host}:{environment.get('MLFLOW_PORT', '5000')}"
    if not _wait_for(uri, float(environment.get("ACCOUNTS_TIMEOUT", "120"))):
        print(f"error: create-accounts: the server at {uri} did not answer /health", file=sys.stderr)
        return 1
    # MLflow's clients sign in with these.
    os.environ["MLFLOW_TRACKING_USERNAME"] = environment["MLFLOW_AUTH_ADMIN_USERNAME"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = environment["MLFLOW_AUTH_ADMIN_PASSWORD"]
    try:
        done = ensure_accounts(
            uri,
            Account(environment["MLFLOW_TRAINING_USERNAME"], environment["MLFLOW_TRAINING_PASSWORD"]),
            Account(environment["MLFLOW_SERVING_USERNAME"], environment["MLFLOW_SERVING_PASSWORD"]),
            environment["MLFLOW_TRAINING_EXPERIMENT"],
            environment["MLFLOW_SERVED_MODEL"],
        )
    except (MlflowException, ValueError, requests.RequestException) as error:
        print(f"error: create-accounts: {error}", file=sys.stderr)
        return 1
    for line in done:
        print(f"create-accounts: {line}", flush=True)
    Path(environment["MLFLOW_ACCOUNTS_READY_FILE"]).touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
