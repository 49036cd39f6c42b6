"""The team server with an S3 artifact store, without Docker: moto's S3 server on loopback (as MLflow's
own tests use it), the bucket job, a training through the server, and model loads by a client that
has default settings and none of the store's keys, in seconds.

The compose stack keeps its artifacts in S3 behind the server; a host client once could not load any
model from it (presigned URLs on the compose-internal store host) or waited minutes (`runs:/`).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import requests

from pipeline import constants as names
from pipeline.tracking.server import TrackingServer
from pipeline.tracking.server_stores import ArtifactStore
from tests.helpers import MNIST_SMALL, PROJECT_DIR, free_ports, predict_each_in_one_new_process, project_env, run_cli

pytestmark = pytest.mark.slow

BUCKET = "mlflow-artifacts"
# A client process loading a model and predicting, after its imports; minutes when broken (the client retries).
LOAD_SECONDS = 60
# `runs:/<id>/model` the same way: the client's first request (the run artifact `model`) must fail at once.
RUNS_URI_SECONDS = 30


@pytest.fixture(scope="module")
def s3_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real S3 API on 127.0.0.1 (moto's server, in memory), and the settings only the server gets."""
    [port] = free_ports(1)
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as output:
        moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(f"{endpoint}/moto-api/", timeout=2)
            break
        except requests.ConnectionError:
            assert moto.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.3)
    try:
        yield {
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": secrets.token_hex(8),
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        os.killpg(moto.pid, signal.SIGTERM)
        moto.wait(timeout=30)


def _create_bucket(s3_settings: dict[str, str]) -> subprocess.CompletedProcess:
    """docker/create-bucket.py, as the compose `create-bucket` job runs it."""
    return subprocess.run(
        [sys.executable, str(PROJECT_DIR / "docker" / "create-bucket.py")],
        env=os.environ | s3_settings | {"S3_BUCKET": BUCKET}, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def s3_server(s3_settings: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    created = _create_bucket(s3_settings)
    assert created.returncode == 0 and created.stdout.strip() == f"bucket {BUCKET} created", created.stderr
    root = tmp_path_factory.mktemp("s3-server")
    with TrackingServer(root, artifact_store=ArtifactStore(f"s3://{BUCKET}/", s3_settings)) as server:
        yield server


def test_the_bucket_job_finds_an_existing_bucket_and_does_nothing(s3_server, s3_settings):
    again = _create_bucket(s3_settings)
    assert again.returncode == 0 and again.stdout.strip() == f"bucket {BUCKET} exists", again.stderr


def test_the_server_advertises_no_transfers_that_bypass_it(s3_server):
    """With these off, every MLflow client downloads and uploads through the server (default settings)."""
    info = requests.get(
        f"{s3_server.uri}/api/3.0/mlflow/server-info", auth=(s3_server.username, s3_server.password), timeout=10
    ).json()
    assert info["multipart_downloads_enabled"] is False and info["multipart_uploads_enabled"] is False, info


def _load_and_predict(model_uris: list[str], server: TrackingServer, cwd: Path,
                      rows: np.ndarray | None = None) -> list[tuple[np.ndarray, float]]:
    """Loads each of `model_uris` in turn in one new client process with default settings (no MLFLOW_* beyond the
    server's URI and credentials) and no store keys; predicts `rows` (3 rows of zeros by default)."""
    environment = project_env(**server.client_environment())
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"} & set(environment)
    assert {name for name in environment if name.startswith("MLFLOW_")} == set(server.client_environment())
    rows = np.zeros((3, 784), np.float32) if rows is None else rows
    return predict_each_in_one_new_process(model_uris, rows, cwd, environment)


def _assert_class_probabilities(predictions: np.ndarray) -> None:
    assert predictions.shape == (3, 10)
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, rtol=1e-5)


@pytest.fixture(scope="module")
def trained(s3_server, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """One training through the S3-backed server: (experiment name, run id, model id)."""
    experiment = "s3-artifacts"
    ui_url = "http://ui.example:8080"  # what people open, as the compose trainer is given it
    trained = run_cli(
        ["train", "--epochs", "1", "--dataset", str(MNIST_SMALL), "--hidden-units", "32",
         "--experiment-name", experiment], cwd=tmp_path_factory.mktemp("train"), **s3_server.client_environment(),
        MNIST_PIPELINE_UI_URL=ui_url,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_id = re.search(r"^Run (\w+):", trained.stdout, re.MULTILINE).group(1)
    assert re.search(rf"^View it at {ui_url}/#/experiments/\d+/runs/{run_id}$", trained.stdout, re.MULTILINE)
    model_id = re.search(r"^Model: models:/(m-\w+)$", trained.stdout, re.MULTILINE).group(1)
    return experiment, run_id, model_id


def test_a_training_stores_its_artifacts_in_the_bucket_and_any_client_loads_the_model_in_seconds(
    s3_server, s3_settings, trained, tmp_path
):
    experiment, run_id, model_id = trained
    s3 = boto3.client(
        "s3", endpoint_url=s3_settings["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id=s3_settings["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_settings["AWS_SECRET_ACCESS_KEY"], region_name=s3_settings["AWS_DEFAULT_REGION"],
    )
    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for item in page.get("Contents", [])]
    checkpoint = rf"{run_id}/artifacts/{names.CHECKPOINT_DIR}/{names.CHECKPOINT_EPOCH_PREFIX}\d+/"
    checkpoint += names.BEST_MODEL_FILE
    assert any(re.search(checkpoint + "$", key) for key in keys), keys
    assert any(key.endswith(f"models/{model_id}/artifacts/MLmodel") for key in keys), keys

    registered = run_cli(
        ["register", "--model-name", "s3-mlp", "--experiment-name", experiment], cwd=tmp_path,
        **s3_server.client_environment(),
    )
    assert registered.returncode == 0, registered.stderr[-3000:]
    assert "models:/s3-mlp@champion" in registered.stdout
    assert "docker compose --profile serve restart serve" in registered.stdout  # against a server, the alias moved
    # one client process loads both (the logged model first, as a new process does)
    for predictions, seconds in _load_and_predict([f"models:/{model_id}", "models:/s3-mlp@champion"], s3_server,
                                                  tmp_path):
        _assert_class_probabilities(predictions)
        assert seconds < LOAD_SECONDS

    # every byte went through the server: no client was handed a presigned URL on the store
    assert "/mlflow-artifacts/presigned/" not in s3_server.log_path.read_text()


def test_a_missing_artifact_answers_404_as_mlflow_does_for_a_local_store(s3_server, trained):
    """The request a `runs:/<id>/model` load makes first: the run artifact `model`, which MLflow 3 no longer
    writes (the model is a LoggedModel). MLflow answers a missing S3 object with 500, which clients retry."""
    _, run_id, _ = trained
    auth = (s3_server.username, s3_server.password)
    run = requests.get(f"{s3_server.uri}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, auth=auth,
                       timeout=10).json()["run"]
    root = run["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/")  # mlflow-artifacts:/EXPERIMENT/RUN/artifacts
    assert root.endswith(f"{run_id}/artifacts"), root
    answer = requests.get(f"{s3_server.uri}/api/2.0/mlflow-artifacts/artifacts/{root}/model", auth=auth, timeout=30)
    assert answer.status_code == 404, answer.text
    assert answer.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    assert answer.json()["message"] == f"No such artifact: '{root}/model'"
    pointer = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}[names.TAG_LATEST_CHECKPOINT]
    present = requests.get(f"{s3_server.uri}/api/2.0/mlflow-artifacts/artifacts/{root}/{pointer}", auth=auth,
                           timeout=30)
    assert present.status_code == 200 and len(present.content) > 1000


@pytest.mark.timeout(600)  # minutes when broken: the failure must show as the time, not as a test timeout
def test_a_default_client_loads_runs_uri_in_seconds_and_it_predicts_like_the_logged_model(
    s3_server, trained, tmp_path
):
    """`runs:/<run id>/model`, MLflow's everyday form, with a default client (no retry settings)."""
    _, run_id, model_id = trained
    rows = np.random.default_rng(0).random((3, 784), dtype=np.float32)
    # runs:/ first: its load is a new process's (the models:/ load after it, in the same process, is only compared)
    (by_run, seconds), (by_model, _) = _load_and_predict([f"runs:/{run_id}/model", f"models:/{model_id}"], s3_server,
                                                         tmp_path, rows)
    assert seconds < RUNS_URI_SECONDS, f"runs:/ took {seconds:.0f} s"
    np.testing.assert_allclose(by_run, by_model, atol=1e-6)
    assert by_run.shape == (3, 10)
