"""Users and permissions on the team server, as README's "Users and permissions" documents them: a
teammate added by the admin reads and compares the admin's experiment but cannot write to it, and
works in experiments of their own; with NO_PERMISSIONS the admin's experiment is hidden from them."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
import requests

from pipeline.tracking.server import TrackingServer

pytestmark = pytest.mark.slow

API = "/api/2.0/mlflow"


class Client:
    """One signed-in user of a server, speaking MLflow's REST API (the calls every MLflow client makes)."""

    def __init__(self, server: TrackingServer, username: str, password: str) -> None:
        self.base, self.auth = f"{server.uri}{API}", (username, password)

    def get(self, path: str, **params) -> requests.Response:
        return requests.get(f"{self.base}/{path}", params=params, auth=self.auth, timeout=30)

    def post(self, path: str, **body) -> requests.Response:
        return requests.post(f"{self.base}/{path}", json=body, auth=self.auth, timeout=30)


def _admin_and_teammate(server: TrackingServer) -> tuple[Client, Client]:
    admin = Client(server, server.username, server.password)
    teammate = f"teammate-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(16)
    created = admin.post("users/create", username=teammate, password=password)
    assert created.status_code == 200, created.text
    return admin, Client(server, teammate, password)


def _experiment_with_a_run(client: Client, name: str) -> tuple[str, str]:
    experiment = client.post("experiments/create", name=name)
    assert experiment.status_code == 200, experiment.text
    experiment_id = experiment.json()["experiment_id"]
    run = client.post("runs/create", experiment_id=experiment_id, start_time=int(time.time() * 1000))
    assert run.status_code == 200, run.text
    return experiment_id, run.json()["run"]["info"]["run_id"]


def test_a_teammate_reads_the_admins_experiment_writes_only_their_own(tracking_server):
    admin, teammate = _admin_and_teammate(tracking_server)
    experiment_id, run_id = _experiment_with_a_run(admin, f"admins-{secrets.token_hex(4)}")

    # read and compare: the experiment, its runs
    assert teammate.get("experiments/get", experiment_id=experiment_id).status_code == 200
    found = teammate.post("runs/search", experiment_ids=[experiment_id])
    assert found.status_code == 200 and [r["info"]["run_id"] for r in found.json()["runs"]] == [run_id]
    # but not write to it
    assert teammate.post("runs/create", experiment_id=experiment_id).status_code == 403
    assert teammate.post("runs/log-metric", run_id=run_id, key="x", value=1.0, timestamp=0).status_code == 403
    # their own experiment: create and write
    own_id, own_run = _experiment_with_a_run(teammate, f"teammates-{secrets.token_hex(4)}")
    logged = teammate.post("runs/log-metric", run_id=own_run, key="x", value=1.0, timestamp=0)
    assert logged.status_code == 200, logged.text
    assert admin.get("experiments/get", experiment_id=own_id).status_code == 200  # the admin sees everything


@pytest.fixture
def private_server(tmp_path, monkeypatch) -> Iterator[TrackingServer]:
    """A server whose default permission is NO_PERMISSIONS (the start script reads it from the environment)."""
    monkeypatch.setenv("MLFLOW_AUTH_DEFAULT_PERMISSION", "NO_PERMISSIONS")
    with TrackingServer(tmp_path) as server:
        yield server


def test_with_no_permissions_a_teammate_cannot_see_the_admins_experiment(private_server):
    admin, teammate = _admin_and_teammate(private_server)
    experiment_id, _ = _experiment_with_a_run(admin, "admins-private")
    assert teammate.get("experiments/get", experiment_id=experiment_id).status_code == 403
    found = teammate.post("runs/search", experiment_ids=[experiment_id])
    assert found.status_code == 200 and found.json().get("runs", []) == [], found.text  # filtered out
    searched = teammate.post("experiments/search", max_results=100)
    assert experiment_id not in {e["experiment_id"] for e in searched.json().get("experiments", [])}
    assert admin.get("experiments/get", experiment_id=experiment_id).status_code == 200
    _experiment_with_a_run(teammate, "teammates-private")  # their own still works
