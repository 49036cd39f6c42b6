"""The run contract (docs/run-record.md) as one check of a run in the store, shared by every test that
trains through a different door (in process, the CLI, `mlflow run`, the team server, a sweep)."""

from __future__ import annotations

import csv
import json
from importlib import metadata
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import TrainingConfig
from pipeline.experiments.runs import logged_models_by_run
from pipeline.tracking.model_logging import MODEL_REQUIREMENTS
from pipeline.training.data import load_dataset
from tests.helpers import MNIST_SMALL

DERIVED_PARAMS = {
    names.PARAM_TOTAL_PARAMETERS: str(784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10),
    names.PARAM_TRAIN_SIZE: "1200",
    names.PARAM_VAL_SIZE: "300",
    names.PARAM_TEST_SIZE: "300",
    names.PARAM_STEPS_PER_EPOCH: "10",
    names.PARAM_NUM_REPLICAS: "1",
    names.PARAM_NUM_WORKERS: "1",
}
CALLBACKS = (
    "TargetAccuracyStop,DivergenceGuard,BatchTiming,BestCheckpoint,EarlyStopping,ReduceLROnPlateau,LearningRateChanges,"
    "CSVLogger,TrainingStateBackup,EpochMetricsLogger,StopRequestCheck"
)
EXPECTED_ARTIFACTS = {  # beside checkpoints/epoch_<E>/ of each new best (checked below)
    names.LR_CHANGES_FILE,
    names.TRAINING_LOG_FILE,
    names.MODEL_SUMMARY_FILE,
    f"{names.PLOTS_DIR}/{names.TRAINING_CURVES_FILE}",
    f"{names.PLOTS_DIR}/{names.CONFUSION_MATRIX_FILE}",
    names.CLASSIFICATION_REPORT_FILE,
}


def small_config(**values: str) -> TrainingConfig:
    return TrainingConfig.from_values({"dataset": str(MNIST_SMALL), "epochs": "6", "lr_patience": "1"} | values)


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def assert_run_contract(
    client: MlflowClient,
    run_id: str,
    config: TrainingConfig,
    workdir: Path,
    expected_params: dict[str, str] | None = None,
    derived_params: dict[str, str] | None = None,
    callbacks: str = CALLBACKS,
    status: str = "FINISHED",
) -> None:
    """Every item of the run contract (README, "What a run records"), checked in the store.

    `derived_params` overrides DERIVED_PARAMS (a distributed training's replicas and workers),
    `callbacks` is the expected `callbacks` tag, and `status` the run's (KILLED: a pruned sweep trial)."""
    run = client.get_run(run_id)
    assert run.info.status == status
    assert run.data.params == (expected_params or config.as_params()) | DERIVED_PARAMS | (derived_params or {})

    completed = int(run.data.metrics[names.EPOCHS_COMPLETED])
    assert 1 <= completed <= config.epochs
    for metric in names.EPOCH_METRICS:
        history = client.get_metric_history(run_id, metric)
        assert [m.step for m in history] == list(range(completed)), metric
        assert all(np.isfinite(m.value) for m in history), metric
    rates = [m.value for m in client.get_metric_history(run_id, names.LEARNING_RATE)]
    assert rates[0] == config.learning_rate

    artifacts = artifact_paths(client, run_id)
    assert artifacts >= EXPECTED_ARTIFACTS
    local = Path(client.download_artifacts(run_id, "", str(workdir / "artifacts")))

    # learning-rate changes: one entry per change of the per-epoch rate, and the tag counts them
    changes = json.loads((local / names.LR_CHANGES_FILE).read_text())
    expected_changes = [
        (epoch, rates[epoch], rates[epoch + 1]) for epoch in range(completed - 1) if rates[epoch + 1] != rates[epoch]
    ]
    recorded = [(c["epoch"], c["old_lr"], c["new_lr"]) for c in changes]
    # a cut at the last epoch has no next epoch's rate to show it: at most that one entry more
    assert recorded[: len(expected_changes)] == expected_changes
    assert len(recorded) - len(expected_changes) in (0, 1), recorded
    if len(recorded) > len(expected_changes):
        epoch, old_lr, new_lr = recorded[-1]
        assert epoch == completed - 1 and old_lr == rates[-1] and new_lr < old_lr, recorded
    assert all(c["cause"] == "ReduceLROnPlateau(val_loss)" for c in changes)
    assert run.data.tags[names.TAG_LR_REDUCTIONS] == str(len(changes))

    # best checkpoint: info file, metric, tags agree with the per-epoch val_accuracy. A directory per new best, whole
    # (model and description), except a best that a newer one replaced while its upload waited (a store slower than
    # the epochs: docs/failures.md); the last new best always has its directory, and no other epoch has one.
    val_accuracy = [m.value for m in client.get_metric_history(run_id, names.VAL_ACCURACY)]
    best_epoch = int(np.argmax(val_accuracy))
    new_bests = [m.step for m in client.get_metric_history(run_id, names.BEST_VAL_ACCURACY)]
    pairs = {epoch: {f"{names.checkpoint_dir(epoch)}/{name}" for name in (names.BEST_MODEL_FILE,
                                                                           names.BEST_MODEL_INFO_FILE)}
             for epoch in new_bests}
    stored = {path for path in artifacts if path.startswith(f"{names.CHECKPOINT_DIR}/")}
    assert stored == set().union(*(pair for pair in pairs.values() if pair & stored)), (stored, new_bests)
    assert new_bests[-1] == best_epoch and pairs[best_epoch] <= stored, (stored, new_bests)
    assert run.data.tags[names.TAG_LATEST_CHECKPOINT] == names.checkpoint_file(best_epoch)
    info = json.loads((local / names.checkpoint_dir(best_epoch) / names.BEST_MODEL_INFO_FILE).read_text())
    assert info["epoch"] == best_epoch and info["val_accuracy"] == pytest.approx(val_accuracy[best_epoch])
    assert run.data.tags[names.TAG_BEST_EPOCH] == str(best_epoch)
    assert run.data.metrics[names.BEST_VAL_ACCURACY] == pytest.approx(max(val_accuracy))

    assert run.data.tags[names.TAG_STOP_REASON] in (
        names.STOP_COMPLETED, names.STOP_EARLY_STOPPING, names.STOP_TARGET_ACCURACY, names.STOP_PRUNED
    )
    assert run.data.tags[names.TAG_CALLBACKS] == callbacks
    assert run.data.tags[names.TAG_RUN_TYPE] == names.RUN_TYPE_TRAINING

    with open(local / names.TRAINING_LOG_FILE, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(row["epoch"]) for row in rows] == list(range(completed))
    assert {names.EPOCH_SECONDS, names.BATCH_MS_P95, "val_accuracy"} <= set(rows[0])
    assert "Total params" in (local / names.MODEL_SUMMARY_FILE).read_text()
    for plot in (names.TRAINING_CURVES_FILE, names.CONFUSION_MATRIX_FILE):
        assert (local / names.PLOTS_DIR / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((local / names.CLASSIFICATION_REPORT_FILE).read_text())
    assert set(report["3"]) == {"precision", "recall", "f1-score", "support"}
    assert report["accuracy"] == pytest.approx(run.data.metrics[names.TEST_ACCURACY], abs=1e-6)

    # dataset input: name, source, digest
    dataset = load_dataset(config.dataset)
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == dataset.name
    assert dataset_input.dataset.digest == dataset.digest == run.data.tags[names.TAG_DATASET_DIGEST]
    assert dataset.source in dataset_input.dataset.source

    # test metrics are the best checkpoint's, and the logged model predicts like the checkpoint
    checkpoint = keras.models.load_model(local / names.checkpoint_file(best_epoch))
    test_loss, test_accuracy = checkpoint.evaluate(dataset.x_test, dataset.y_test, verbose=0)
    assert run.data.metrics[names.TEST_ACCURACY] == pytest.approx(test_accuracy, abs=1e-6)
    assert run.data.metrics[names.TEST_LOSS] == pytest.approx(test_loss, rel=1e-5)
    # by the logged model's own URI, as README tells teammates (runs:/<id>/model gives the same model:
    # tests/test_s3_artifacts.py loads it from the S3-backed team server)
    model_id = logged_models_by_run(client, run.info.experiment_id, run_id)[run_id]
    model = mlflow.pyfunc.load_model(f"models:/{model_id}")
    probabilities = model.predict(dataset.x_test)
    assert probabilities.shape == (300, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probabilities, checkpoint.predict(dataset.x_test, verbose=0), atol=1e-6)
    assert model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 784)
    # requirements pinned to what trained the model, not inferred (inference adds every imported package)
    model_dir = mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(local / "model"))
    requirements = set(Path(model_dir, "requirements.txt").read_text().split())
    assert requirements == {f"{package}=={metadata.version(package)}" for package in MODEL_REQUIREMENTS}
