"""The CLI as users run it: real stores, one-line errors. The commands run in pytest's process
(tests.helpers.run_cli_here: the same command, exit code and console lines, without another process's TensorFlow
start-up); `train` in processes of its own: test_outage, test_resume, test_mlflow_run, test_kubernetes (exit 2)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from mlflow_project.cli import cli
from pipeline import constants as names
from tests.helpers import MNIST_SMALL, new_sqlite_store, one_line_error, run_cli_here

pytestmark = pytest.mark.slow


def _store(tmp_path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def test_cli_trains_and_reports_the_run(tmp_path, monkeypatch):
    """The summary line names the run and its test accuracy, and gives the best epoch both as Keras' lines count
    (`Epoch N:` from 1) and as the record does (tag best_epoch and the metrics' steps, from 0)."""
    monkeypatch.chdir(tmp_path)
    result = run_cli_here(
        ["train", "--epochs", "3", "--target-accuracy", "0", "--dataset", str(MNIST_SMALL), "--experiment-name", "cli"],
        MLFLOW_TRACKING_URI=new_sqlite_store(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("Epoch")] == ["Epoch 1", "Epoch 2", "Epoch 3"]
    summary = lines[-1]
    assert summary.startswith("Run ") and "test_accuracy=" in summary
    run_id = summary.split()[1].rstrip(":")
    client = MlflowClient(_store(tmp_path)["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "cli"
    assert f"test_accuracy={run.data.metrics[names.TEST_ACCURACY]:.4f}" in summary
    best = int(run.data.tags[names.TAG_BEST_EPOCH])
    history = client.get_metric_history(run_id, names.VAL_ACCURACY)
    assert best == max(history, key=lambda metric: (metric.value, -metric.step)).step
    best_line = next(line for line in lines if line.startswith(f"Epoch {best + 1}:"))
    assert f"val_accuracy={run.data.metrics[names.BEST_VAL_ACCURACY]:.4f}" in best_line
    assert f"best epoch {best + 1} (step {best})" in summary


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--epochs", "0"], ("epochs='0'", "an integer >= 1")),
        (["--batch-size", "many"], ("batch_size='many'",)),
        (["--hidden-units", "128,,64"], ("hidden_units", "comma-separated positive integers")),
        (["--learning-rate", "-1"], ("learning_rate='-1'", "> 0")),
        (["--dropout", "1.0"], ("dropout='1.0'", "0 <= d < 1")),
        (["--target-accuracy", "2"], ("target_accuracy='2'",)),
    ],
)
def test_bad_parameters_give_one_line_and_exit_2_without_a_run(tmp_path, args, fragments):
    result = run_cli_here(["train", *args, "--dataset", str(MNIST_SMALL)], **_store(tmp_path))
    assert result.returncode == 2
    one_line_error(result, *fragments)
    assert not (tmp_path / "mlflow.db").exists()  # no run, not even a store, was created


def test_bad_data_file_gives_one_line_and_exit_2(tmp_path):
    broken = tmp_path / "digits.npz"
    broken.write_bytes(b"\x00" * 100)
    result = CliRunner().invoke(cli, ["train", "--dataset", str(broken)], env=_store(tmp_path) | {"MLFLOW_RUN_ID": ""})
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # nothing else escaped
    one_line_error(result, str(broken), "not an .npz")
    assert not (tmp_path / "mlflow.db").exists()


def test_nan_loss_exits_1_with_one_line_and_a_failed_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli_here(
        ["train", "--learning-rate", "1e30", "--dataset", str(MNIST_SMALL), "--experiment-name", "nan"],
        MLFLOW_TRACKING_URI=new_sqlite_store(tmp_path),
    )
    assert result.returncode == 1
    one_line_error(result, "training diverged", "learning_rate")
    client = MlflowClient(_store(tmp_path)["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags[names.TAG_STOP_REASON] == names.STOP_NAN_LOSS
