"""Each callback's behaviour, driven through its hooks or a real fit, and why their order matters,
on a real store."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.callbacks import (
    BatchTiming,
    BestCheckpoint,
    DivergenceGuard,
    EpochMetricsLogger,
    LearningRateChanges,
    StopRequestCheck,
    TargetAccuracyStop,
    TrialPruning,
    WorkerTiming,
)
from pipeline.callbacks.best_checkpoint import download_best_checkpoint
from pipeline.config import TrainingConfig
from pipeline.stop_request import clear_stop_request, request_stop, stop_requested
from pipeline.tracking.recorder import RunRecorder
from pipeline.tracking.training_state import TrainingState
from pipeline.training.callback_list import TrainingCallbacks, build_callbacks
from pipeline.training.data import load_dataset, split_validation
from pipeline.training.model import build_model
from tests.helpers import MNIST_SMALL, project_env

EXPECTED_ORDER = [
    "TargetAccuracyStop",
    "DivergenceGuard",
    "BatchTiming",
    "BestCheckpoint",
    "EarlyStopping",
    "ReduceLROnPlateau",
    "LearningRateChanges",
    "CSVLogger",
    "TrainingStateBackup",
    "EpochMetricsLogger",
    "StopRequestCheck",
]


@pytest.fixture(scope="module")
def data():
    dataset = load_dataset(str(MNIST_SMALL))
    return split_validation(dataset.x_train, dataset.y_train, 0.2)


def _model(learning_rate: float = 0.001, steps_per_execution: int = 1) -> keras.Model:
    keras.utils.set_random_seed(7)
    return build_model((64,), 0.2, learning_rate, steps_per_execution)


def test_several_batches_per_call_train_exactly_as_one(data):
    """steps_per_execution only changes how often Python is called: the same weights and metrics, also
    when one call would span more batches than an epoch has (64, against 38 per epoch here)."""
    x, y, x_val, y_val = data
    results = []
    for steps in (1, 8, 64):
        model = _model(steps_per_execution=steps)
        history = model.fit(x, y, batch_size=32, validation_data=(x_val, y_val), epochs=3, verbose=0)
        results.append((history.history, [w.tolist() for w in model.get_weights()]))
    assert results[0] == results[1] == results[2]


def test_target_accuracy_stop_stops_at_the_first_epoch_reaching_the_target(data):
    x, y, x_val, y_val = data
    stop = TargetAccuracyStop(target_accuracy=0.75)
    history = _model().fit(x, y, validation_data=(x_val, y_val), epochs=15, callbacks=[stop], verbose=0)
    reached = [i for i, acc in enumerate(history.history["val_accuracy"]) if acc >= 0.75]
    assert reached, "the fixture should reach 75% within 15 epochs"
    assert stop.stopped_epoch == reached[0] == len(history.history["val_accuracy"]) - 1


def test_target_accuracy_zero_disables_the_stop(data):
    x, y, x_val, y_val = data
    stop = TargetAccuracyStop(target_accuracy=0.0)
    history = _model().fit(x, y, validation_data=(x_val, y_val), epochs=3, callbacks=[stop], verbose=0)
    assert len(history.history["loss"]) == 3 and stop.stopped_epoch is None


class _Clock:
    """A clock that moves only when the test says so: BatchTiming's `time` module, for one test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def perf_counter(self) -> float:
        return self.now

    monotonic = time = perf_counter


def test_batch_timing_adds_timing_metrics_to_the_epoch_logs(monkeypatch):
    from pipeline.callbacks import batch_timing

    clock = _Clock()
    monkeypatch.setattr(batch_timing, "time", clock)
    # 20 batches of 32 but 624 examples (the last batch holds 16), one batch per call.
    timing = BatchTiming(batch_size=32, num_samples=624)
    timing.set_params({"steps": 20, "epochs": 2})
    timing.on_train_begin()
    epochs = [  # per epoch: the batch durations (s), the pause before each batch, the validation time
        ([0.010] * 18 + [0.200] * 2, 0.001, 0.300),
        ([0.050] * 20, 0.002, 0.100),
    ]
    logs = []
    for epoch, (durations, pause, validation) in enumerate(epochs):
        timing.on_epoch_begin(epoch)
        for batch, seconds in enumerate(durations):
            clock.advance(pause)  # time between batches: not batch time
            timing.on_train_batch_begin(batch)
            clock.advance(seconds)
            timing.on_train_batch_end(batch, {"loss": 0.5})
        clock.advance(validation)
        logs.append({"loss": 0.5, "val_accuracy": 0.9})
        timing.on_epoch_end(epoch, logs[-1])
    # Worked out by hand. Epoch 0: 18 x 10 ms + 2 x 200 ms = 0.58 s in batches, mean 29 ms; the two
    # slowest of 20 batches are the top 10%, so the 95th percentile is 200 ms; 624 examples / 0.58 s;
    # the epoch took 0.58 s + 20 pauses of 1 ms + 0.3 s of validation.
    assert logs[0][names.BATCH_MS_MEAN] == pytest.approx(29.0)
    assert logs[0][names.BATCH_MS_P95] == pytest.approx(200.0)
    assert logs[0][names.SAMPLES_PER_SECOND] == pytest.approx(1075.862, rel=1e-5)
    assert logs[0][names.EPOCH_SECONDS] == pytest.approx(0.9)
    # Epoch 1 is timed afresh: 20 x 50 ms = 1 s in batches; 1 s + 20 x 2 ms + 0.1 s.
    assert logs[1][names.BATCH_MS_MEAN] == pytest.approx(50.0)
    assert logs[1][names.BATCH_MS_P95] == pytest.approx(50.0)
    assert logs[1][names.SAMPLES_PER_SECOND] == pytest.approx(624.0)
    assert logs[1][names.EPOCH_SECONDS] == pytest.approx(1.14)
    assert all(log["val_accuracy"] == 0.9 for log in logs)


def test_batch_timing_metrics_reach_the_keras_logs_in_a_real_fit(data):
    x, y, x_val, y_val = data
    timing = BatchTiming(batch_size=100, num_samples=len(x))
    history = _model().fit(
        x, y, batch_size=100, validation_data=(x_val, y_val), epochs=2, callbacks=[timing], verbose=0
    )
    for key in (names.EPOCH_SECONDS, names.BATCH_MS_MEAN, names.BATCH_MS_P95, names.SAMPLES_PER_SECOND):
        assert len(history.history[key]) == 2 and all(value > 0 for value in history.history[key])
    for epoch in range(2):  # an epoch lasts at least as long as its 12 batches
        assert history.history[names.EPOCH_SECONDS][epoch] * 1000 > history.history[names.BATCH_MS_MEAN][epoch] * 12


def test_batch_timing_shares_a_call_among_its_batches(data):
    x, y, x_val, y_val = data
    timing = BatchTiming(batch_size=100, num_samples=len(x))
    history = _model(steps_per_execution=5).fit(
        x, y, batch_size=100, validation_data=(x_val, y_val), epochs=1, callbacks=[timing], verbose=0
    )
    assert len(timing._batch_seconds) == 12  # calls of 5, 5 and 2 batches
    train_seconds = history.history[names.BATCH_MS_MEAN][0] * 12 / 1000
    assert history.history[names.SAMPLES_PER_SECOND][0] == pytest.approx(len(x) / train_seconds, rel=1e-6)


def test_trial_pruning_hooks_report_each_epoch_and_stop_when_the_pruner_says_so():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = study.ask()
    model = _model()
    pruning = TrialPruning(trial)
    pruning.set_model(model)
    pruning.on_train_begin()
    pruning.on_epoch_end(0, {"val_accuracy": 0.9})
    pruning.on_epoch_end(1, {"val_accuracy": math.nan})  # nothing to report: skipped
    assert pruning.pruned_epoch is None and not model.stop_training
    pruning.on_epoch_end(2, {"val_accuracy": 0.3})  # below the threshold
    assert pruning.pruned_epoch == 2 and model.stop_training
    assert study.trials[0].intermediate_values == {0: 0.9, 2: 0.3}
    pruning.on_train_begin()  # a new fit starts afresh
    assert pruning.pruned_epoch is None


def test_trial_pruning_never_prunes_at_the_last_epoch():
    """A trial the pruner would stop after its last epoch has trained fully: it finishes (and can be the best)."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    model = _model()
    pruning = TrialPruning(study.ask())
    pruning.set_model(model)
    pruning.set_params({"epochs": 3})  # as fit(epochs=3) gives its callbacks
    pruning.on_train_begin()
    pruning.on_epoch_end(2, {"val_accuracy": 0.3})  # below the threshold, at the last epoch
    assert pruning.pruned_epoch is None and not model.stop_training
    pruning.on_train_begin()
    pruning.on_epoch_end(1, {"val_accuracy": 0.3})  # one epoch before the last: pruned
    assert pruning.pruned_epoch == 1 and model.stop_training


def test_trial_pruning_warns_once_per_fit_when_its_metric_is_missing(caplog):
    """As optuna-integration's Keras callback warns, but once a fit: a pruner that never hears of the
    trial can never prune it."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    pruning = TrialPruning(study.ask(), monitor="val_f1")
    pruning.set_model(_model())
    for _ in range(2):  # two fits with the same instance
        caplog.clear()
        pruning.on_train_begin()
        assert pruning.missing_epochs == 0
        for epoch in range(3):
            pruning.on_epoch_end(epoch, {"val_accuracy": 0.1})
        assert pruning.missing_epochs == 3 and pruning.pruned_epoch is None
        warnings = [record for record in caplog.records if record.levelname == "WARNING"]
        assert len(warnings) == 1 and "val_f1" in warnings[0].getMessage(), caplog.text
    assert study.trials[0].intermediate_values == {}


def test_a_stalled_trial_of_a_sweep_ranked_by_best_val_accuracy_is_pruned(tmp_path):
    """The sweep's own plan (metric=best_val_accuracy, the median pruner) and the callbacks as a trial chains
    them (BestCheckpoint, then TrialPruning on the same logs), with a real Optuna study: a trial whose validation
    accuracy never beats its first epoch is pruned once the pruner's warm-up is over."""
    from pipeline.config import parse_parameters
    from pipeline.experiments.study import SearchPlan
    from pipeline.search_space import SWEEP_PARAMETERS

    plan = SearchPlan.from_options(parse_parameters(SWEEP_PARAMETERS, {
        "learning_rate": "1e-3:1e-2:log", "metric": names.BEST_VAL_ACCURACY, "pruner": "median"}))
    study = optuna.create_study(direction=plan.direction, pruner=plan.make_pruner())
    model = _model()

    def trial(val_accuracy: list[float]) -> TrialPruning:
        checkpoint = BestCheckpoint(tmp_path / "best.keras")
        pruning = TrialPruning(study.ask(), plan.monitor(names.BEST_VAL_ACCURACY))
        for callback in (checkpoint, pruning):
            callback.set_model(model)
            callback.on_train_begin()
        model.stop_training = False
        for epoch, accuracy in enumerate(val_accuracy):
            logs = {names.VAL_ACCURACY: accuracy, names.VAL_LOSS: 1 - accuracy}
            checkpoint.on_epoch_end(epoch, logs)
            pruning.on_epoch_end(epoch, logs)
            if model.stop_training:
                break
        return pruning

    for _ in range(3):  # the median pruner's start-up trials
        assert trial([0.5, 0.7, 0.8, 0.85, 0.9]).pruned_epoch is None
        study.tell(study.trials[-1].number, 0.9)
    stalled = trial([0.6, 0.3, 0.3, 0.3, 0.3])
    assert stalled.pruned_epoch == 2 and stalled.missing_epochs == 0


def test_divergence_guard_hooks_stop_at_the_first_nan_and_block_that_epochs_accuracy():
    model = _model()
    guard = DivergenceGuard()
    guard.set_model(model)
    guard.set_params({"steps": 10, "epochs": 3})
    guard.on_train_begin()
    guard.on_epoch_begin(0)
    guard.on_train_batch_end(9, {"loss": 0.7})
    good = {"loss": 0.7, "val_accuracy": 0.8}
    guard.on_epoch_end(0, good)
    assert guard.nan_at is None and not model.stop_training and good["val_accuracy"] == 0.8
    guard.on_epoch_begin(1)
    guard.on_train_batch_end(3, {"loss": 0.6})
    assert guard.nan_at is None
    guard.on_train_batch_end(15, {"loss": math.inf})  # a call of 8 from batch 8: Keras reports 15
    guard.on_train_batch_end(9, {"loss": math.nan})
    assert guard.nan_at == (1, 9)  # the epoch's last batch, and the first divergence is kept
    assert model.stop_training
    diverged = {"loss": math.nan, "val_accuracy": 0.1}
    guard.on_epoch_end(1, diverged)
    assert math.isnan(diverged["val_accuracy"])
    guard.on_train_begin()  # a new fit starts afresh
    assert guard.nan_at is None


def test_nan_guard_stops_within_the_batch(data):
    x, y, x_val, y_val = data
    guard, timing = DivergenceGuard(), BatchTiming(batch_size=32, num_samples=len(x))
    history = _model(learning_rate=1e30).fit(
        x, y, batch_size=32, validation_data=(x_val, y_val), epochs=5, callbacks=[guard, timing], verbose=0
    )
    assert guard.nan_at is not None
    epoch, batch = guard.nan_at
    assert epoch == 0 and batch < len(x) // 32 - 1
    # no batch ran after the one with the NaN loss, and no further epoch
    assert len(timing._batch_seconds) == batch + 1
    assert len(history.history["loss"]) == 1
    assert np.isnan(history.history["val_accuracy"][0])


def test_nan_guard_stops_at_the_end_of_the_call_with_several_batches_per_call(data):
    x, y, x_val, y_val = data
    guard, timing = DivergenceGuard(), BatchTiming(batch_size=32, num_samples=len(x))
    history = _model(learning_rate=1e30, steps_per_execution=8).fit(
        x, y, batch_size=32, validation_data=(x_val, y_val), epochs=5, callbacks=[guard, timing], verbose=0
    )
    epoch, batch = guard.nan_at
    # Keras reports the call's last batch; the guard stops before the next call
    assert epoch == 0 and batch % 8 == 7 and batch < len(x) // 32 - 1
    assert len(timing._batch_seconds) == batch + 1  # every batch of the calls that ran is timed
    assert len(history.history["loss"]) == 1
    assert np.isnan(history.history["val_accuracy"][0])


@pytest.fixture
def new_recorder(sqlite_store, tmp_path):
    """Makes RunRecorders, each on a new run of a real SQLite store."""
    client = MlflowClient()
    experiment_id = client.create_experiment("callbacks")
    recorders: list[RunRecorder] = []

    def make() -> RunRecorder:
        run = client.create_run(experiment_id)
        recorders.append(RunRecorder(client, run.info.run_id, tmp_path / f"staging{len(recorders)}"))
        return recorders[-1]

    yield make
    for recorder in recorders:
        recorder.close(timeout=30)


@pytest.fixture
def recorder(new_recorder):
    return new_recorder()


def _artifact(recorder: RunRecorder, path: str, tmp_path: Path) -> Path:
    return Path(recorder.client.download_artifacts(recorder.run_id, path, str(tmp_path / "downloads")))


def test_epoch_metrics_logger_hooks_forward_what_the_run_records_and_skip_a_diverged_epoch(recorder):
    logger = EpochMetricsLogger(recorder)
    logs = {name: 0.5 for name in names.EPOCH_METRICS} | {names.BEST_VAL_ACCURACY: 0.6, "unrelated": 1.0}
    logger.on_train_begin()
    logger.on_epoch_end(0, logs)
    logger.on_epoch_end(1, {**logs, names.LOSS: math.nan})
    logger.on_epoch_end(2, {names.LOSS: 0.25, names.VAL_ACCURACY: 0.75})
    recorder.flush(timeout=30)
    client = recorder.client
    metrics = client.get_run(recorder.run_id).data.metrics
    assert set(metrics) == {*names.EPOCH_METRICS, names.BEST_VAL_ACCURACY}
    assert [(m.step, m.value) for m in client.get_metric_history(recorder.run_id, names.LOSS)] == [(0, 0.5), (2, 0.25)]
    assert [m.step for m in client.get_metric_history(recorder.run_id, names.BEST_VAL_ACCURACY)] == [0]


def test_learning_rate_changes_hooks_compare_the_rate_used_with_the_rate_after(recorder, tmp_path):
    model = _model()
    changes = LearningRateChanges(recorder)
    changes.set_model(model)
    changes.on_train_begin()
    used = {names.LEARNING_RATE: float(np.float32(0.001))}  # as ReduceLROnPlateau writes it
    changes.on_epoch_end(0, used)
    assert changes.changes == [] and used[names.LEARNING_RATE] == 0.001
    model.optimizer.learning_rate = 0.0005  # a cut at the end of epoch 1
    changes.on_epoch_end(1, {names.LEARNING_RATE: float(np.float32(0.001))})
    changes.on_epoch_end(2, {names.LEARNING_RATE: float(np.float32(0.0005))})
    changes.on_epoch_end(3, {})  # no rate in the logs: nothing to compare
    assert changes.changes == [{"epoch": 1, "old_lr": 0.001, "new_lr": 0.0005, "cause": "ReduceLROnPlateau(val_loss)"}]
    recorder.flush(timeout=30)
    assert json.loads(_artifact(recorder, names.LR_CHANGES_FILE, tmp_path).read_text()) == changes.changes
    assert recorder.client.get_run(recorder.run_id).data.tags[names.TAG_LR_REDUCTIONS] == "1"


def test_best_checkpoint_hooks_save_and_upload_only_a_new_best(recorder, tmp_path):
    model = _model()
    checkpoint = BestCheckpoint(tmp_path / "best.keras", recorder)
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    epochs = [(0.5, 1.0), (0.4, 0.9), (math.nan, math.nan), (0.6, 0.8)]  # val_accuracy, val_loss
    logs = [{names.VAL_ACCURACY: accuracy, names.VAL_LOSS: loss} for accuracy, loss in epochs]
    for epoch, epoch_logs in enumerate(logs):
        checkpoint.on_epoch_end(epoch, epoch_logs)
    assert [names.BEST_VAL_ACCURACY in epoch_logs for epoch_logs in logs] == [True, False, False, True]
    assert checkpoint.best_record == {"epoch": 3, names.VAL_ACCURACY: 0.6, names.VAL_LOSS: 0.8}
    assert checkpoint.best_file == (tmp_path / "best.keras").read_bytes()
    recorder.flush(timeout=30)
    directory = names.checkpoint_dir(3)
    info = json.loads(_artifact(recorder, f"{directory}/{names.BEST_MODEL_INFO_FILE}", tmp_path).read_text())
    assert info == checkpoint.best_record
    tags = recorder.client.get_run(recorder.run_id).data.tags
    assert tags[names.TAG_BEST_EPOCH] == "3"
    assert tags[names.TAG_LATEST_CHECKPOINT] == f"{directory}/{names.BEST_MODEL_FILE}"
    stored = {item.path for item in recorder.client.list_artifacts(recorder.run_id, names.CHECKPOINT_DIR)}
    assert stored == {names.checkpoint_dir(0), directory}  # each new best in its own directory, none for epochs 1, 2
    uploaded = keras.models.load_model(_artifact(recorder, f"{directory}/{names.BEST_MODEL_FILE}", tmp_path))
    assert all(np.array_equal(a, b) for a, b in zip(uploaded.get_weights(), model.get_weights(), strict=True))


def test_best_checkpoint_hooks_start_each_fit_afresh(tmp_path):
    """Keras' convention (EarlyStopping resets `best` in on_train_begin): a new fit's first epoch is its
    first best, however good the previous fit's best was."""
    checkpoint = BestCheckpoint(tmp_path / "best.keras")
    checkpoint.set_model(_model())
    checkpoint.on_train_begin()
    checkpoint.on_epoch_end(0, {names.VAL_ACCURACY: 0.9, names.VAL_LOSS: 0.3})
    checkpoint.on_train_begin()
    assert checkpoint.best == -math.inf and checkpoint.best_record is None and checkpoint.best_file is None
    logs = {names.VAL_ACCURACY: 0.5, names.VAL_LOSS: 0.7}
    checkpoint.on_epoch_end(0, logs)
    assert checkpoint.best == 0.5 and logs[names.BEST_VAL_ACCURACY] == 0.5
    assert checkpoint.best_record == {"epoch": 0, names.VAL_ACCURACY: 0.5, names.VAL_LOSS: 0.7}


def test_one_callback_instance_fits_twice_as_two_new_ones_would(data, tmp_path):
    """Two real fits with the same callback instances: the second one's state is its own. The second model
    has zero weights and a zero learning rate, so its validation accuracy is far below the first's best."""
    import tensorflow as tf

    x, y, x_val, y_val = data
    checkpoint = BestCheckpoint(tmp_path / "best.keras")
    timing, guard = BatchTiming(32, len(x)), DivergenceGuard()
    workers = WorkerTiming(tf.distribute.get_strategy(), num_workers=1)
    pruning = TrialPruning(optuna.create_study(direction="maximize").ask(), monitor="val_f1")  # never logged
    callbacks = [guard, timing, workers, checkpoint, pruning]
    model = _model()
    first = model.fit(x, y, batch_size=32, validation_data=(x_val, y_val), epochs=3, callbacks=callbacks, verbose=0)
    assert checkpoint.best == max(first.history[names.VAL_ACCURACY]) > 0.5

    model.set_weights([np.zeros_like(weights) for weights in model.get_weights()])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    second = model.fit(x, y, batch_size=32, validation_data=(x_val, y_val), epochs=2, callbacks=callbacks, verbose=0)
    accuracy = second.history[names.VAL_ACCURACY]
    assert accuracy[0] == accuracy[1] < 0.5
    assert checkpoint.best == accuracy[0] and checkpoint.best_record["epoch"] == 0
    saved = keras.models.load_model(tmp_path / "best.keras")
    assert all(not weights.any() for weights in saved.get_weights())  # the second fit's model
    assert [row["epoch"] for row in workers.history] == [0, 1]
    assert second.history[names.SLOWEST_WORKER_EPOCH_SECONDS] == [row["seconds"][0] for row in workers.history]
    assert pruning.missing_epochs == 2 and guard.nan_at is None


def _fit(data, recorder, tmp_path: Path, shuffle_val_labels: bool, epochs: int, move: tuple[str, str] | None = None):
    """Real training with the pipeline's callbacks in their order, or with callback role `move[0]`
    placed right before role `move[1]`.

    With shuffled validation labels val_loss worsens every epoch after the first, so
    ReduceLROnPlateau (patience 0) cuts the rate at the end of epochs 1, 2 and 3."""
    x, y, x_val, y_val = data
    if shuffle_val_labels:
        y_val = np.random.default_rng(0).permutation(y_val)
    config = TrainingConfig.from_values({"lr_patience": "0", "es_patience": "10", "target_accuracy": "0"})
    workdir = tmp_path / f"{move}-{shuffle_val_labels}"
    workdir.mkdir()
    callbacks = build_callbacks(config, workdir, recorder, len(x))
    model = _model()
    model.fit(x, y, validation_data=(x_val, y_val), epochs=epochs, callbacks=_ordered(callbacks, move), verbose=0)
    recorder.flush(timeout=30)
    return callbacks, model


def _ordered(callbacks: TrainingCallbacks, move: tuple[str, str] | None) -> list[keras.callbacks.Callback]:
    ordered = callbacks.ordered
    if move is not None:
        moved, before = getattr(callbacks, move[0]), getattr(callbacks, move[1])
        ordered.remove(moved)
        ordered.insert(ordered.index(before), moved)
    return ordered


def test_callbacks_are_composed_in_the_documented_order(tmp_path, recorder):
    callbacks = build_callbacks(TrainingConfig.from_values(), tmp_path, recorder, 1000)
    assert callbacks.names == EXPECTED_ORDER
    assert callbacks.ordered[-2:] == [callbacks.epoch_metrics, callbacks.stop_check]
    assert len({id(callback) for callback in callbacks.ordered}) == len(EXPECTED_ORDER)
    checkpoint = callbacks.checkpoint
    assert isinstance(checkpoint, keras.callbacks.ModelCheckpoint)
    assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_best_only) == ("val_accuracy", "max", True)
    assert checkpoint.filepath.endswith(".keras") and checkpoint.filepath.startswith(str(tmp_path))
    assert (callbacks.early_stopping.monitor, callbacks.early_stopping.patience) == ("val_loss", 3)
    assert callbacks.early_stopping.restore_best_weights
    reduce_lr = callbacks.reduce_lr
    assert (reduce_lr.monitor, reduce_lr.factor, reduce_lr.patience, reduce_lr.min_lr) == ("val_loss", 0.5, 2, 1e-6)
    worker = build_callbacks(TrainingConfig.from_values(), tmp_path, None, 1000)  # records nothing
    assert worker.names == [name for name in EXPECTED_ORDER if name not in (
        "LearningRateChanges", "TrainingStateBackup", "EpochMetricsLogger")]


@pytest.mark.parametrize("move", [None, ("lr_changes", "reduce_lr")], ids=["ours", "changes-before-cut"])
def test_order_matters_for_lr_changes(data, new_recorder, tmp_path, move):
    callbacks, model = _fit(data, new_recorder(), tmp_path, shuffle_val_labels=True, epochs=4, move=move)
    changes = callbacks.lr_changes.changes
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(0.001 * 0.5**3)
    if move:
        # Before ReduceLROnPlateau has written the rate used, there is nothing to compare:
        # three cuts happened and none is recorded.
        assert changes == []
        return
    assert [change["epoch"] for change in changes] == [1, 2, 3]
    assert changes[0] == {"epoch": 1, "old_lr": 0.001, "new_lr": 0.0005, "cause": "ReduceLROnPlateau(val_loss)"}
    # the rate recorded for each epoch is the one used during it
    assert [row[names.LEARNING_RATE] for row in callbacks.backup.history] == [0.001, 0.001, 0.0005, 0.00025]


@pytest.mark.parametrize("move", [None, ("checkpoint", "divergence_guard")], ids=["ours", "checkpoint-before-guard"])
def test_order_matters_for_a_diverged_epoch(data, new_recorder, tmp_path, move):
    """The guard blocks the diverged epoch's val_accuracy before the checkpoint compares it; placed
    after the checkpoint, the diverged first epoch is saved as the best model."""
    x, y, x_val, y_val = data
    callbacks = build_callbacks(TrainingConfig.from_values(), tmp_path, new_recorder(), len(x))
    model = _model(learning_rate=1e30)
    model.fit(x, y, validation_data=(x_val, y_val), epochs=3, callbacks=_ordered(callbacks, move), verbose=0)
    assert callbacks.divergence_guard.nan_at[0] == 0
    saved = Path(callbacks.checkpoint.filepath).exists()
    assert saved == bool(move)
    if move:
        weights = keras.models.load_model(callbacks.checkpoint.filepath).get_weights()
        assert not all(np.isfinite(w).all() for w in weights)


def test_state_backup_restores_the_carried_callbacks_after_their_own_resets(data, new_recorder, tmp_path):
    recorder = new_recorder()
    trained, _ = _fit(data, recorder, tmp_path, shuffle_val_labels=True, epochs=3)
    state = TrainingState.load(_artifact(recorder, names.state_artifact(2), tmp_path))
    assert state.epoch == 2 and len(state.record["history"]) == 3

    def begin(move: tuple[str, str] | None) -> TrainingCallbacks:
        workdir = tmp_path / f"resumed-{move}"
        workdir.mkdir()
        callbacks = build_callbacks(TrainingConfig.from_values(), workdir, new_recorder(), 1000, resume_from=state)
        model = _model()
        for callback in _ordered(callbacks, move):  # the hook as Keras calls it, in list order
            callback.set_model(model)
            callback.on_train_begin()
        return callbacks

    resumed = begin(None)
    assert resumed.backup.history == trained.backup.history
    assert resumed.lr_changes.changes == trained.lr_changes.changes == state.record["lr_changes"]
    assert resumed.checkpoint.best_record == trained.checkpoint.best_record
    assert resumed.checkpoint.best == trained.checkpoint.best
    for field in ("wait", "best", "cooldown_counter"):
        assert getattr(resumed.reduce_lr, field) == getattr(trained.reduce_lr, field)
    assert (resumed.early_stopping.wait, resumed.early_stopping.best) == (
        trained.early_stopping.wait, trained.early_stopping.best)
    assert resumed.early_stopping.best_weights is not None
    # Placed before EarlyStopping, the restore is undone by EarlyStopping's own reset.
    too_early = begin(("backup", "early_stopping"))
    assert too_early.early_stopping.best_weights is None and too_early.early_stopping.best is None


def test_recording_callbacks_record_checkpoints_lr_changes_and_state_in_the_run(data, recorder, tmp_path):
    callbacks, _ = _fit(data, recorder, tmp_path, shuffle_val_labels=True, epochs=4)
    client, run_id = recorder.client, recorder.run_id
    run = client.get_run(run_id)
    assert run.data.tags[names.TAG_LR_REDUCTIONS] == "3"
    best = callbacks.checkpoint.best_record
    assert run.data.tags[names.TAG_BEST_EPOCH] == str(best["epoch"])
    downloaded = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    assert json.loads((downloaded / names.LR_CHANGES_FILE).read_text()) == callbacks.lr_changes.changes
    info = json.loads((downloaded / names.checkpoint_dir(best["epoch"]) / names.BEST_MODEL_INFO_FILE).read_text())
    assert info["epoch"] == best["epoch"]
    state = TrainingState.load(downloaded / names.state_artifact(3))
    assert state.epoch == 3 and state.csv_log.count("\n") == 5  # header + 4 epochs
    assert TrainingState.load(downloaded / names.state_artifact(2)).epoch == 2  # the fallback, in the other slot
    restored = keras.models.load_model(downloaded / names.checkpoint_file(best["epoch"]))
    x_val = data[2]
    assert restored.predict(x_val[:4], verbose=0).shape == (4, 10)
    history = client.get_metric_history(run_id, names.VAL_ACCURACY)
    assert [metric.step for metric in history] == [0, 1, 2, 3]


class _RaiseLearningRate(keras.callbacks.Callback):
    """Sets an absurd learning rate at one epoch's start, so that real training diverges there."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.optimizer.learning_rate = 1e30


def test_nan_mid_training_keeps_the_last_good_checkpoint(data, recorder, tmp_path):
    x, y, x_val, y_val = data
    config = TrainingConfig.from_values({"target_accuracy": "0", "batch_size": "32"})
    callbacks = build_callbacks(config, tmp_path, recorder, len(x))
    model = _model()
    ordered = [_RaiseLearningRate(epoch=2), *callbacks.ordered]
    model.fit(x, y, batch_size=32, validation_data=(x_val, y_val), epochs=6, callbacks=ordered, verbose=0)
    assert callbacks.divergence_guard.nan_at[0] == 2
    assert callbacks.stop_reason() == names.STOP_NAN_LOSS
    assert len(callbacks.backup.history) == 2  # only completed epochs are recorded
    best = callbacks.checkpoint.best_record
    assert best["epoch"] in (0, 1)
    recorder.flush(timeout=30)
    assert [m.step for m in recorder.client.get_metric_history(recorder.run_id, names.LOSS)] == [0, 1]
    checkpoint_file, info = download_best_checkpoint(recorder.client, recorder.run_id, tmp_path / "a")
    assert info == best
    restored = keras.models.load_model(checkpoint_file)
    predictions = restored.predict(x_val, verbose=0)
    assert np.isfinite(predictions).all()
    accuracy = float((predictions.argmax(1) == y_val.argmax(1)).mean())
    assert accuracy == pytest.approx(best[names.VAL_ACCURACY], abs=1e-6)


def test_the_stop_reason_is_read_from_the_callbacks_after_fit(data, tmp_path):
    x, y, x_val, y_val = data
    reasons = {}
    for name, values in {
        "target": {"target_accuracy": "0.5"},
        "early": {"target_accuracy": "0", "es_patience": "0", "learning_rate": "0.05"},
        "completed": {"target_accuracy": "0", "es_patience": "20"},
    }.items():
        workdir = tmp_path / name
        workdir.mkdir()
        callbacks = build_callbacks(TrainingConfig.from_values(values), workdir, None, len(x))
        model = _model(learning_rate=float(values.get("learning_rate", 0.001)))
        model.fit(x, y, validation_data=(x_val, y_val), epochs=8, callbacks=callbacks.ordered, verbose=0)
        reasons[name] = callbacks.stop_reason()
    assert reasons == {
        "target": names.STOP_TARGET_ACCURACY, "early": names.STOP_EARLY_STOPPING, "completed": names.STOP_COMPLETED
    }


@pytest.fixture
def stop_request():
    """A stop request of this process (as the entry points' signal handler makes), cleared after the test."""
    yield request_stop
    clear_stop_request()


def test_stop_request_check_raises_after_a_batch_and_an_epoch_once_a_stop_was_requested(stop_request):
    check = StopRequestCheck()
    check.on_train_batch_end(0)
    check.on_epoch_end(0)  # no stop asked for: nothing happens
    stop_request()
    with pytest.raises(KeyboardInterrupt):
        check.on_train_batch_end(1)
    with pytest.raises(KeyboardInterrupt):
        check.on_epoch_end(0)


class _DroppedInterrupt(keras.callbacks.Callback):
    """What a signal handler's KeyboardInterrupt raised inside a finalizer comes to: the stop is requested,
    the exception is lost, and training goes on."""

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        if batch == 2:
            request_stop()


def test_a_training_whose_interrupt_was_dropped_still_stops_after_that_batch(data, tmp_path, stop_request):
    x, y, x_val, y_val = data
    config = TrainingConfig.from_values({"target_accuracy": "0"})
    callbacks = build_callbacks(config, tmp_path, None, len(x))
    batches = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(batch))
    seen: list[int] = []
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, validation_data=(x_val, y_val), epochs=3, batch_size=32, verbose=0,
                  callbacks=[_DroppedInterrupt(), batches, *callbacks.ordered])
    assert stop_requested() and seen == [0, 1, 2]  # stopped right after the batch, not after 3 epochs


# SIGTERM arrives while a finalizer (here a weakref callback, as garbage collection runs them) executes:
# the handler's KeyboardInterrupt is raised inside it, where Python drops it.
_SIGNAL_INSIDE_A_FINALIZER = """
import os, signal, weakref
from mlflow_project.common import stop_on_first_signal
from pipeline.stop_request import stop_requested
stop_on_first_signal()

class Tensor:
    pass

def finalizer(reference):
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100_000):  # the handler runs between two of these bytecodes
        pass

tensor = Tensor()
reference = weakref.ref(tensor, finalizer)
del tensor
print("stop requested:", stop_requested())
"""


def test_an_interrupt_raised_inside_a_finalizer_is_dropped_silently_and_the_stop_kept(tmp_path):
    """A stopped sweep printed "Exception ignored in ... Traceback ... KeyboardInterrupt" (CI, stop 35): the
    stop request survives that, and the entry point's hook keeps the traceback off the console."""
    result = subprocess.run([sys.executable, "-c", _SIGNAL_INSIDE_A_FINALIZER], cwd=tmp_path, env=project_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "stop requested: True"
    assert result.stderr == ""


@pytest.mark.parametrize("sampler", ["grid", "tpe"])
def test_a_sweep_whose_interrupt_was_dropped_takes_no_further_trial(sampler, stop_request):
    """The trial loops check a stop request before they take a trial (grid: a queued point; TPE: a new one)."""
    from pipeline.config import parse_parameters
    from pipeline.experiments.runs import Ranking
    from pipeline.experiments.study import SearchPlan, SharedStudy
    from pipeline.experiments.trials import TrialRunner
    from pipeline.search_space import SWEEP_PARAMETERS

    options = parse_parameters(SWEEP_PARAMETERS, {"learning_rate": "0.01,0.003", "sampler": sampler, "trials": "2"})
    plan = SearchPlan.from_options(options)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, direction=plan.direction)
    study.enqueue_trial({"learning_rate": 0.01})
    shared = SharedStudy(study, storage, "memory", "parent", created=True)
    runner = TrialRunner(None, shared, plan, Ranking.from_options(options), "0")
    stop_request()
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.WAITING]  # nothing taken
