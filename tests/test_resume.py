"""Kill a training with SIGKILL and resume it in the same run: nothing lost, nothing twice, the curve and the
optimizer carried on; a run another process still trains is refused; a damaged newest state falls back to
the previous one."""

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
from pipeline.tracking.run_owner import Owner, this_machine
from pipeline.tracking.training_state import TrainingState
from pipeline.training.data import load_dataset
from pipeline.training.run import run_training
from tests.helpers import MNIST_SMALL, PROJECT_DIR, cli_options, one_line_error, project_env, run_cli_here

pytestmark = pytest.mark.slow

EPOCHS = 12
PARAMS = {
    "epochs": str(EPOCHS), "dataset": str(MNIST_SMALL), "target_accuracy": "0", "es_patience": "20",
    "lr_patience": "1", "hidden_units": "64", "batch_size": "16",  # ~0.3 s epochs: time to kill mid-run
}


STEPS_PER_EPOCH = 75  # 1,200 training digits (1,500 less the 20% validation split) in batches of 16


def _cli_args(**overrides: str) -> list[str]:
    return cli_options(PARAMS | overrides)


def _start_training(store: str, cwd: Path, *extra: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow_project", "train", *_cli_args(), *extra],
        cwd=cwd, env=project_env(MLFLOW_TRACKING_URI=store, **env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _replayed_plateau_cuts(val_loss: list[float], initial_lr: float) -> tuple[list[int], list[float]]:
    """Keras' ReduceLROnPlateau (val_loss, mode min, min_delta 1e-4, cooldown 0, PARAMS' patience 1, factor 0.5,
    min_lr 1e-6) replayed on the recorded val_loss of every epoch: the epochs at whose end it cuts the rate, and
    the rate of each epoch. Independent of what the run recorded about rates: a resume that loses the plateau
    counters or the optimizer's rate records other rates or cuts."""
    best, wait, rate, cuts, rates = None, 0, initial_lr, [], []
    for epoch, value in enumerate(val_loss):
        rates.append(rate)
        if best is None or np.float32(value - 1e-4) < np.float32(best):  # Keras compares in float32
            best, wait = value, 0
        else:
            wait += 1
            if wait >= 1 and np.float32(rate) > np.float32(1e-6):
                rate, wait = max(rate * 0.5, 1e-6), 0
                cuts.append(epoch)
    return cuts, rates


def _stored_state(client: MlflowClient, run_id: str, tmp: Path, name: str = names.STATE_FILE) -> TrainingState:
    return TrainingState.load(Path(client.download_artifacts(run_id, f"{names.STATE_DIR}/{name}", str(tmp))))


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
    val_loss = [metric.value for metric in client.get_metric_history(run_id, names.VAL_LOSS)]
    cuts, expected_rates = _replayed_plateau_cuts(val_loss, float(PARAMS.get("learning_rate", "0.001")))
    assert cuts, "the premise: PARAMS' lr_patience=1 cuts the rate during the run"
    assert [change["epoch"] for change in changes] == cuts
    assert [(c["old_lr"], c["new_lr"]) for c in changes] == pytest.approx(
        [(expected_rates[epoch], expected_rates[epoch] * 0.5) for epoch in cuts], rel=1e-6
    )
    rates = [metric.value for metric in client.get_metric_history(run_id, names.LEARNING_RATE)]
    assert rates == pytest.approx(expected_rates, rel=1e-6)
    assert run.data.tags[names.TAG_LR_REDUCTIONS] == str(len(changes))
    best = json.loads((local / names.CHECKPOINT_DIR / names.BEST_MODEL_INFO_FILE).read_text())
    val_accuracy = [metric.value for metric in client.get_metric_history(run_id, names.VAL_ACCURACY)]
    assert best["epoch"] == int(run.data.tags[names.TAG_BEST_EPOCH])
    assert best["val_accuracy"] == pytest.approx(max(val_accuracy))
    # the logged model is the best checkpoint: its predictions give the recorded test accuracy
    dataset = load_dataset(str(MNIST_SMALL))
    predicted = np.argmax(mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(dataset.x_test), axis=1)
    accuracy = np.mean(predicted == np.argmax(dataset.y_test, axis=1))
    assert accuracy == pytest.approx(run.data.metrics[names.TEST_ACCURACY], abs=1e-6)


@pytest.mark.timeout(600)  # three trainings in new processes, one in this one: ~170 s on a loaded 2-core EPYC
def test_sigkilled_training_resumes_twice_and_records_every_epoch_once(sqlite_store, tmp_path):
    store = sqlite_store
    client = MlflowClient(store)

    first = _start_training(store, tmp_path)
    run_id = _kill_after_epochs(first, client, at_least=3)
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL leaves it so
    # ... with the heartbeat of a live owner: the killed process on this machine, not ended. The resume below is
    # accepted at once because that process is gone, not because of the heartbeat's age.
    owner = Owner.of_run(client.get_run(run_id))
    assert (owner.machine, owner.pid, owner.ended) == (this_machine(), first.pid, False)

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
    second_resume = int(client.get_run(run_id).data.tags[names.TAG_RESUMED_FROM_EPOCH])
    assert second_resume >= 7

    _assert_exactly_once(client, run_id, tmp_path / "artifacts")
    _assert_continues_an_uninterrupted_run(client, run_id, [int(first_resume), second_resume], tmp_path)


def _assert_continues_an_uninterrupted_run(client: MlflowClient, run_id: str, resumed_at: list[int], tmp: Path):
    """A resumed run carries on the weights and the optimizer: its curve follows an uninterrupted run of the same
    seed, and its optimizer has counted every step of every epoch."""
    reference = run_training(TrainingConfig.from_values(PARAMS), experiment_name="uninterrupted")
    for key in (names.LOSS, names.VAL_LOSS):
        resumed = [m.value for m in client.get_metric_history(run_id, key)]
        uninterrupted = [m.value for m in client.get_metric_history(reference.run_id, key)]
        # the same seed gives the same epochs up to the first kill (README: `seed`) ...
        assert resumed[:resumed_at[0]] == pytest.approx(uninterrupted[:resumed_at[0]], rel=1e-5), key
        # ... and after each resume the curve goes on where it was (the batches' order and the dropout masks
        # differ: their random streams start again in a new process); fresh weights would start again near
        # the first epoch's loss, three times or more these values
        print("CURVE", key, resumed_at, resumed, uninterrupted)
        for epoch in resumed_at:
            assert resumed[epoch] == pytest.approx(uninterrupted[epoch], rel=0.25), (key, epoch, resumed, uninterrupted)
        assert resumed[-1] == pytest.approx(uninterrupted[-1], rel=0.25), (key, resumed, uninterrupted)
    # Adam's own state: the iteration count of every step of every epoch, and its moments, which a fresh
    # optimizer would have built from the last epochs' steps alone
    state = _stored_state(client, run_id, tmp / "state")
    reference_state = _stored_state(client, reference.run_id, tmp / "reference-state")
    assert state.epoch == EPOCHS - 1
    assert int(state.optimizer_variables[0]) == EPOCHS * STEPS_PER_EPOCH  # adam/iteration
    for moment, reference_moment in zip(state.optimizer_variables[2:], reference_state.optimizer_variables[2:],
                                        strict=True):
        print("MOMENT", np.linalg.norm(moment - reference_moment) / np.linalg.norm(reference_moment))


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
