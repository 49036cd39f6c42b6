"""The sweep entry point: a real `mlflow run -e sweep` with a deliberately diverging learning rate."""

from __future__ import annotations

import csv
import uuid

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import TrainingConfig
from tests.helpers import MNIST_SMALL, mlflow_project_run, one_line_error, run_cli
from tests.run_contract import assert_run_contract

pytestmark = pytest.mark.slow


def test_sweep_runs_every_trial_as_a_child_and_goes_on_after_a_failure(shared_tracking, tmp_path, monkeypatch):
    uri = shared_tracking["MLFLOW_TRACKING_URI"]
    for name, value in shared_tracking.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(uri)
    experiment = f"sweep-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(experiment)
    # 2 x 2 grid; learning_rate=1e30 makes the loss NaN at once, so its trials fail for real.
    grid = {"learning_rate": "1e30,0.002", "dropout": "0.1,0.2"}
    fixed = {"epochs": "2", "dataset": str(MNIST_SMALL), "lr_patience": "1"}
    result = mlflow_project_run("sweep", grid | fixed, experiment, tmp_path, shared_tracking)
    assert result.returncode == 0, result.stderr[-3000:]

    [parent] = client.search_runs([experiment_id], f"tags.{names.TAG_RUN_TYPE} = '{names.RUN_TYPE_SWEEP}'")
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {int(run.data.tags[names.TAG_SWEEP_TRIAL]): run for run in children}
    assert sorted(by_trial) == [0, 1, 2, 3]  # Optuna's trial numbers
    expected = {0: ("1e+30", "0.1"), 1: ("1e+30", "0.2"), 2: ("0.002", "0.1"), 3: ("0.002", "0.2")}
    for number, run in by_trial.items():
        assert (run.data.params["learning_rate"], run.data.params["dropout"]) == expected[number]
        assert run.data.tags[names.TAG_RUN_TYPE] == names.RUN_TYPE_TRAINING

    for number in (0, 1):  # the diverged trials: FAILED with their reason, the sweep went on
        assert by_trial[number].info.status == "FAILED"
        assert by_trial[number].data.tags[names.TAG_STOP_REASON] == names.STOP_NAN_LOSS
    mlflow.set_tracking_uri(uri)
    try:
        for number in (2, 3):  # the others are full training runs: the whole run contract
            config = TrainingConfig.from_values(fixed | {"learning_rate": "0.002", "dropout": expected[number][1]})
            assert_run_contract(client, by_trial[number].info.run_id, config, tmp_path / f"trial-{number}")
    finally:
        mlflow.set_tracking_uri(None)

    best = max((by_trial[2], by_trial[3]), key=lambda run: run.data.metrics[names.TEST_ACCURACY])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep"
    assert parent.data.tags[names.TAG_BEST_RUN_ID] == best.info.run_id
    assert parent.data.tags[names.TAG_BEST_TRIAL] == best.data.tags[names.TAG_SWEEP_TRIAL]
    assert parent.data.tags[names.TAG_FAILED_TRIALS] == "2"
    assert parent.data.metrics["best_" + names.TEST_ACCURACY] == best.data.metrics[names.TEST_ACCURACY]
    assert parent.data.params["learning_rate"] == grid["learning_rate"]  # the grid, as given

    table_path = client.download_artifacts(parent.info.run_id, names.SWEEP_TRIALS_FILE, str(tmp_path))
    with open(table_path, newline="") as stream:
        rows = {int(row["trial"]): row for row in csv.DictReader(stream)}
    for number, run in by_trial.items():
        assert rows[number]["run_id"] == run.info.run_id
        assert rows[number]["status"] == run.info.status
        assert (rows[number]["error"] != "") == (run.info.status == "FAILED")
    assert float(rows[3][names.TEST_ACCURACY]) == by_trial[3].data.metrics[names.TEST_ACCURACY]
    assert "training diverged" in rows[0]["error"]
    assert f"Best: trial {parent.data.tags[names.TAG_BEST_TRIAL]}" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--hidden-units", "128,64;;32"], "hidden_units='128,64;;32'"),
        (["--learning-rate", "0.01,-1"], "each a number > 0"),
        (["--epochs", "2,"], "epochs='2,'"),
        (["--mode", "best"], "mode='best'"),
    ],
)
def test_a_bad_grid_gives_one_line_and_exit_2(tmp_path, args, fragment):
    result = run_cli(["sweep", *args], cwd=tmp_path, timeout=60,
                     MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 2
    assert one_line_error(result, fragment).startswith("error: parameter ")
    assert not (tmp_path / "mlflow.db").exists()
