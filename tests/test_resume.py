"""Kill a training with SIGKILL and resume it in the same run: nothing lost, nothing twice, the curve and the
optimizer carried on; a run another process still trains is refused; a damaged newest state falls back to
the previous one."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import TrainingConfig
from pipeline.errors import TrainingDiverged
from pipeline.tracking.resume import RunNotResumable, find_resume_point
from pipeline.tracking.run_owner import Owner, this_machine
from pipeline.tracking.training_state import TrainingState
from pipeline.training.data import load_dataset
from pipeline.training.run import run_training
from tests.helpers import (
    MNIST_SMALL,
    PROJECT_DIR,
    cli_options,
    one_line_error,
    project_env,
    resume_here,
    run_cli_here,
)

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


def _stored_states(client: MlflowClient, run_id: str, tmp: Path) -> dict[str, TrainingState]:
    """The training states the run holds, by artifact path, newest (highest epoch) first."""
    paths = {f"{names.STATE_DIR}/{name}" for name in names.STATE_FILES}
    states = {path: TrainingState.load(Path(client.download_artifacts(run_id, path, str(tmp)))) for path in paths}
    return dict(sorted(states.items(), key=lambda item: -item[1].epoch))


def _stored_state(client: MlflowClient, run_id: str, tmp: Path) -> TrainingState:
    """The newest training state the run holds."""
    return next(iter(_stored_states(client, run_id, tmp).values()))


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


def _assert_exactly_once(client: MlflowClient, run_id: str, tmp: Path, epochs: int = EPOCHS) -> list[int]:
    """The run's whole record, every epoch once; returns the epochs at whose end the rate was cut."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    completed = int(run.data.metrics[names.EPOCHS_COMPLETED])
    assert completed == epochs
    for key in names.EPOCH_METRICS:
        steps = [metric.step for metric in client.get_metric_history(run_id, key)]
        assert steps == list(range(epochs)), (key, steps)
    best_steps = [metric.step for metric in client.get_metric_history(run_id, names.BEST_VAL_ACCURACY)]
    assert len(best_steps) == len(set(best_steps))
    local = Path(client.download_artifacts(run_id, "", str(tmp)))
    rows = list(csv.DictReader(io.StringIO((local / names.TRAINING_LOG_FILE).read_text())))
    assert [int(row["epoch"]) for row in rows] == list(range(epochs))
    changes = json.loads((local / names.LR_CHANGES_FILE).read_text())
    val_loss = [metric.value for metric in client.get_metric_history(run_id, names.VAL_LOSS)]
    cuts, expected_rates = _replayed_plateau_cuts(val_loss, float(PARAMS.get("learning_rate", "0.001")))
    assert [change["epoch"] for change in changes] == cuts
    assert [c["old_lr"] for c in changes] == pytest.approx([expected_rates[epoch] for epoch in cuts], rel=1e-6)
    assert [c["new_lr"] for c in changes] == pytest.approx([expected_rates[epoch] * 0.5 for epoch in cuts], rel=1e-6)
    rates = [metric.value for metric in client.get_metric_history(run_id, names.LEARNING_RATE)]
    assert rates == pytest.approx(expected_rates, rel=1e-6)
    assert run.data.tags[names.TAG_LR_REDUCTIONS] == str(len(changes))
    pointed = local / run.data.tags[names.TAG_LATEST_CHECKPOINT]  # the best checkpoint's .keras file
    best = json.loads((pointed.parent / names.BEST_MODEL_INFO_FILE).read_text())
    assert pointed.exists()
    val_accuracy = [metric.value for metric in client.get_metric_history(run_id, names.VAL_ACCURACY)]
    assert best["epoch"] == int(run.data.tags[names.TAG_BEST_EPOCH])
    assert best["val_accuracy"] == pytest.approx(max(val_accuracy))
    # the logged model is the best checkpoint: its predictions give the recorded test accuracy
    dataset = load_dataset(str(MNIST_SMALL))
    predicted = np.argmax(mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(dataset.x_test), axis=1)
    accuracy = np.mean(predicted == np.argmax(dataset.y_test, axis=1))
    assert accuracy == pytest.approx(run.data.metrics[names.TEST_ACCURACY], abs=1e-6)
    return cuts


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

    cuts = _assert_exactly_once(client, run_id, tmp_path / "artifacts")
    assert cuts, "the premise: PARAMS' lr_patience=1 cuts the rate during the run, so the rate check checked one"
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
        # ... and after each resume the curve goes on where it was: within 50% of the uninterrupted run's (the
        # batches' order and the dropout masks differ, their random streams starting again in a new process: 19%
        # apart at most, measured); fresh weights would start again near the first epoch's loss, 2-6 times these
        for epoch in [*resumed_at, EPOCHS - 1]:
            assert resumed[epoch] == pytest.approx(uninterrupted[epoch], rel=0.5), (key, epoch, resumed, uninterrupted)
    # Adam's own state: the iteration count of every step of every epoch, and its second moments (velocities),
    # which a fresh optimizer would have built from the last epochs' steps alone: about half their size (Keras
    # keeps them without bias correction). Measured against the uninterrupted run's: 6-13% apart.
    state = _stored_state(client, run_id, tmp / "state")
    reference_state = _stored_state(client, reference.run_id, tmp / "reference-state")
    assert state.epoch == EPOCHS - 1
    assert int(state.optimizer_variables[0]) == EPOCHS * STEPS_PER_EPOCH  # adam/iteration
    velocities, reference_velocities = state.optimizer_variables[3::2], reference_state.optimizer_variables[3::2]
    assert len(velocities) == 4  # kernel and bias of two Dense layers
    for velocity, reference_velocity in zip(velocities, reference_velocities, strict=True):
        assert np.linalg.norm(velocity - reference_velocity) < 0.3 * np.linalg.norm(reference_velocity)


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


def test_a_pruned_trial_is_continued_only_by_its_sweep_and_only_from_a_saved_state(sqlite_store):
    """`train --run-id` of a pruned sweep trial is refused; its sweep may continue it (`continue_pruned`), from its
    saved state, never from its first epoch again: a pruned run that holds no state is refused then too."""
    client = MlflowClient()
    config = TrainingConfig.from_values(PARAMS | {"epochs": "2"})
    run_id = client.create_run("0", tags={names.TAG_RUN_TYPE: names.RUN_TYPE_TRAINING,
                                          names.TAG_STOP_REASON: names.STOP_PRUNED}).info.run_id
    client.set_terminated(run_id, "KILLED")
    with pytest.raises(RunNotResumable, match="is a sweep trial its pruner stopped"):
        find_resume_point(client, run_id, config)
    with pytest.raises(RunNotResumable, match="holds no saved training state to continue from"):
        find_resume_point(client, run_id, config, continue_pruned=True)


def test_unknown_run_id_is_one_line(sqlite_store):
    result = run_cli_here(["train", "--run-id", "0123456789abcdef", *_cli_args(epochs="1")])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: parameter run_id='0123456789abcdef' is invalid: allowed is the id of an existing run in the "
        "tracking store"
    ]


def _wait_for_epochs(process: subprocess.Popen, client: MlflowClient, at_least: int) -> str:
    """The id of the (only) running run, once the store holds `at_least` epochs of it."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"training ended too early: {process.communicate()}"
        running = [run for run in client.search_runs(["0"]) if run.info.status == "RUNNING"]
        if running and len(client.get_metric_history(running[0].info.run_id, names.LOSS)) >= at_least:
            return running[0].info.run_id
        time.sleep(0.05)
    raise AssertionError(f"training never reached {at_least} epochs")


@pytest.mark.timeout(300)
def test_a_run_another_process_trains_is_refused_in_seconds_and_left_to_it(sqlite_store, tmp_path):
    """docs/failures.md: a run that another process is training is refused in one line (exit 2), at once; the
    training goes on untouched. Its heartbeat is refreshed while it trains (every 0.2 s with a 1.2 s timeout)."""
    client = MlflowClient(sqlite_store)
    owner = _start_training(sqlite_store, tmp_path, MNIST_PIPELINE_HEARTBEAT_TIMEOUT="1.2")
    run_id = _wait_for_epochs(owner, client, at_least=1)

    started = time.monotonic()
    refused = run_cli_here(["train", "--run-id", run_id, *_cli_args()])
    seconds = time.monotonic() - started
    assert refused.returncode == 2
    assert one_line_error(refused) == (
        f"error: run {run_id} is being trained by another process: process {owner.pid} on this machine still runs"
    )
    assert seconds < 10
    assert owner.poll() is None, "the premise: the first training still ran when the second was refused"
    beat = Owner.of_run(client.get_run(run_id)).beat
    deadline = time.monotonic() + 30
    while Owner.of_run(client.get_run(run_id)).beat == beat:
        assert time.monotonic() < deadline, "the heartbeat was not refreshed"
        time.sleep(0.05)

    _, errors = owner.communicate(timeout=240)
    assert owner.returncode == 0, errors[-3000:]
    _assert_exactly_once(client, run_id, tmp_path / "artifacts")
    run = client.get_run(run_id)
    assert names.TAG_RESUMED_FROM_EPOCH not in run.data.tags
    final = Owner.of_run(run)
    assert (final.pid, final.ended) == (owner.pid, True)


def test_a_heartbeat_from_another_machine_refuses_until_it_is_older_than_the_timeout(diverged_run):
    """docs/failures.md: across machines the heartbeat's age decides: younger than the timeout
    (MNIST_PIPELINE_HEARTBEAT_TIMEOUT, 60 s by default) the run is refused, older it can be continued. A
    SIGKILLed run stays RUNNING: the status is no evidence, the heartbeat is."""
    client = MlflowClient()
    elsewhere = Owner("build-box/5f0c-boot/4026531836", 4242, 1.0e9, time.time() - 5)
    client.update_run(diverged_run, status="RUNNING")
    client.set_tag(diverged_run, names.TAG_TRAINING_OWNER, elsewhere.tag())
    before = _snapshot(client, diverged_run)
    args = ["train", "--run-id", diverged_run, *_cli_args(learning_rate="1e30")]

    refused = run_cli_here(args)
    assert refused.returncode == 2
    assert re.fullmatch(
        f"error: run {diverged_run} is being trained by another process: process 4242 on host build-box sent its "
        r"last heartbeat [56] s ago; a run whose process is gone can be continued 60 s after its last heartbeat",
        one_line_error(refused),
    )
    assert _snapshot(client, diverged_run) == before

    accepted = resume_here(client, diverged_run, args[3:], MNIST_PIPELINE_HEARTBEAT_TIMEOUT="4")
    assert accepted.returncode == 1  # it trained, and diverged again: accepted
    assert accepted.stderr.strip().splitlines()[-1].startswith("error: training diverged")
    owner = Owner.of_run(client.get_run(diverged_run))
    assert (owner.machine, owner.pid, owner.ended) == (this_machine(), os.getpid(), True)

    # a training that ended (failed) on another machine a moment ago: continued at once
    ended = dataclasses.replace(elsewhere, beat=time.time(), ended=True)
    client.set_tag(diverged_run, names.TAG_TRAINING_OWNER, ended.tag())
    assert resume_here(client, diverged_run, args[3:]).returncode == 1
    assert Owner.of_run(client.get_run(diverged_run)).pid == os.getpid()


@pytest.mark.timeout(300)
def test_metrics_the_store_never_got_before_the_kill_are_resent_once(sqlite_store, tmp_path):
    """docs/failures.md: a resume re-sends any metric of a saved epoch the run lacks. The store stalls on the
    metrics of epoch 2 (tests/withheld_metrics.py), so at the kill it holds the state of epoch 2 and the metrics
    of epochs 0 and 1 only."""
    client = MlflowClient(sqlite_store)
    marker = tmp_path / "withheld"
    epochs = 5
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.withheld_metrics", "2", str(marker), "train", *_cli_args(epochs=str(epochs))],
        cwd=tmp_path, env=project_env(MLFLOW_TRACKING_URI=sqlite_store),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the metrics of epoch 2 never reached the store"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    run_id = marker.read_text()
    state = _stored_state(client, run_id, tmp_path / "state")
    assert state.epoch == 2
    withheld = state.record["history"][2]
    assert [m.step for m in client.get_metric_history(run_id, names.LOSS)] == [0, 1]

    resumed = resume_here(client, run_id, _cli_args(epochs=str(epochs)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming run {run_id} at epoch 4 ({len(withheld)} metric values re-sent)" in resumed.stdout
    assert client.get_run(run_id).data.tags[names.TAG_RESUMED_FROM_EPOCH] == "3"
    _assert_exactly_once(client, run_id, tmp_path / "artifacts", epochs=epochs)
    for key, value in withheld.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key) if m.step == 2] == [(2, value)], key


@pytest.mark.timeout(300)
def test_a_damaged_newest_state_resumes_from_the_previous_one_with_a_warning(sqlite_store, tmp_path):
    """docs/failures.md: the run keeps the previous epoch's state too (Keras' BackupAndRestore with
    double_checkpoint); when the newest cannot be read (here cut to half its size in the store, as a kill in the
    middle of its upload leaves it) the resume continues from the previous one, with one warning line."""
    client = MlflowClient(sqlite_store)
    epochs = 8
    run_id = _kill_after_epochs(_start_training(sqlite_store, tmp_path, *cli_options({"epochs": str(epochs)})),
                                client, at_least=3)
    (newest_path, newest), (previous_path, previous) = _stored_states(client, run_id, tmp_path / "states").items()
    assert previous.epoch < newest.epoch
    recorded = [m.step for m in client.get_metric_history(run_id, names.LOSS)]
    artifacts = Path(urllib.parse.urlparse(client.get_run(run_id).info.artifact_uri).path)
    damaged = artifacts / newest_path
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])

    resumed = resume_here(client, run_id, _cli_args(epochs=str(epochs)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [line for line in resumed.stdout.splitlines() if "cannot be read" in line]
    assert len(warnings) == 1 and re.fullmatch(
        f"Run {run_id}: {newest_path} \\(BadZipFile: .+\\) cannot be read; continuing from "
        f"{previous_path}, the state of epoch {previous.epoch + 1}",
        warnings[0],
    ), resumed.stdout
    assert client.get_run(run_id).data.tags[names.TAG_RESUMED_FROM_EPOCH] == str(previous.epoch + 1)
    # every epoch recorded; an epoch whose metrics the run held beyond the previous state is trained again,
    # and its metrics recorded a second time
    again = [epoch for epoch in recorded if epoch > previous.epoch]
    for key in names.EPOCH_METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == sorted([*range(epochs), *again]), (key, steps, previous.epoch, recorded)
    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    rows = list(csv.DictReader(io.StringIO((local / names.TRAINING_LOG_FILE).read_text())))
    assert [int(row["epoch"]) for row in rows] == list(range(epochs))
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.timeout(420)
def test_two_resumes_released_at_the_same_instant_train_the_run_once(sqlite_store, tmp_path):
    """docs/failures.md: two processes that resume one killed run at the same instant both find it free; held at
    a barrier just before they claim it (MNIST_PIPELINE_CLAIM_BARRIER) and released together, exactly one trains
    it and the other is refused in one line (exit 2), naming the winner; every epoch is recorded once."""
    client = MlflowClient(sqlite_store)
    run_id = _kill_after_epochs(_start_training(sqlite_store, tmp_path), client, at_least=2)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    resumes = [_start_training(sqlite_store, tmp_path, "--run-id", run_id, MNIST_PIPELINE_CLAIM_BARRIER=str(barrier))
               for _ in range(2)]
    try:
        deadline = time.monotonic() + 240
        while len(list(barrier.glob("waiting-*"))) < 2:
            assert time.monotonic() < deadline and all(r.poll() is None for r in resumes), \
                [r.communicate() for r in resumes if r.poll() is not None]
            time.sleep(0.05)
        (barrier / "go").touch()
        outputs = [resume.communicate(timeout=300) for resume in resumes]
    finally:
        for resume in resumes:
            resume.kill()
    codes = [resume.returncode for resume in resumes]
    assert sorted(codes) == [0, 2], outputs
    winner, loser = (resumes[0], resumes[1]) if codes[0] == 0 else (resumes[1], resumes[0])
    refused = subprocess.CompletedProcess(loser.args, 2, *outputs[resumes.index(loser)])
    assert one_line_error(refused) == (
        f"error: run {run_id} is being trained by another process: process {winner.pid} on this machine still runs"
    )
    _assert_exactly_once(client, run_id, tmp_path / "artifacts")
    owner = Owner.of_run(client.get_run(run_id))
    assert (owner.pid, owner.ended) == (winner.pid, True)
