"""`mlflow run` end to end, as users run it: a real MLflow Projects run of this directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import TrainingConfig
from tests.helpers import MNIST_SMALL, PROJECT_DIR, project_env
from tests.test_training import assert_run_contract

pytestmark = pytest.mark.slow


def _project_files() -> set[str]:
    tracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"], cwd=PROJECT_DIR, capture_output=True, text=True
    )
    return set(tracked.stdout.split()) if tracked.returncode == 0 else set(os.listdir(PROJECT_DIR))


def mlflow_run(tmp_path: Path, *params: str, env_manager: str = "local", timeout: float = 300):
    args = ["mlflow", "run", str(PROJECT_DIR), "--env-manager", env_manager, "--experiment-name", "project"]
    for param in params:
        args += ["-P", param]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run(
        args, cwd=tmp_path, env=project_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=timeout
    )
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("project")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return result, client, runs


def test_mlflow_run_records_the_whole_contract(tmp_path):
    before = _project_files()
    result, client, runs = mlflow_run(
        tmp_path, "epochs=4", f"dataset={MNIST_SMALL}", "learning_rate=2e-3", "lr_patience=1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = runs
    config = TrainingConfig.from_values(
        {"epochs": "4", "dataset": str(MNIST_SMALL), "learning_rate": "2e-3", "lr_patience": "1"}
    )
    # MLflow logged the entry point's parameters as typed ("2e-3"), and the empty run option
    # register_as shell-quoted; the pipeline added the rest.
    assert run.data.params["learning_rate"] == "2e-3"
    params_as_typed = config.as_params() | {"learning_rate": "2e-3", "register_as": "''"}
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        assert_run_contract(client, run.info.run_id, config, tmp_path, expected_params=params_as_typed)
    finally:
        mlflow.set_tracking_uri(None)
    assert "Epoch 4:" in result.stdout and f"Run {run.info.run_id}:" in result.stdout
    assert _project_files() == before  # nothing written into the project directory


def test_mlflow_run_with_a_bad_parameter_fails_the_run_in_one_line(tmp_path):
    result, _, runs = mlflow_run(tmp_path, "epochs=0", f"dataset={MNIST_SMALL}")
    assert result.returncode != 0
    [run] = runs
    assert run.info.status == "FAILED"
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: parameter epochs='0' is invalid: allowed is an integer >= 1"]
    assert "Traceback" not in result.stderr.split("=== Run (ID")[0]


def test_mlflow_run_builds_its_environment_from_conda_yaml_with_uv(tmp_path):
    result, _, runs = mlflow_run(tmp_path, "epochs=1", f"dataset={MNIST_SMALL}", env_manager="uv", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.env"] == "uv"
    assert names.TEST_ACCURACY in run.data.metrics
