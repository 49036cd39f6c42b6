"""Users and permissions on the team server, as README's "Users and permissions" documents them: a
teammate added by the admin reads and compares the admin's experiment but cannot write to it, and
works in experiments of their own; with NO_PERMISSIONS the admin's experiment is hidden from them."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow.server
import pytest
import requests
from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.tracking.accounts import Account, add_teammate
from pipeline.tracking.recorder import RunRecorder
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

    def patch(self, path: str, **body) -> requests.Response:
        return requests.patch(f"{self.base}/{path}", json=body, auth=self.auth, timeout=30)


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


# --- The compose stack's accounts per job (docs/team-server.md, "Who may do what"): every "cannot" cell ---

TRAINING, SERVING = ("trainer", "training-password-1"), ("serving", "serving-password-1")
TEAM_EXPERIMENT, SERVED_MODEL = "mnist-mlp", "mnist-mlp"


@pytest.fixture(scope="module")
def team_server(tmp_path_factory) -> Iterator[TrackingServer]:
    """A server started as the compose stack starts it: default NO_PERMISSIONS, with the accounts' settings,
    so the start script runs docker/create-accounts.py beside it; returned once the accounts are set up."""
    root = tmp_path_factory.mktemp("team-server")
    ready = root / "accounts-ready"
    settings = {
        "MLFLOW_AUTH_DEFAULT_PERMISSION": "NO_PERMISSIONS",
        "MLFLOW_TRAINING_USERNAME": TRAINING[0], "MLFLOW_TRAINING_PASSWORD": TRAINING[1],
        "MLFLOW_SERVING_USERNAME": SERVING[0], "MLFLOW_SERVING_PASSWORD": SERVING[1],
        "MLFLOW_TRAINING_EXPERIMENT": TEAM_EXPERIMENT, "MLFLOW_SERVED_MODEL": SERVED_MODEL,
        "MLFLOW_ACCOUNTS_READY_FILE": str(ready),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(name, value)
        with TrackingServer(root) as server:
            deadline = time.monotonic() + 60
            while not ready.exists():
                assert time.monotonic() < deadline, server.log_path.read_text()[-3000:]
                time.sleep(0.2)
            yield server


def test_with_no_permissions_a_teammate_cannot_see_the_admins_experiment(team_server):
    """team_server's default permission is NO_PERMISSIONS (the start script reads it from the environment)."""
    admin, teammate = _admin_and_teammate(team_server)
    experiment_id, _ = _experiment_with_a_run(admin, f"admins-private-{secrets.token_hex(4)}")
    assert teammate.get("experiments/get", experiment_id=experiment_id).status_code == 403
    found = teammate.post("runs/search", experiment_ids=[experiment_id])
    assert found.status_code == 200 and found.json().get("runs", []) == [], found.text  # filtered out
    searched = teammate.post("experiments/search", max_results=100)
    assert experiment_id not in {e["experiment_id"] for e in searched.json().get("experiments", [])}
    assert admin.get("experiments/get", experiment_id=experiment_id).status_code == 200
    _experiment_with_a_run(teammate, f"teammates-private-{secrets.token_hex(4)}")  # their own still works


@dataclass
class Team:
    admin: Client
    training: Client
    serving: Client
    teammate: Client
    experiment_id: str  # the training experiment, created by the accounts' set-up
    run_id: str  # a training run there, with one artifact
    other_experiment_id: str  # a teammate's own experiment
    other_model: str  # a registered model that is not the served one
    model_id: str  # a logged model (a checkpoint) of the training run


@pytest.fixture(scope="module")
def team(team_server: TrackingServer) -> Team:
    admin = Client(team_server, team_server.username, team_server.password)
    training, serving = Client(team_server, *TRAINING), Client(team_server, *SERVING)
    teammate_name, teammate_password = f"teammate-{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    environment = {"MLFLOW_TRACKING_USERNAME": admin.auth[0], "MLFLOW_TRACKING_PASSWORD": admin.auth[1]}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        add_teammate(team_server.uri, Account(teammate_name, teammate_password))
    teammate = Client(team_server, teammate_name, teammate_password)

    experiment = training.get("experiments/get-by-name", experiment_name=TEAM_EXPERIMENT)
    assert experiment.status_code == 200, experiment.text
    experiment_id = experiment.json()["experiment"]["experiment_id"]
    run = training.post("runs/create", experiment_id=experiment_id, start_time=int(time.time() * 1000))
    assert run.status_code == 200, run.text
    run_id = run.json()["run"]["info"]["run_id"]
    uploaded = requests.put(f"{team_server.uri}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}"
                            "/artifacts/model/MLmodel", data=b"flavors: {}\n", auth=training.auth, timeout=30)
    assert uploaded.status_code == 200, uploaded.text
    # the training account registers the served model (and so manages it), as `register` does
    assert training.post("registered-models/create", name=SERVED_MODEL).status_code == 200
    version = training.post("model-versions/create", name=SERVED_MODEL, run_id=run_id,
                            source=f"mlflow-artifacts:/{experiment_id}/{run_id}/artifacts/model")
    assert version.status_code == 200, version.text
    alias = training.post("registered-models/alias", name=SERVED_MODEL, alias="champion", version="1")
    assert alias.status_code == 200, alias.text
    logged = training.post("logged-models", experiment_id=experiment_id, name="checkpoint", source_run_id=run_id)
    assert logged.status_code == 200, logged.text

    other_experiment_id, _ = _experiment_with_a_run(teammate, f"teammates-{secrets.token_hex(4)}")
    other_model = f"other-{secrets.token_hex(4)}"
    assert admin.post("registered-models/create", name=other_model).status_code == 200
    return Team(admin, training, serving, teammate, experiment_id, run_id, other_experiment_id, other_model,
                logged.json()["model"]["info"]["model_id"])


def _delete_logged_model(client: Client, team: Team) -> requests.Response:
    return requests.delete(f"{client.base}/logged-models/{team.model_id}", auth=client.auth, timeout=30)


def _artifact(client: Client, team: Team) -> requests.Response:
    return requests.get(f"{client.base.rsplit('/api/', 1)[0]}/api/2.0/mlflow-artifacts/artifacts/"
                        f"{team.experiment_id}/{team.run_id}/artifacts/model/MLmodel", auth=client.auth, timeout=30)


def test_the_accounts_do_their_jobs(team):
    """The "can" cells the jobs need: training records and registers, serving reads its model's files."""
    assert team.training.post("runs/log-metric", run_id=team.run_id, key="x", value=1.0,
                              timestamp=0).status_code == 200
    assert team.serving.get("registered-models/alias", name=SERVED_MODEL, alias="champion").status_code == 200
    assert team.serving.get("model-versions/get-download-uri", name=SERVED_MODEL, version="1").status_code == 200
    assert team.serving.post("runs/search", experiment_ids=[team.experiment_id]).status_code == 200
    downloaded = _artifact(team.serving, team)
    assert downloaded.status_code == 200 and downloaded.content == b"flavors: {}\n"
    # the teammate reads everything, and writes to what they created
    assert team.teammate.get("experiments/get", experiment_id=team.experiment_id).status_code == 200
    assert team.teammate.get("registered-models/get", name=SERVED_MODEL).status_code == 200
    assert team.admin.get("experiments/get", experiment_id=team.other_experiment_id).status_code == 200


def _user(name: str) -> dict:
    return {"username": name, "password": secrets.token_urlsafe(16)}


# (account, what it tries, request): each row is a "cannot" cell of the table in docs/team-server.md.
CANNOT = [
    ("training", "manage users: create one", lambda t: t.training.post("users/create", **_user("x-by-training"))),
    ("training", "manage users: make itself admin",
     lambda t: t.training.patch("users/update-admin", username=TRAINING[0], is_admin=True)),
    ("training", "grant permissions", lambda t: requests.post(
        t.training.base.replace("/api/2.0/", "/api/3.0/") + "/users/permissions/grant", auth=t.training.auth,
        json={"username": SERVING[0], "resource_type": "experiment", "resource_id": t.experiment_id,
              "permission": "EDIT"}, timeout=30)),
    ("training", "delete a run", lambda t: t.training.post("runs/delete", run_id=t.run_id)),
    ("training", "delete a logged model", lambda t: _delete_logged_model(t.training, t)),
    ("training", "delete the training experiment",
     lambda t: t.training.post("experiments/delete", experiment_id=t.experiment_id)),
    ("training", "read a teammate's experiment",
     lambda t: t.training.get("experiments/get", experiment_id=t.other_experiment_id)),
    ("training", "read another registered model",
     lambda t: t.training.get("registered-models/get", name=t.other_model)),
    ("serving", "create an experiment", lambda t: t.serving.post("experiments/create", name="by-serving")),
    ("serving", "create a registered model", lambda t: t.serving.post("registered-models/create", name="by-serving")),
    ("serving", "create a run", lambda t: t.serving.post("runs/create", experiment_id=t.experiment_id)),
    ("serving", "log a metric", lambda t: t.serving.post("runs/log-metric", run_id=t.run_id, key="x", value=1.0,
                                                         timestamp=0)),
    ("serving", "delete a run", lambda t: t.serving.post("runs/delete", run_id=t.run_id)),
    ("serving", "delete a logged model", lambda t: _delete_logged_model(t.serving, t)),
    ("serving", "upload an artifact", lambda t: requests.put(
        f"{t.serving.base.rsplit('/api/', 1)[0]}/api/2.0/mlflow-artifacts/artifacts/{t.experiment_id}/{t.run_id}"
        "/artifacts/x.txt", data=b"x", auth=t.serving.auth, timeout=30)),
    ("serving", "register a version", lambda t: t.serving.post(
        "model-versions/create", name=SERVED_MODEL, run_id=t.run_id,
        source=f"mlflow-artifacts:/{t.experiment_id}/{t.run_id}/artifacts/model")),
    ("serving", "move the alias", lambda t: t.serving.post("registered-models/alias", name=SERVED_MODEL,
                                                           alias="champion", version="1")),
    ("serving", "tag the served model", lambda t: t.serving.post("registered-models/set-tag", name=SERVED_MODEL,
                                                                 key="x", value="y")),
    ("serving", "read another registered model", lambda t: t.serving.get("registered-models/get", name=t.other_model)),
    ("serving", "read a teammate's experiment",
     lambda t: t.serving.get("experiments/get", experiment_id=t.other_experiment_id)),
    ("serving", "manage users", lambda t: t.serving.post("users/create", **_user("x-by-serving"))),
    ("teammate", "write to the training experiment",
     lambda t: t.teammate.post("runs/create", experiment_id=t.experiment_id)),
    ("teammate", "log into a training run", lambda t: t.teammate.post("runs/log-metric", run_id=t.run_id, key="x",
                                                                      value=1.0, timestamp=0)),
    ("teammate", "delete a run", lambda t: t.teammate.post("runs/delete", run_id=t.run_id)),
    ("teammate", "delete a logged model", lambda t: _delete_logged_model(t.teammate, t)),
    ("teammate", "register a version of the served model", lambda t: t.teammate.post(
        "model-versions/create", name=SERVED_MODEL, run_id=t.run_id,
        source=f"mlflow-artifacts:/{t.experiment_id}/{t.run_id}/artifacts/model")),
    ("teammate", "move the alias", lambda t: t.teammate.post("registered-models/alias", name=SERVED_MODEL,
                                                             alias="champion", version="1")),
    ("teammate", "manage users", lambda t: t.teammate.post("users/create", **_user("x-by-teammate"))),
]


@pytest.mark.parametrize(("account", "action", "attempt"), CANNOT, ids=[f"{a}: {b}" for a, b, _ in CANNOT])
def test_an_account_cannot(team, account, action, attempt):
    response = attempt(team)
    assert response.status_code == 403, (account, action, response.status_code, response.text[:300])


def test_nothing_an_account_cannot_do_happened(team):
    """The refused writes left nothing behind (runs after the parametrized cells above)."""
    runs = team.admin.post("runs/search", experiment_ids=[team.experiment_id]).json()["runs"]
    assert [(run["info"]["run_id"], run["info"]["lifecycle_stage"]) for run in runs] == [(team.run_id, "active")]
    assert team.admin.get("experiments/get-by-name", experiment_name="by-serving").status_code == 404
    assert team.admin.get("registered-models/get", name="by-serving").status_code == 404
    versions = team.admin.get("model-versions/search", filter=f"name='{SERVED_MODEL}'").json()["model_versions"]
    assert [version["version"] for version in versions] == ["1"]
    assert team.admin.get("users/get", username="x-by-training").status_code == 404
    assert team.admin.get(f"logged-models/{team.model_id}").status_code == 200


def test_the_admin_grants_a_teammate_edit_on_one_experiment_or_denies_one(team_server, team, monkeypatch):
    """docs/team-server.md's two commands: EDIT on the training experiment; DENY (MLflow 3.17) on another."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", team.admin.auth[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team.admin.auth[1])
    auth = mlflow.server.get_app_client("basic-auth", tracking_uri=team_server.uri)
    assert team.teammate.post("runs/create", experiment_id=team.experiment_id).status_code == 403
    auth.grant_user_permission(team.teammate.auth[0], "experiment", team.experiment_id, "EDIT")
    created = team.teammate.post("runs/create", experiment_id=team.experiment_id)
    assert created.status_code == 200, created.text
    assert team.teammate.post("runs/delete", run_id=created.json()["run"]["info"]["run_id"]).status_code == 403
    assert team.admin.post("runs/delete", run_id=created.json()["run"]["info"]["run_id"]).status_code == 200
    # DENY beats the teammate's READ on every experiment
    hidden_id, _ = _experiment_with_a_run(team.admin, f"hidden-{secrets.token_hex(4)}")
    assert team.teammate.get("experiments/get", experiment_id=hidden_id).status_code == 200
    auth.grant_user_permission(team.teammate.auth[0], "experiment", hidden_id, "DENY")
    assert team.teammate.get("experiments/get", experiment_id=hidden_id).status_code == 403


def test_a_restart_keeps_the_accounts_and_what_they_created(team_server, team):
    """create-accounts at a later start: the same accounts and passwords, the training account still manages
    the model it created (its MANAGE is not lowered to the EDIT the set-up grants)."""
    before = team_server.log_path.read_text()
    team_server.restart()
    deadline = time.monotonic() + 60
    while "create-accounts: user serving exists" not in team_server.log_path.read_text()[len(before):]:
        assert time.monotonic() < deadline, team_server.log_path.read_text()[-3000:]
        time.sleep(0.2)
    after = team_server.log_path.read_text()[len(before):]
    assert "user trainer exists; password set from the settings" in after and "created" not in after, after
    assert team.training.post("registered-models/set-tag", name=SERVED_MODEL, key="k", value="v").status_code == 200
    # deleting a version takes MANAGE (register deletes a concurrent duplicate)
    version = team.training.post("model-versions/create", name=SERVED_MODEL, run_id=team.run_id,
                                 source=f"mlflow-artifacts:/{team.experiment_id}/{team.run_id}/artifacts/model")
    assert version.status_code == 200, version.text
    deleted = requests.delete(f"{team.training.base}/model-versions/delete", auth=team.training.auth, timeout=30,
                              json={"name": SERVED_MODEL, "version": version.json()["model_version"]["version"]})
    assert deleted.status_code == 200, deleted.text
    assert team.serving.get("registered-models/alias", name=SERVED_MODEL, alias="champion").status_code == 200
    assert team.serving.post("experiments/create", name="by-serving").status_code == 403


def test_the_training_account_keeps_a_checkpoint_it_may_not_delete_and_says_so(team_server, team, tmp_path,
                                                                                monkeypatch, caplog):
    """Deleting a LoggedModel takes MANAGE on its experiment and the training account holds EDIT: the final model's
    clean-up (deleting the best epoch's `checkpoint`, docs/run-record.md) is refused. The recorder keeps that model,
    says so once, and does not fail the run's record for it; the admin may delete it."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", team.training.auth[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team.training.auth[1])
    client = MlflowClient(team_server.uri)

    def write(directory: Path, logged: LoggedModel) -> None:
        directory.mkdir(parents=True)
        (directory / "MLmodel").write_text(f"model_id: {logged.model_id}\nflavors: {{}}\n")

    recorder = RunRecorder(client, team.run_id, tmp_path / "staging")
    checkpoint = recorder.log_model(names.CHECKPOINT_MODEL_NAME, 3, write, tags={names.MODEL_TAG_EPOCH: 3},
                                    slot=names.CHECKPOINT_MODEL_NAME)
    recorder.delete_model(checkpoint)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking.recorder"):
        recorder.close(timeout=60)  # no RecordingError: the refusal is no failure of the record
    assert client.get_logged_model(checkpoint.model_id).status == LoggedModelStatus.READY
    kept = [record.getMessage() for record in caplog.records if "is kept" in record.getMessage()]
    assert len(kept) == 1 and "checkpoint of step 3" in kept[0] and "MANAGE" in kept[0], kept
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", team.admin.auth[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team.admin.auth[1])
    client.delete_logged_model(checkpoint.model_id)
    found = client.search_logged_models([team.experiment_id], filter_string=f"source_run_id = '{team.run_id}'")
    assert checkpoint.model_id not in {model.model_id for model in found}
