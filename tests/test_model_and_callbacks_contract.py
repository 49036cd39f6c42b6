"""README guarantees about the model and the callbacks that no other test checks: the order in which
an epoch's records reach the store, the logged model's structure, EarlyStopping's restored weights,
ReduceLROnPlateau's floor, and the console lines of a rate cut and of the stop.

Most of them share one real training (module fixture `plateau`): the pipeline's callbacks, as
`build_callbacks` composes them, on MNIST whose validation labels are shuffled. On shuffled labels
val_loss worsens after the first epoch, so every epoch is a plateau: ReduceLROnPlateau (patience 0)
cuts the rate at every epoch until `min_lr`, and EarlyStopping (patience 4) stops at epoch 4 with
epoch 0 as its best. Everything is seeded: the same epochs, cuts and stop at every run.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import TrainingConfig
from pipeline.tracking.recorder import RunRecorder
from pipeline.tracking.training_state import TrainingState
from pipeline.training.callback_list import TrainingCallbacks, build_callbacks
from pipeline.training.data import load_dataset, split_validation
from pipeline.training.model import build_model
from pipeline.training.run import run_training
from tests.helpers import MNIST_SMALL, new_sqlite_store, run_cli_here

MIN_LR = 0.0003  # 0.001 -> 0.0005 -> 0.00025 would pass below it: the second cut must stop at 0.0003
PLATEAU_PARAMETERS = {
    "lr_patience": "0", "lr_factor": "0.5", "min_lr": str(MIN_LR), "es_patience": "4", "target_accuracy": "0",
    "epochs": "10",
}


def shuffled_validation_labels(directory: Path, validation_split: float = 0.2) -> Path:
    """MNIST_SMALL with the labels of its validation part (the end of the training data) shuffled: an
    .npz any entry point takes as `dataset`."""
    with np.load(MNIST_SMALL, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    split_at = int(len(arrays["y_train"]) * (1 - validation_split))
    labels = arrays["y_train"].copy()
    labels[split_at:] = np.random.default_rng(0).permutation(labels[split_at:])
    arrays["y_train"] = labels
    path = directory / "mnist-shuffled-validation.npz"
    np.savez(path, **arrays)
    return path


@dataclasses.dataclass
class Delivery:
    """One record as the recorder delivered it to the store.

    kind: `checkpoint`, `checkpoint_info`, `lr_changes`, `state` (in its epoch's slot; `state in <path>` in the
        other), `metrics` (an epoch's metrics),
        `model_link` (an epoch's metrics linked to its checkpoint's LoggedModel),
        `tags` (tags only), `other` (any other file or batch), or `epoch_begin` / `train_end`
        (markers put by DrainRecorder between epochs, not deliveries).
    epoch: the epoch the delivered content is of (read from the content itself).
    stored_state_epochs: for `metrics`: the epochs of the training states the store held just before.
    """

    kind: str
    epoch: int | None = None
    stored_state_epochs: list[int] | None = None


class DeliveryLog(MlflowClient):
    """The real MLflow client (the run's records go to the real store through it), which notes each
    record the RunRecorder delivers, in delivery order, with the epoch its content belongs to.

    It is what RunRecorder is given as its `client`: the boundary between the recorder and the store.
    A tracking server's access log shows the same order, but not what a request carried: every
    `log-batch` is the same line, so the metrics of epoch e cannot be told from those of e - 1, and
    metrics sent before their epoch's files would log exactly like metrics sent after the previous
    epoch's. Here each delivery is read (the step of its metrics, the epoch inside a state or
    checkpoint-info file), and before an epoch's metrics go out the store is asked which state it holds.
    """

    def __init__(self, tracking_uri: str, scratch: Path) -> None:
        super().__init__(tracking_uri)
        self.deliveries: list[Delivery] = []
        self._scratch = scratch

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **options):
        steps = {metric.step for metric in metrics if metric.key == names.VAL_LOSS}
        if steps and all(metric.model_id for metric in metrics):
            [step] = steps
            delivery = Delivery("model_link", step)
        elif steps:
            [step] = steps
            delivery = Delivery("metrics", step, self._stored_state_epochs(run_id))
        else:
            delivery = Delivery("tags" if tags and not metrics and not params else "other")
        result = super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **options)
        self.deliveries.append(delivery)
        return result

    def log_artifact(self, run_id, local_path, artifact_path=None):
        path = f"{artifact_path}/{Path(local_path).name}" if artifact_path else Path(local_path).name
        delivery = Delivery("other")
        directory, _, name = path.rpartition("/")
        checkpoint_epoch = re.fullmatch(rf"{names.CHECKPOINT_DIR}/{names.CHECKPOINT_EPOCH_PREFIX}(\d+)", directory)
        if checkpoint_epoch and name == names.BEST_MODEL_FILE:
            delivery = Delivery("checkpoint", int(checkpoint_epoch[1]))  # the epoch its directory names
        elif checkpoint_epoch and name == names.BEST_MODEL_INFO_FILE:
            delivery = Delivery("checkpoint_info", json.loads(Path(local_path).read_text())["epoch"])
        elif path == names.LR_CHANGES_FILE:
            changes = json.loads(Path(local_path).read_text())
            delivery = Delivery("lr_changes", changes[-1]["epoch"] if changes else None)
        elif directory == names.STATE_DIR:
            epoch = TrainingState.load(Path(local_path)).epoch
            delivery = Delivery("state" if path == names.state_artifact(epoch) else f"state in {path}", epoch)
        result = super().log_artifact(run_id, local_path, artifact_path)
        self.deliveries.append(delivery)
        return result

    def _stored_state_epochs(self, run_id: str) -> list[int]:
        """The epochs of the training states the run holds in the store now, in order."""
        with tempfile.TemporaryDirectory(dir=self._scratch) as directory:
            return sorted(
                TrainingState.load(Path(self.download_artifacts(run_id, item.path, directory))).epoch
                for item in self.list_artifacts(run_id, names.STATE_DIR)
            )


class DrainRecorder(keras.callbacks.Callback):
    """Placed first: before each epoch (and before the end of training) waits until the recorder has
    delivered everything, then marks the delivery log. Each epoch's deliveries are then exactly the
    records that epoch queued, whatever the machine's speed (no file queued twice is merged)."""

    def __init__(self, recorder: RunRecorder, log: DeliveryLog) -> None:
        super().__init__()
        self.recorder, self.log = recorder, log

    def on_epoch_begin(self, epoch, logs=None):
        assert self.recorder.wait_until_delivered(timeout=60)
        self.log.deliveries.append(Delivery("epoch_begin", epoch))

    def on_train_end(self, logs=None):
        assert self.recorder.wait_until_delivered(timeout=60)
        self.log.deliveries.append(Delivery("train_end"))


class WeightsAtEpochEnd(keras.callbacks.Callback):
    """Placed last: the model's weights at the end of each epoch (before EarlyStopping restores any)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[list[np.ndarray]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.model.get_weights())


@dataclasses.dataclass
class PlateauTraining:
    config: TrainingConfig
    client: DeliveryLog
    run_id: str
    callbacks: TrainingCallbacks
    model: keras.Model
    epoch_weights: list[list[np.ndarray]]
    x_val: np.ndarray
    y_val: np.ndarray

    def metric(self, key: str) -> list[float]:
        history = self.client.get_metric_history(self.run_id, key)
        assert [m.step for m in history] == list(range(len(history))), key
        return [m.value for m in history]


@pytest.fixture(scope="module")
def plateau(tmp_path_factory) -> PlateauTraining:
    directory = tmp_path_factory.mktemp("plateau")
    config = TrainingConfig.from_values(PLATEAU_PARAMETERS | {"dataset": str(shuffled_validation_labels(directory))})
    dataset = load_dataset(config.dataset)
    x_train, y_train, x_val, y_val = split_validation(dataset.x_train, dataset.y_train, config.validation_split)
    client = DeliveryLog(new_sqlite_store(directory), directory)
    experiment_id = client.create_experiment("plateau", artifact_location=(directory / "artifacts").as_uri())
    run_id = client.create_run(experiment_id).info.run_id
    workdir = directory / "run"
    workdir.mkdir()
    with RunRecorder(client, run_id, directory / "staging") as recorder:
        callbacks = build_callbacks(config, workdir, recorder, len(x_train))
        keras.utils.set_random_seed(config.seed)
        model = build_model(config.layer_sizes, config.dropout, config.learning_rate, config.steps_per_execution)
        weights = WeightsAtEpochEnd()
        model.fit(
            x_train, y_train, batch_size=config.batch_size, validation_data=(x_val, y_val), epochs=config.epochs,
            callbacks=[DrainRecorder(recorder, client), *callbacks.ordered, weights], verbose=0,
        )
        recorder.close(timeout=60)
    training = PlateauTraining(config, client, run_id, callbacks, model, weights.weights, x_val, y_val)
    # the premise: every epoch after the first is a plateau (val_loss above the best so far)
    val_loss = training.metric(names.VAL_LOSS)
    assert all(val_loss[epoch] > min(val_loss[:epoch]) for epoch in range(1, len(val_loss))), val_loss
    return training


def _stored_json(training: PlateauTraining, artifact: str):
    with tempfile.TemporaryDirectory() as directory:
        return json.loads(Path(training.client.download_artifacts(training.run_id, artifact, directory)).read_text())


def test_an_epochs_records_reach_the_store_checkpoint_lr_changes_state_then_metrics(plateau):
    """README: "Within an epoch, records are delivered in a fixed order — best checkpoint, LR changes,
    state, then metrics — so whenever an epoch's metrics are in the run, a state covering that epoch
    is too." Observed at the recorder's boundary with the store: what each delivery carried, in the
    order the store received it, and which state the store held when an epoch's metrics arrived."""
    completed = len(plateau.metric(names.VAL_LOSS))
    new_best_epochs = [m.step for m in plateau.client.get_metric_history(plateau.run_id, names.BEST_VAL_ACCURACY)]
    cut_epochs = [change["epoch"] for change in _stored_json(plateau, names.LR_CHANGES_FILE)]
    assert set(new_best_epochs) & set(cut_epochs), "the fixture has an epoch with a new best and a cut"

    deliveries = plateau.client.deliveries
    markers = [i for i, d in enumerate(deliveries) if d.kind in ("epoch_begin", "train_end")]
    assert [deliveries[i].epoch for i in markers] == [*range(completed), None]
    for epoch, (start, end) in enumerate(zip(markers[:-1], markers[1:], strict=True)):
        segment = deliveries[start + 1:end]
        kinds = [d.kind for d in segment if d.kind != "tags"]
        expected = (
            (["model_link"] if epoch - 1 in new_best_epochs else [])  # queued at this epoch's begin
            + (["checkpoint", "checkpoint_info"] if epoch in new_best_epochs else [])
            + (["lr_changes"] if epoch in cut_epochs else [])
            + ["state", "metrics"]  # one state an epoch, in its parity's slot: the one before stays in the other
        )
        assert kinds == expected, f"epoch {epoch}: {segment}"
        assert all(d.epoch == epoch for d in segment if d.kind not in ("tags", "model_link"))
        assert all(d.epoch == epoch - 1 for d in segment if d.kind == "model_link"), segment
        # the epoch's tags (best_epoch, lr_reductions) travel with its metrics or right after them
        assert [d.kind for d in segment][-1] in ("metrics", "tags")
        [metrics] = [d for d in segment if d.kind == "metrics"]
        # the store held this epoch's state before its metrics, and the state of the epoch before as a fallback
        assert metrics.stored_state_epochs == [*range(max(0, epoch - 1), epoch + 1)], segment


def test_logged_model_is_the_documented_mlp_with_adam_at_the_configured_rate(sqlite_store):
    """README: "the seed notebook's Keras MLP (784-128-64-10, dropout 0.2, Adam)", read from the model
    the run logged (`runs:/<id>/model`), not from the code that builds it."""
    config = TrainingConfig.from_values({"dataset": str(MNIST_SMALL), "epochs": "2", "learning_rate": "0.002"})
    result = run_training(config, experiment_name="structure")
    model = mlflow.tensorflow.load_model(f"runs:/{result.run_id}/model")

    assert model.input_shape == (None, 784)
    layers = [
        (type(layer).__name__, layer.units if isinstance(layer, keras.layers.Dense) else layer.rate)
        for layer in model.layers
    ]
    assert layers == [("Dense", 128), ("Dropout", 0.2), ("Dense", 64), ("Dropout", 0.2), ("Dense", 10)]
    activations = [layer.get_config()["activation"] for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert activations == ["relu", "relu", "softmax"]
    assert model.output_shape == (None, 10)
    assert model.count_params() == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert type(model.optimizer) is keras.optimizers.Adam
    # 2 epochs with lr_patience 2: no cut can have happened, the rate is the configured one
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(0.002, rel=1e-6)
    assert model.optimizer.iterations.numpy() > 0  # the optimizer state of the trained checkpoint, not a new one


def test_early_stopping_restores_the_best_epochs_weights(plateau):
    """README: EarlyStopping on val_loss, "best weights restored": after a training it stopped, the
    model holds the weights of the epoch with the lowest val_loss, not those of the last epoch."""
    val_loss = plateau.metric(names.VAL_LOSS)
    best, last = int(np.argmin(val_loss)), len(val_loss) - 1
    assert plateau.callbacks.stop_reason() == names.STOP_EARLY_STOPPING
    assert last == best + plateau.config.es_patience < plateau.config.epochs - 1
    final = plateau.model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(final, plateau.epoch_weights[best], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(final, plateau.epoch_weights[last], strict=True))
    loss, _accuracy = plateau.model.evaluate(plateau.x_val, plateau.y_val, verbose=0)
    assert loss == pytest.approx(val_loss[best], rel=1e-5)
    assert loss != pytest.approx(val_loss[last], rel=1e-3)


def test_reduce_lr_on_plateau_stops_at_min_lr(plateau):
    """README: ReduceLROnPlateau on val_loss with `lr_factor`, `lr_patience`, `min_lr`: at every
    plateau the rate is cut, never below min_lr; once there, further plateaus leave it there."""
    rates = plateau.metric(names.LEARNING_RATE)
    # the rate used during each epoch: 0.001, cut at the end of epoch 1 to 0.0005, of epoch 2 to
    # max(0.00025, 0.0003); epochs 3 and 4 are plateaus too, and it stays at 0.0003
    assert rates == [0.001, 0.001, 0.0005, MIN_LR, MIN_LR]
    assert min(rates) >= MIN_LR
    changes = _stored_json(plateau, names.LR_CHANGES_FILE)
    assert [(c["epoch"], c["old_lr"], c["new_lr"]) for c in changes] == [(1, 0.001, 0.0005), (2, 0.0005, MIN_LR)]
    assert plateau.client.get_run(plateau.run_id).data.tags[names.TAG_LR_REDUCTIONS] == "2"
    assert float(keras.ops.convert_to_numpy(plateau.model.optimizer.learning_rate)) == pytest.approx(MIN_LR, rel=1e-6)


@pytest.mark.slow
def test_console_shows_a_line_per_rate_cut_and_one_for_the_stop(tmp_path, monkeypatch):
    """README: "The console shows one line per epoch ..., a line for each learning-rate reduction and
    for the stop, and a summary". The CLI's own console (in this process, tests.helpers.run_cli_here); the lines
    are checked against the run's record."""
    tracking_uri = new_sqlite_store(tmp_path)
    arguments = ["train", "--experiment-name", "console", "--es-patience", "2", "--dataset",
                 str(shuffled_validation_labels(tmp_path))]
    for name in ("lr_patience", "lr_factor", "target_accuracy", "epochs"):
        arguments += [f"--{name.replace('_', '-')}", PLATEAU_PARAMETERS[name]]
    monkeypatch.chdir(tmp_path)
    result = run_cli_here(arguments, MLFLOW_TRACKING_URI=tracking_uri)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    run_id = re.fullmatch(r"Run (\w+): .*", lines[-1]).group(1)
    client = MlflowClient(tracking_uri)
    tags = client.get_run(run_id).data.tags
    with tempfile.TemporaryDirectory() as directory:
        changes = json.loads(Path(client.download_artifacts(run_id, names.LR_CHANGES_FILE, directory)).read_text())
    assert tags[names.TAG_STOP_REASON] == names.STOP_EARLY_STOPPING
    assert [(c["epoch"], c["old_lr"], c["new_lr"]) for c in changes] == [(1, 0.001, 0.0005), (2, 0.0005, 0.00025)]

    # after each epoch's line: its rate cut, if any; after the last one: the stop; then the summary
    events = [line for line in lines if re.match(r"Epoch \d+: (learning rate|stopping)", line)]
    assert events == [
        "Epoch 2: learning rate 0.001 -> 0.0005 (val_loss plateau)",
        "Epoch 3: learning rate 0.0005 -> 0.00025 (val_loss plateau)",
        "Epoch 3: stopping (early_stopping)",
    ]
    assert lines.index(events[0]) == lines.index(next(line for line in lines if line.startswith("Epoch 2: loss="))) + 1
    epoch_3 = lines.index(next(line for line in lines if line.startswith("Epoch 3: loss=")))
    assert lines[epoch_3 + 1:epoch_3 + 3] == events[1:]
    assert not any(line.startswith("Epoch 4") for line in lines)
    assert lines[-1].startswith(f"Run {run_id}: ") and "(early_stopping)" in lines[-1]
