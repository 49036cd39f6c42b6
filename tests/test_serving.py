"""The champion the `serve` service serves (pipeline/experiments/serving.py, `mnist-pipeline serve`): it waits,
saying so once, while the registered model or its alias does not exist, then serves the version the
alias points at. The compose stack test serves it for real (tests/test_compose_stack.py). And what
`mlflow models serve` writes per request for a model the pipeline logged: nothing."""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.experiments.runs import logged_models_by_run
from pipeline.experiments.serving import PARQUET_CONTENT_TYPE, wait_for_champion
from pipeline.tracking.model_logging import log_model
from pipeline.tracking.recorder import RunRecorder
from pipeline.training.model import build_model
from tests.helpers import free_ports, invoke, project_env, run_cli, wait_for_ping


def test_waits_while_there_is_no_champion_saying_so_once_then_returns_its_version(sqlite_store, caplog):
    client = MlflowClient()
    waits = []

    def sleep(seconds: float) -> None:  # what happens meanwhile: a model, a version, then the alias
        waits.append(seconds)
        if len(waits) == 1:
            client.create_registered_model("digits")
        elif len(waits) == 2:
            client.create_model_version("digits", "file:///nowhere", run_id=None)
            client.create_model_version("digits", "file:///nowhere", run_id=None)
        else:
            client.set_registered_model_alias("digits", names.CHAMPION_ALIAS, "1")

    with caplog.at_level(logging.INFO, logger="pipeline"):
        uri = wait_for_champion(client, "digits", poll_seconds=7, sleep=sleep)
    assert uri == "models:/digits/1"
    assert waits == [7, 7, 7]
    lines = [record.getMessage() for record in caplog.records if record.name == "pipeline.experiments.serving"]
    assert lines == ["No champion yet: models:/digits@champion does not exist; waiting for `register` to set it "
                     "(checking every 7 s)"]


def test_returns_at_once_when_the_champion_exists(sqlite_store):
    client = MlflowClient()
    client.create_registered_model("digits")
    for _ in range(2):
        client.create_model_version("digits", "file:///nowhere", run_id=None)
    client.set_registered_model_alias("digits", names.CHAMPION_ALIAS, "2")

    def never(seconds: float) -> None:
        pytest.fail("waited although the champion exists")

    assert wait_for_champion(client, "digits", poll_seconds=1, sleep=never) == "models:/digits/2"


def test_a_bad_model_name_exits_2_in_one_line(tmp_path):
    result = run_cli(["serve", "--model-name", "no spaces"], cwd=tmp_path,
                     MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and "model_name" in line


@pytest.mark.parametrize("args", [["--port", "0"], ["--poll-seconds", "0"]])
def test_out_of_range_options_exit_2_naming_the_option(args, tmp_path):
    """click's own usage error, as for every command's typed options."""
    result = run_cli(["serve", *args], cwd=tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 2
    assert f"Invalid value for '{args[0]}'" in result.stderr and "Traceback" not in result.stderr


# What one request may add to the scoring server's output (its access log line, ~100 bytes); a Keras
# progress bar of a model compiled with steps_per_execution=64 adds ~6.5 KB.
BYTES_PER_REQUEST = 300


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_scoring_server_writes_no_progress_bar_per_request(sqlite_store, tmp_path):
    """`mlflow models serve` of a model logged as a training logs it (compiled with steps_per_execution=64);
    its stdout and stderr together, as a container's log holds them."""
    model = build_model((16,), 0.0, 0.001, steps_per_execution=64)
    client = MlflowClient()
    # its own experiment, not whichever one an earlier test in this process made active
    mlflow.set_experiment("scoring-server-log")
    with mlflow.start_run() as run, RunRecorder(client, run.info.run_id, tmp_path / "staging") as recorder:
        log_model(recorder, model, np.zeros((5, 784), np.float32), tmp_path, deadline=float("inf"))
    model_id = logged_models_by_run(client, run.info.experiment_id, run.info.run_id)[run.info.run_id]
    rows = np.random.default_rng(2).random((40, 784), dtype=np.float32)
    [port] = free_ports(1)
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(
            ["mlflow", "models", "serve", "-m", f"models:/{model_id}", "--env-manager", "local", "-p", str(port)],
            cwd=tmp_path, env=project_env(MLFLOW_TRACKING_URI=sqlite_store), stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_ping(url, 120, lambda: server.poll() is not None and log.read_text(errors="replace")[-3000:])
        first = invoke(url, rows)  # what a first request may set up once
        before = log.stat().st_size  # what a request writes is written (and flushed) before it is answered
        # four as JSON, and one in a batch's format
        predictions = [invoke(url, rows) for _ in range(4)] + [invoke(url, rows, PARQUET_CONTENT_TYPE)]
        grown = log.stat().st_size - before
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    text = log.read_text(errors="replace")
    assert "\u2501" not in text, text[-1500:]  # Keras' progress bar: '━'
    assert grown < 5 * BYTES_PER_REQUEST, text[-1500:]
    np.testing.assert_allclose(first, model.predict(rows, verbose=0), atol=1e-6)
    for again in predictions:
        np.testing.assert_array_equal(again, first)

