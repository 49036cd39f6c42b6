"""Sweep processes at the edges: several separately started `sweep` processes (pods) on one grid study,
forced to queue it at the same moment; workers killed, a sweep stopped by Ctrl-C or SIGTERM, then continued."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.experiments.sweep import BARRIER_VARIABLE
from tests.conftest import create_database, drop_database
from tests.helpers import MNIST_SMALL, cli_options, new_sqlite_store, project_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
FIXED = {"dataset": str(MNIST_SMALL), "epochs": "1", "lr_patience": "1", "es_patience": "5"}
GRID = {"learning_rate": "0.01,0.003", "dropout": "0.1,0.3"}  # 4 points


@pytest.fixture
def study_database() -> str:
    """A PostgreSQL database of its own for Optuna (as a team gives the study next to MLflow's)."""
    name, uri = create_database("mnist_study")
    yield uri
    drop_database(name)


def _sweep_process(tmp_path: Path, uri: str, values: dict[str, str], experiment: str, **env: str) -> subprocess.Popen:
    """`python -m mlflow_project sweep ...` as a pod or a user starts it, output to files in tmp_path."""
    log = tmp_path / f"sweep-{time.monotonic_ns()}"
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow_project", "sweep", "--experiment-name", experiment, *cli_options(values)],
        cwd=tmp_path, env=project_env(MLFLOW_TRACKING_URI=uri, **env),
        stdout=open(f"{log}.out", "w"), stderr=open(f"{log}.err", "w"),  # noqa: SIM115 - closed with the process
    )


def _wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"not within {timeout} s: {what}")


def test_pods_started_together_train_each_grid_point_once(tmp_path, study_database):
    # Three identical pods (deploy/kubernetes/sweep/job.yaml with sampler=grid) held at a barrier just
    # before they queue the grid, then released together.
    uri = new_sqlite_store(tmp_path)
    MlflowClient(uri).create_experiment("pods")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    values = FIXED | GRID | {"sampler": "grid", "study": "pods", "storage": study_database}
    pods = [_sweep_process(tmp_path, uri, values, "pods", **{BARRIER_VARIABLE: str(barrier)}) for _ in range(3)]
    try:
        _wait_for(lambda: len(list(barrier.glob("waiting-*"))) == 3 or any(p.poll() is not None for p in pods),
                  240, "every pod at the barrier")
        assert all(pod.poll() is None for pod in pods), [pod.returncode for pod in pods]
        (barrier / "go").touch()
        codes = [pod.wait(timeout=300) for pod in pods]
    finally:
        for pod in pods:
            pod.kill()
    errors = "".join(path.read_text()[-2000:] for path in tmp_path.glob("sweep-*.err"))
    assert codes == [0, 0, 0], errors

    study = optuna.load_study(study_name="pods", storage=study_database)
    trials = [(trial.state.name, trial.params.get("learning_rate"), trial.params.get("dropout"))
              for trial in study.trials]
    assert sorted(trials) == [("COMPLETE", 0.003, 0.1), ("COMPLETE", 0.003, 0.3), ("COMPLETE", 0.01, 0.1),
                              ("COMPLETE", 0.01, 0.3)], trials  # each point trained once, nothing else queued
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("pods").experiment_id
    [parent] = client.search_runs([experiment_id], f"tags.{names.TAG_RUN_TYPE} = '{names.RUN_TYPE_SWEEP}'")
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.data.tags[names.TAG_SWEEP_TRIAL] for run in children) == ["1", "2", "3", "4"]
    assert all(run.info.status == "FINISHED" for run in children)
    assert parent.info.status == "FINISHED" and parent.data.tags[names.TAG_FINISHED_TRIALS] == "4"
