"""Kill a training with SIGKILL and resume it in the same run: nothing lost, nothing twice."""

from __future__ import annotations

import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import TrainingConfig
from pipeline.errors import TrainingDiverged
from pipeline.training.data import load_dataset
from pipeline.training.run import run_training
from tests.helpers import MNIST_SMALL, PROJECT_DIR, cli_options, one_line_error, project_env, run_cli_here

pytestmark = pytest.mark.slow

EPOCHS = 12
PARAMS = {
    "epochs": str(EPOCHS), "dataset": str(MNIST_SMALL), "target_accuracy": "0", "es_patience": "20",
    "lr_patience": "1", "hidden_units": "64", "batch_size": "16",  # ~0.3 s epochs: time to kill mid-run
}


def _cli_args(**overrides: str) -> list[str]:
    return cli_options(PARAMS | overrides)


def _start_training(store: str, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow_project", "train", *_cli_args(), *extra],
        cwd=cwd, env=project_env(MLFLOW_TRACKING_URI=store),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _kill_after_epochs(process: subprocess.Popen, client: MlflowClient, at_least: int, run_id: str | None = None):
    """SIGKILLs the process once the store holds `at_least` epochs of the (only) running run."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"training ended before it could be killed: {process.communicate()}"
        runs = client.search_runs(["0", *[e.experiment_id for e in client.search_experiments()]])
        running = [r for r in runs if r.info.status == "RUNNING" and (run_id is None or r.info.run_id == run_id)]
        if running and len(client.get_metric_history(running[0].info.run_id, names.LOSS)) >= at_least:
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=30)
            return running[0].info.run_id
        time.sleep(0.05)
    raise AssertionError("training never reached the kill point")


def _assert_exactly_once(client: MlflowClient, run_id: str, tmp: Path) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    completed = int(run.data.metrics[names.EPOCHS_COMPLETED])
    assert completed == EPOCHS
    for key in names.EPOCH_METRICS:
        steps = [metric.step for metric in client.get_metric_history(run_id, key)]
        assert steps == list(range(EPOCHS)), (key, steps)
    best_steps = [metric.step for metric in client.get_metric_history(run_id, names.BEST_VAL_ACCURACY)]
    assert len(best_steps) == len(set(best_steps))
    local = Path(client.download_artifacts(run_id, "", str(tmp)))
    rows = list(csv.DictReader(io.StringIO((local / names.TRAINING_LOG_FILE).read_text())))
    assert [int(row["epoch"]) for row in rows] == list(range(EPOCHS))
    changes = json.loads((local / names.LR_CHANGES_FILE).read_text())
    epochs = [change["epoch"] for change in changes]
    assert epochs == sorted(set(epochs))
    rates = [metric.value for metric in client.get_metric_history(run_id, names.LEARNING_RATE)]
    assert [c["epoch"] for c in changes] == [e for e in range(EPOCHS - 1) if rates[e + 1] != rates[e]] + (
        [EPOCHS - 1] if changes and changes[-1]["epoch"] == EPOCHS - 1 else []
    )
    assert run.data.tags[names.TAG_LR_REDUCTIONS] == str(len(changes))
    best = json.loads((local / names.CHECKPOINT_DIR / names.BEST_MODEL_INFO_FILE).read_text())
    val_accuracy = [metric.value for metric in client.get_metric_history(run_id, names.VAL_ACCURACY)]
    assert best["epoch"] == int(run.data.tags[names.TAG_BEST_EPOCH])
    assert best["val_accuracy"] == pytest.approx(max(val_accuracy))
    assert names.TEST_ACCURACY in run.data.metrics
    assert mlflow.pyfunc.load_model(f"runs:/{run_id}/model") is not None


def test_sigkilled_training_resumes_twice_and_records_every_epoch_once(sqlite_store, tmp_path):
    store = sqlite_store
    client = MlflowClient(store)

    run_id = _kill_after_epochs(_start_training(store, tmp_path), client, at_least=3)
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL leaves it so

    # Resume with the CLI, and kill again later.
    second = _start_training(store, tmp_path, "--run-id", run_id)
    _kill_after_epochs(second, client, at_least=7, run_id=run_id)
    first_resume = client.get_run(run_id).data.tags[names.TAG_RESUMED_FROM_EPOCH]
    assert 3 <= int(first_resume) <= 7

    # Resume with MLflow Projects, as users do: mlflow run . --run-id ID -P ...same params...
    args = ["mlflow", "run", str(PROJECT_DIR), "--env-manager", "local", "--run-id", run_id]
    for name, value in PARAMS.items():
        args += ["-P", f"{name}={value}"]
    resumed = subprocess.run(
        args, cwd=tmp_path, env=project_env(MLFLOW_TRACKING_URI=store), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming run" in resumed.stdout
    assert int(client.get_run(run_id).data.tags[names.TAG_RESUMED_FROM_EPOCH]) >= 7

    _assert_exactly_once(client, run_id, tmp_path / "artifacts")


@pytest.fixture
def diverged_run(sqlite_store) -> str:
    """A real run that failed after it started training (NaN loss): resumable, not finished."""
    with pytest.raises(TrainingDiverged):
        run_training(TrainingConfig.from_values(PARAMS | {"learning_rate": "1e30"}), experiment_name="resume")
    [run] = MlflowClient().search_runs([mlflow.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FAILED"
    return run.info.run_id


def _snapshot(client: MlflowClient, run_id: str) -> tuple:
    """What a refused resume must leave as it was: status, params, tags, and every metric's history."""
    run = client.get_run(run_id)
    histories = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in run.data.metrics}
    return run.info.status, run.data.params, run.data.tags, histories


def test_resume_with_other_parameters_is_refused_naming_them(diverged_run):
    client = MlflowClient()
    before = _snapshot(client, diverged_run)
    result = run_cli_here(["train", "--run-id", diverged_run, *_cli_args(learning_rate="0.001", epochs="5")])
    assert result.returncode == 2
    message = one_line_error(result)
    assert message.startswith(f"error: run {diverged_run} was trained with other parameters; ")
    assert "epochs 12 -> 5" in message and "learning_rate 1e+30 -> 0.001" in message
    assert "dropout" not in message
    assert _snapshot(client, diverged_run) == before  # untouched (FAILED, as it was)
    assert before[0] == "FAILED"


def test_resume_with_other_data_is_refused_and_leaves_the_run_as_it_was(sqlite_store, tmp_path):
    data = tmp_path / "digits.npz"
    shutil.copyfile(MNIST_SMALL, data)
    params = PARAMS | {"dataset": str(data), "learning_rate": "1e30"}
    with pytest.raises(TrainingDiverged):
        run_training(TrainingConfig.from_values(params), experiment_name="other-data")
    client = MlflowClient()
    [run] = client.search_runs([mlflow.get_experiment_by_name("other-data").experiment_id])
    run_id, trained_on = run.info.run_id, run.data.tags[names.TAG_DATASET_DIGEST]
    # The same path and parameters, other contents: the training images in reverse order.
    with np.load(MNIST_SMALL) as arrays:
        contents = {key: arrays[key] for key in arrays.files}
    contents["x_train"], contents["y_train"] = contents["x_train"][::-1], contents["y_train"][::-1]
    np.savez(data, **contents)
    now = load_dataset(str(data))
    assert now.digest != trained_on
    before = _snapshot(client, run_id)
    result = run_cli_here(["train", "--run-id", run_id, *_cli_args(dataset=str(data), learning_rate="1e30")])
    assert result.returncode == 2
    assert one_line_error(result) == (
        f"error: run {run_id} was trained on other data (digest {trained_on}, now {now.digest} from {now.source})"
    )
    assert _snapshot(client, run_id) == before
    assert before[0] == "FAILED" and before[3]  # a failed run with metrics, left as it was


def test_finished_run_is_refused_not_retrained(sqlite_store):
    config = TrainingConfig.from_values(PARAMS | {"epochs": "1"})
    finished = run_training(config, experiment_name="resume")
    losses = MlflowClient().get_metric_history(finished.run_id, names.LOSS)
    result = run_cli_here(["train", "--run-id", finished.run_id, *_cli_args(epochs="1")])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: run {finished.run_id} is FINISHED; a finished run is not trained again (start a new run instead)"
    ]
    assert MlflowClient().get_run(finished.run_id).info.status == "FINISHED"
    assert MlflowClient().get_metric_history(finished.run_id, names.LOSS) == losses


def test_unknown_run_id_is_one_line(sqlite_store):
    result = run_cli_here(["train", "--run-id", "0123456789abcdef", *_cli_args(epochs="1")])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: parameter run_id='0123456789abcdef' is invalid: allowed is the id of an existing run in the "
        "tracking store"
    ]
