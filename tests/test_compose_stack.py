"""The team stack for real: the project's unchanged docker-compose.yml, Dockerfiles and start script
brought up with Docker Compose v2 and a fresh .env of generated secrets, then used from the host as
docs/team-server.md says a teammate uses it: over HTTPS through the proxy, with certificate verification
on (the client trusts the proxy's internal CA, copied out as the docs show), each job with its account.

Marker `compose`, run by `make test-compose` (not by `make test`): it needs a Docker engine, Compose v2
and the images the compose file names (nothing is pulled here; `up --build` builds the project's own).
MNIST_COMPOSE_EXTRA_FILES adds compose files (separated by ':'), e.g. the stand-in override that CI
uses on a machine without registry access. The containers, their health and logs are read with the
Docker SDK. The tests share one stack and run in file order; each names the steps it needs as fixtures.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import numpy as np
import pytest
import requests
from docker.models.containers import Container
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import TrainingConfig
from pipeline.training.data import load_dataset
from tests.helpers import (
    MNIST_SMALL,
    PROJECT_DIR,
    free_ports,
    invoke,
    mlflow_project_run,
    models_serve,
    predict_in_new_process,
    project_env,
    run_cli,
)
from tests.run_contract import assert_run_contract
from tests.test_server_load import play_load

# One test waits for the images to build on a machine that has not built them yet.
pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

PROJECT_NAME = "mnist-pipeline-test"  # not the stack's own name: a team's stack on this machine is left alone
EXTRA_FILES = "MNIST_COMPOSE_EXTRA_FILES"
EXPERIMENT = MODEL = "mnist-mlp"
BUCKET = "mlflow-artifacts"
LONG_RUNNING = ("postgres", "objectstore", "mlflow", "proxy")
# Where the proxy keeps its internal CA's root certificate (docs/team-server.md copies it out from there).
CA_IN_PROXY = "/data/caddy/pki/authorities/local/root.crt"
# A client process loading a model and predicting, after its imports; minutes when broken (the client retries).
LOAD_SECONDS = 60
# The host's training is made weak on purpose, so that the trainer container's run beats it.
HOST_VALUES = {"epochs": "1", "dataset": str(MNIST_SMALL), "learning_rate": "1e-05"}
CONTAINER_EPOCHS = "2"
DATA_IN_CONTAINER = "/data/mnist.npz"
ROW_COUNT = 40


@functools.cache
def _rows() -> np.ndarray:
    """The rows every prediction of these tests is made on (read when first needed, not at collection)."""
    return load_dataset(str(MNIST_SMALL)).x_test[:ROW_COUNT]


@dataclass
class Stack:
    """The stack under test: its .env, where it is published, and how to reach it."""

    env_file: Path
    settings: dict[str, str]
    engine: docker.DockerClient
    ca_file: Path  # the proxy's root certificate, once copied out

    @property
    def uri(self) -> str:
        return f"https://127.0.0.1:{self.settings['MLFLOW_HTTPS_PORT']}"

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.settings['SERVE_PORT']}"

    @property
    def admin(self) -> tuple[str, str]:
        return self.settings["MLFLOW_ADMIN_USERNAME"], self.settings["MLFLOW_ADMIN_PASSWORD"]

    @property
    def training(self) -> tuple[str, str]:
        return self.settings["MLFLOW_TRAINING_USERNAME"], self.settings["MLFLOW_TRAINING_PASSWORD"]

    @property
    def serving(self) -> tuple[str, str]:
        return self.settings["MLFLOW_SERVING_USERNAME"], self.settings["MLFLOW_SERVING_PASSWORD"]

    def client_environment(self, account: tuple[str, str] | None = None) -> dict[str, str]:
        """The variables docs/team-server.md tells a teammate to set, and nothing else (no store keys): the
        training account's unless another is given."""
        username, password = account or self.training
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": username,
                "MLFLOW_TRACKING_PASSWORD": password, "MLFLOW_TRACKING_SERVER_CERT_PATH": str(self.ca_file)}

    def client(self, account: tuple[str, str] | None = None) -> MlflowClient:
        os.environ.update(self.client_environment(account or self.admin))  # read at each request
        return MlflowClient(self.uri)

    def api(self, method: str, path: str, account: tuple[str, str], **kwargs) -> requests.Response:
        """One REST call through the proxy, the certificate checked against the stack's CA."""
        return requests.request(method, f"{self.uri}{path}", auth=account, verify=str(self.ca_file), timeout=30,
                                **kwargs)

    def compose(self, *args: str, env_file: Path | None = None, timeout: float = 900,
                check: bool = True) -> subprocess.CompletedProcess:
        """`docker compose ARGS` on the project's docker-compose.yml (plus MNIST_COMPOSE_EXTRA_FILES)."""
        command = ["docker", "compose", "--project-name", PROJECT_NAME, "--project-directory", str(PROJECT_DIR),
                   "--env-file", str(env_file or self.env_file), "--file", str(PROJECT_DIR / "docker-compose.yml")]
        for extra in filter(None, os.environ.get(EXTRA_FILES, "").split(":")):
            command += ["--file", extra]
        # Variables of the shell would override the .env file's: only the file speaks.
        environment = {k: v for k, v in os.environ.items() if k not in self.settings}
        result = subprocess.run(command + list(args), env=environment, capture_output=True, text=True,
                                timeout=timeout)
        if check:
            assert result.returncode == 0, f"docker compose {' '.join(args)}: {result.stderr[-4000:]}"
        return result

    def containers(self) -> dict[str, Container]:
        """The stack's service containers by service name (not one-off `run` containers)."""
        found = self.engine.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={PROJECT_NAME}"}
        )
        return {c.labels["com.docker.compose.service"]: c for c in found
                if c.labels.get("com.docker.compose.oneoff") != "True"}

    def health(self, service: str) -> str | None:
        container = self.containers().get(service)
        return container.attrs["State"].get("Health", {}).get("Status") if container else None

    def logs(self, service: str) -> str:
        return self.containers()[service].logs().decode(errors="replace")

    def wait_healthy(self, services: tuple[str, ...], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = {service: self.health(service) for service in services}
            if all(state == "healthy" for state in states.values()):
                return
            if time.monotonic() > deadline:
                logs = {service: self.logs(service)[-1500:] for service in services if service in self.containers()}
                pytest.fail(f"not healthy within {timeout} s: {states}\n{logs}")
            time.sleep(2)

    def restart_serve(self) -> None:
        """What `register` prints when the alias moves, and the service healthy again."""
        self.compose("--profile", "serve", "restart", "serve")
        self.wait_healthy(("serve",))


def _fresh_settings() -> dict[str, str]:
    """.env.example with every empty secret filled with a new random one, on free ports."""
    settings = {}
    for line in (PROJECT_DIR / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            settings[name] = value or secrets.token_urlsafe(24)
    https_port, serve_port = free_ports(2)
    settings.update(
        MLFLOW_HTTPS_PORT=str(https_port), MLFLOW_UI_URL=f"https://127.0.0.1:{https_port}",
        SERVE_PORT=str(serve_port), EPOCHS=CONTAINER_EPOCHS, DATASET=DATA_IN_CONTAINER,
    )
    return settings


def _write_env_file(path: Path, settings: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    return path


def _require_compose_v2() -> None:
    version = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0 or not re.match(r"v?2\.", version.stdout.strip()):
        pytest.fail(f"this test needs Docker Compose v2 (`docker compose version`): {version.stderr.strip()}")


@contextlib.contextmanager
def running_stack(workdir: Path, profile: str) -> Iterator[Stack]:
    """The stack of docker-compose.yml with fresh secrets, `profile`'s images built, up and healthy, the
    internal CA's root copied out of the proxy (as docs/team-server.md shows); afterwards its logs are kept
    in `workdir` and everything of `profile` goes down with its volumes."""
    _require_compose_v2()
    settings = _fresh_settings()
    stack = Stack(_write_env_file(workdir / ".env", settings), settings, docker.from_env(version="auto"),
                  workdir / "mlflow-ca.crt")
    stack.compose("--profile", profile, "down", "--volumes", "--remove-orphans")  # an aborted run's leftovers
    try:
        stack.compose("--profile", profile, "build", timeout=1800)
        stack.compose("up", "--detach", timeout=900)
        stack.wait_healthy(LONG_RUNNING)
        stack.compose("cp", f"proxy:{CA_IN_PROXY}", str(stack.ca_file))
        yield stack
    finally:
        logs = stack.compose("--profile", profile, "logs", "--no-color", check=False)
        (workdir / "compose.log").write_text(logs.stdout + logs.stderr)
        stack.compose("--profile", profile, "down", "--volumes", "--remove-orphans", check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("compose"), "serve") as running:
        yield running


@pytest.fixture(scope="module")
def waiting_serve(stack: Stack) -> Container:
    """The `serve` profile started before any model is registered."""
    stack.compose("--profile", "serve", "up", "--detach", "--build", "serve", timeout=1800)
    deadline = time.monotonic() + 180
    while "No champion yet" not in stack.logs("serve") and time.monotonic() < deadline:
        time.sleep(2)
    return stack.containers()["serve"]


@pytest.fixture(scope="module")
def host_run(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A training from the host: `mlflow run .` with the admin's credentials, as README shows."""
    result = mlflow_project_run("main", HOST_VALUES, EXPERIMENT, tmp_path_factory.mktemp("host-run"),
                                stack.client_environment(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [run_id] = re.findall(r"^Run (\w+): test_accuracy=", result.stdout, flags=re.MULTILINE)
    return run_id


def _register(stack: Stack, cwd: Path) -> subprocess.CompletedProcess:
    result = run_cli(["register", "--model-name", MODEL, "--experiment-name", EXPERIMENT], cwd=cwd,
                     **stack.client_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def first_registration(stack, host_run, waiting_serve, tmp_path_factory) -> subprocess.CompletedProcess:
    return _register(stack, tmp_path_factory.mktemp("register"))


@pytest.fixture(scope="module")
def container_run(stack: Stack, first_registration) -> tuple[subprocess.CompletedProcess, str]:
    """The trainer profile with the local data mounted as README shows (EPOCHS, DATASET from .env)."""
    result = stack.compose("--profile", "train", "run", "--rm", "--volume",
                           f"{MNIST_SMALL}:{DATA_IN_CONTAINER}:ro", "trainer", check=False, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    [run_id] = re.findall(r"^Run (\w+): test_accuracy=", result.stdout, flags=re.MULTILINE)
    return result, run_id


@pytest.fixture(scope="module")
def second_registration(stack, container_run, tmp_path_factory) -> subprocess.CompletedProcess:
    return _register(stack, tmp_path_factory.mktemp("register-again"))


def _champion_predictions(stack: Stack, cwd: Path) -> np.ndarray:
    """What a teammate's notebook gets from models:/mnist-mlp@champion (default settings, no store keys)."""
    predictions, seconds = predict_in_new_process(
        f"models:/{MODEL}@{names.CHAMPION_ALIAS}", _rows(), cwd, project_env(**stack.client_environment(stack.serving))
    )
    assert seconds < LOAD_SECONDS
    return predictions


def test_the_services_come_up_healthy_and_the_bucket_job_succeeds(stack):
    containers = stack.containers()
    assert {service: stack.health(service) for service in LONG_RUNNING} == dict.fromkeys(LONG_RUNNING, "healthy")
    bucket_job = containers["create-bucket"].attrs["State"]
    assert (bucket_job["Status"], bucket_job["ExitCode"]) == ("exited", 0)
    assert f"bucket {BUCKET} created" in stack.logs("create-bucket")
    # only the UI/API is published, on 127.0.0.1; PostgreSQL and the object store are not
    published = {service: {port: [binding["HostIp"] for binding in bindings]
                           for port, bindings in (c.attrs["HostConfig"]["PortBindings"] or {}).items()}
                 for service, c in containers.items()}
    # the MLflow server's own port is not published: only the proxy's HTTPS port is
    assert published == {"postgres": {}, "objectstore": {}, "create-bucket": {}, "mlflow": {},
                         "proxy": {"443/tcp": ["127.0.0.1"]}}
    assert "create-accounts: user trainer created" in stack.logs("mlflow")


def test_requests_without_the_right_credentials_get_401(stack):
    search = "/api/2.0/mlflow/experiments/search"
    username, password = stack.admin
    assert stack.api("GET", search, None, params={"max_results": 1}).status_code == 401
    wrong = (username, password + "x")
    assert stack.api("GET", search, wrong, params={"max_results": 1}).status_code == 401
    assert stack.api("GET", search, stack.admin, params={"max_results": 1}).status_code == 200
    assert stack.api("GET", "/health", None).status_code == 200


def test_plain_http_to_the_published_port_never_reaches_the_api(stack):
    plain = f"http://127.0.0.1:{stack.settings['MLFLOW_HTTPS_PORT']}"
    for path in ("/api/2.0/mlflow/experiments/search?max_results=1", "/health", "/"):
        answer = requests.get(plain + path, auth=stack.admin, timeout=30, allow_redirects=False)
        # Caddy's refusal (or a redirect to https), never MLflow's answer
        refused = answer.status_code == 400 and "HTTP request to an HTTPS server" in answer.text
        redirected = answer.status_code in (301, 302, 307, 308) and answer.headers["Location"].startswith("https://")
        assert refused or redirected, (path, answer.status_code, answer.text[:300])
        assert "experiments" not in answer.text and answer.text.strip() != "OK"
    # HTTPS is verified: a client that does not trust the stack's CA refuses the certificate
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{stack.uri}/health", timeout=30)


def test_each_job_has_its_account_and_only_the_server_holds_the_admin_password(stack, host_run, waiting_serve):
    """The serving account reads its model only and writes nothing; the training account manages no users;
    no container but the server's has the admin password in its environment."""
    other = stack.api("POST", "/api/2.0/mlflow/registered-models/create", stack.admin, json={"name": "other-model"})
    assert other.status_code == 200, other.text
    refused = {
        "serving creates an experiment": stack.api("POST", "/api/2.0/mlflow/experiments/create", stack.serving,
                                                   json={"name": "by-serving"}),
        "serving deletes a run": stack.api("POST", "/api/2.0/mlflow/runs/delete", stack.serving,
                                           json={"run_id": host_run}),
        "serving reads another model": stack.api("GET", "/api/2.0/mlflow/registered-models/get", stack.serving,
                                                 params={"name": "other-model"}),
        "training creates a user": stack.api("POST", "/api/2.0/mlflow/users/create", stack.training,
                                             json={"username": "by-training", "password": "x" * 16}),
    }
    assert {action: answer.status_code for action, answer in refused.items()} == dict.fromkeys(refused, 403)
    assert stack.client().get_run(host_run).info.lifecycle_stage == "active"
    assert stack.api("GET", "/api/2.0/mlflow/users/get", stack.admin,
                     params={"username": "by-training"}).status_code == 404
    # the serve service's environment, as `docker compose exec serve env` shows it
    environment = stack.compose("--profile", "serve", "exec", "-T", "serve", "env").stdout
    assert f"MLFLOW_TRACKING_USERNAME={stack.serving[0]}" in environment.splitlines()
    admin_password = stack.admin[1]
    assert admin_password not in environment
    # the trainer's, and every container's but the server's
    trainer = stack.compose("--profile", "train", "run", "--rm", "--no-deps", "trainer", "env").stdout
    assert f"MLFLOW_TRACKING_USERNAME={stack.training[0]}" in trainer.splitlines()
    assert admin_password not in trainer
    holders = {service for service, container in stack.containers().items()
               if any(admin_password in variable for variable in container.attrs["Config"]["Env"])}
    assert holders == {"mlflow"}


def test_a_missing_secret_stops_compose_with_the_documented_message(stack, tmp_path):
    settings = {k: v for k, v in stack.settings.items() if k != "MLFLOW_ADMIN_PASSWORD"}
    result = stack.compose("config", env_file=_write_env_file(tmp_path / ".env", settings), check=False)
    assert result.returncode != 0
    assert "MLFLOW_ADMIN_PASSWORD is missing: set it in .env (see .env.example)" in result.stderr


def test_a_training_from_the_host_records_the_whole_contract_with_its_objects_in_the_bucket(
    stack, host_run, tmp_path
):
    client = stack.client()
    config = TrainingConfig.from_values(HOST_VALUES)
    assert_run_contract(client, host_run, config, tmp_path, expected_params=config.as_params())
    model_id = client.search_logged_models([client.get_run(host_run).info.experiment_id],
                                           filter_string=f"name = '{names.MODEL_NAME}' AND source_run_id = '{host_run}'"
                                           )[0].model_id
    # the bucket, listed through the S3 API by the one service that holds the keys
    listing = (
        "import boto3, botocore.config, os; s3 = boto3.client('s3', endpoint_url=os.environ['MLFLOW_S3_ENDPOINT_URL'],"
        " config=botocore.config.Config(s3={'addressing_style': 'path'})); "
        f"print('\\n'.join(o['Key'] for p in s3.get_paginator('list_objects_v2').paginate(Bucket='{BUCKET}')"
        " for o in p.get('Contents', [])))"
    )
    code, output = stack.containers()["mlflow"].exec_run(["python", "-c", listing])
    keys = output.decode().splitlines()
    assert code == 0, output.decode()[-2000:]
    checkpoint = rf"{host_run}/artifacts/{names.CHECKPOINT_DIR}/{names.CHECKPOINT_EPOCH_PREFIX}\d+/"
    checkpoint += names.BEST_MODEL_FILE
    assert any(re.search(checkpoint + "$", key) for key in keys), keys
    assert any(key.endswith(f"models/{model_id}/artifacts/MLmodel") for key in keys), keys


def test_serve_without_a_champion_says_so_once_and_stays_unhealthy(stack, waiting_serve):
    log = stack.logs("serve")
    assert log.count(f"No champion yet: models:/{MODEL}@{names.CHAMPION_ALIAS} does not exist") == 1, log
    waiting_serve.reload()
    assert waiting_serve.attrs["State"]["Status"] == "running" and waiting_serve.attrs["RestartCount"] == 0
    # the health probe has run and failed (inside start_period the status alone says only "starting")
    deadline = time.monotonic() + 60
    while not (probes := waiting_serve.attrs["State"]["Health"]["Log"]) and time.monotonic() < deadline:
        time.sleep(1)
        waiting_serve.reload()
    assert probes and all(probe["ExitCode"] != 0 for probe in probes), probes
    assert waiting_serve.attrs["State"]["Health"]["Status"] != "healthy"
    # running as the image's user, not root; published on 127.0.0.1 only
    assert waiting_serve.attrs["Config"]["User"] == "trainer"
    [binding] = waiting_serve.attrs["HostConfig"]["PortBindings"]["5001/tcp"]
    assert binding == {"HostIp": "127.0.0.1", "HostPort": stack.settings["SERVE_PORT"]}


def test_register_moves_the_champion_and_teammates_load_and_serve_it_in_seconds(
    stack, host_run, first_registration, tmp_path
):
    assert f"{MODEL}@{names.CHAMPION_ALIAS} moved to version 1" in first_registration.stdout
    assert "docker compose --profile serve restart serve" in first_registration.stdout
    assert stack.client().get_model_version_by_alias(MODEL, names.CHAMPION_ALIAS).run_id == host_run
    predictions = _champion_predictions(stack, tmp_path)
    assert predictions.shape == (ROW_COUNT, 10)
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, rtol=1e-5)
    with models_serve(f"models:/{MODEL}@{names.CHAMPION_ALIAS}", tmp_path,
                      project_env(**stack.client_environment(stack.serving))) as url:
        np.testing.assert_allclose(invoke(url, _rows()), predictions, atol=1e-6)


def test_the_serve_profile_answers_with_the_champions_predictions(stack, first_registration, tmp_path):
    stack.restart_serve()  # healthy: /ping answers
    np.testing.assert_allclose(invoke(stack.serve_url, _rows()), _champion_predictions(stack, tmp_path), atol=1e-6)


def test_the_trainer_profile_trains_inside_the_network_and_prints_links_people_can_open(stack, container_run):
    result, run_id = container_run
    run = stack.client().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == CONTAINER_EPOCHS
    assert run.data.params["dataset"] == DATA_IN_CONTAINER
    assert re.search(rf"^View it at {re.escape(stack.uri)}/#/experiments/\d+/runs/{run_id}$", result.stdout,
                     re.MULTILINE), result.stdout
    console = result.stdout + result.stderr
    assert "http://mlflow:5000" not in console and "Bad git executable" not in console


def test_the_served_model_follows_the_champion_after_a_restart(stack, host_run, container_run,
                                                                 second_registration, tmp_path):
    _, run_id = container_run
    before = invoke(stack.serve_url, _rows())  # still the host run's model
    assert f"{MODEL}@{names.CHAMPION_ALIAS} moved to version 2" in second_registration.stdout
    assert stack.client().get_model_version_by_alias(MODEL, names.CHAMPION_ALIAS).run_id == run_id
    stack.restart_serve()
    after = invoke(stack.serve_url, _rows())
    np.testing.assert_allclose(after, _champion_predictions(stack, tmp_path), atol=1e-6)
    assert not np.allclose(after, before, atol=1e-3)


@pytest.mark.timeout(300)
def test_eight_trainings_at_once_through_the_proxy_lose_nothing_and_surface_no_error(stack, tmp_path):
    """bench/server_load.py's eight trainings, with the training account over HTTPS, as a team's sweep
    records; its experiment is its own (the later tests count the runs of theirs)."""
    play_load(stack.client(stack.training), stack.uri, stack.client_environment(), tmp_path)


def test_down_then_up_keeps_runs_and_users(stack, host_run, container_run):
    _, container_run_id = container_run
    teammate, password = "teammate", secrets.token_urlsafe(16)
    # docs/team-server.md's "Add a teammate", as the admin
    added = subprocess.run(
        [sys.executable, "-c", "from pipeline.tracking.accounts import Account, add_teammate; "
         f"add_teammate('{stack.uri}', Account('{teammate}', '{password}'))"],
        env=project_env(**stack.client_environment(stack.admin)), capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr[-3000:]
    stack.compose("--profile", "serve", "down")
    assert stack.containers() == {}
    stack.compose("up", "--detach", timeout=600)
    stack.wait_healthy(LONG_RUNNING)
    client = stack.client()
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert {run.info.run_id: run.info.status for run in runs} == {host_run: "FINISHED", container_run_id: "FINISHED"}
    assert client.get_model_version_by_alias(MODEL, names.CHAMPION_ALIAS).run_id == container_run_id
    # the teammate's account and READ on everything came back with the runs
    found = stack.api("POST", "/api/2.0/mlflow/runs/search", (teammate, password),
                      json={"experiment_ids": [runs[0].info.experiment_id]})
    assert found.status_code == 200, found.text
    assert {run["info"]["run_id"] for run in found.json()["runs"]} == {host_run, container_run_id}
