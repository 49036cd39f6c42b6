"""`mlflow run` end to end, as users run it: a real MLflow Projects run of this directory."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import TrainingConfig
from tests.helpers import MNIST_SMALL, PROJECT_DIR, mlflow_project_run, new_sqlite_store
from tests.run_contract import assert_run_contract

pytestmark = pytest.mark.slow


# Left out of the project snapshot: git's and the virtualenv's own trees, and what Python, pytest,
# hypothesis and ruff write (anyone's test run in this checkout writes them).
_NOT_OURS = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache"}
# What a training writes, by name, if it wrote into its working directory: the default MLflow store
# (mlflow.db, ./mlruns, ./mlartifacts), compare's default output_dir, and the run's local files.
_PRODUCT_OUTPUTS = {
    "mlflow.db", "mlruns", "mlartifacts", "comparison", "staging", names.TRAINING_LOG_FILE, names.CHECKPOINT_DIR,
    names.BEST_MODEL_FILE, names.BEST_MODEL_INFO_FILE, names.LR_CHANGES_FILE, names.MODEL_SUMMARY_FILE,
    names.PLOTS_DIR, names.TRAINING_CURVES_FILE, names.CONFUSION_MATRIX_FILE, names.CLASSIFICATION_REPORT_FILE,
    names.STATE_DIR, *names.STATE_FILES, names.MODEL_NAME,
}


def _project_snapshot() -> dict[str, tuple[int, int]]:
    """Every path under the project directory, git-ignored ones included (mlruns/, mlflow.db,
    comparison/ ...), with its (mtime, size); see _NOT_OURS for what is left out."""
    snapshot = {}
    for directory, subdirectories, files in os.walk(PROJECT_DIR):
        subdirectories[:] = [name for name in subdirectories if name not in _NOT_OURS]
        for name in subdirectories + files:
            path = Path(directory) / name
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile by someone else
                status = path.stat()
                snapshot[str(path.relative_to(PROJECT_DIR))] = (status.st_mtime_ns, status.st_size)
    return snapshot


def written_into_the_project(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Paths that appeared between the two snapshots, and product outputs that changed. New .py and .md
    files are not counted (people edit this checkout while tests run; a training never writes those)."""
    new = [path for path in after if path not in before and Path(path).suffix not in (".py", ".md")]
    changed = [
        path for path in after
        if path in before and after[path] != before[path] and _PRODUCT_OUTPUTS & set(Path(path).parts)
    ]
    return sorted(new + changed)


def mlflow_run(tmp_path: Path, *params: str, env_manager: str = "local", timeout: float = 300):
    """`mlflow run` of the main entry point into a new store; the result, a client and the runs made."""
    uri = new_sqlite_store(tmp_path)
    result = mlflow_project_run(
        "main", dict(param.split("=", 1) for param in params), "project", tmp_path, {"MLFLOW_TRACKING_URI": uri},
        timeout, env_manager,
    )
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("project")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return result, client, runs


def test_mlflow_run_with_a_bad_parameter_fails_the_run_in_one_line(tmp_path):
    result, _, runs = mlflow_run(tmp_path, "epochs=0", f"dataset={MNIST_SMALL}")
    assert result.returncode != 0
    [run] = runs
    assert run.info.status == "FAILED"
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: parameter epochs='0' is invalid: allowed is an integer >= 1"]
    assert "Traceback" not in result.stderr.split("=== Run (ID")[0]


@pytest.mark.timeout(960)  # a cold uv cache downloads TensorFlow: up to the 900 s of the run itself
def test_mlflow_run_builds_its_environment_from_conda_yaml_with_uv_and_records_the_whole_contract(tmp_path):
    """What users run: `mlflow run . --env-manager uv` builds its environment from MLproject's conda.yaml, and
    the run in that environment records the whole contract."""
    before = _project_snapshot()
    result, client, runs = mlflow_run(
        tmp_path, "epochs=4", f"dataset={MNIST_SMALL}", "learning_rate=2e-3", "lr_patience=1", env_manager="uv",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = runs
    assert run.data.tags["mlflow.project.env"] == "uv"
    config = TrainingConfig.from_values(
        {"epochs": "4", "dataset": str(MNIST_SMALL), "learning_rate": "2e-3", "lr_patience": "1"}
    )
    # MLflow logged the entry point's parameters as typed ("2e-3"), and not the run option register_as,
    # which MLproject leaves out while it is empty; the pipeline added the rest.
    assert run.data.params["learning_rate"] == "2e-3"
    params_as_typed = config.as_params() | {"learning_rate": "2e-3"}
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        assert_run_contract(client, run.info.run_id, config, tmp_path, expected_params=params_as_typed)
    finally:
        mlflow.set_tracking_uri(None)
    assert "Epoch 4:" in result.stdout and f"Run {run.info.run_id}:" in result.stdout
    # nothing written into the project directory, the working directory of `mlflow run`'s entry point
    assert written_into_the_project(before, _project_snapshot()) == []
