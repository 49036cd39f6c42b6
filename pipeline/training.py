"""One training run, end to end: data, model, callbacks, fit, evaluation, and the MLflow record.

`run_training` is what every entry point calls. The order of work is fixed so that bad input fails
before an MLflow run is touched, and so that a run is only ever FINISHED with its whole record:

1. validate the data (a bad file raises DataError; no run exists yet);
2. open the run (the one `mlflow run` created, the given one, or a new one), log params and inputs;
3. fit with the callbacks of `pipeline.callbacks` (MlflowLogger records every epoch as it ends);
4. evaluate the best checkpoint on the test split, log the report, plots and the model;
5. wait for every queued record to reach the store, then mark the run FINISHED.

Any exception on the way ends the run FAILED.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from importlib import metadata
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow.environment_variables import MLFLOW_RUN_ID
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from pipeline import constants as names
from pipeline import reporting
from pipeline.callbacks import TrainingCallbacks, build_callbacks
from pipeline.config import TrainingConfig
from pipeline.data import NUM_CLASSES, NUM_PIXELS, ImageDataset, load_dataset, split_validation
from pipeline.errors import TrainingDiverged
from pipeline.model import build_model, model_summary
from pipeline.recorder import RunRecorder
from pipeline.tracking import check_tracking_store

logger = logging.getLogger(__name__)

# Seconds to wait, at the end, for queued records to reach the tracking store.
FLUSH_TIMEOUT_SECONDS = 120.0
MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_PIXELS))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
)
# The logged model's requirements, pinned to what trained it (no inference at log time).
MODEL_REQUIREMENTS = ("tensorflow", "keras", "mlflow", "numpy")


@dataclasses.dataclass(frozen=True)
class TrainingResult:
    """What the caller needs to report a finished training."""

    run_id: str
    experiment_id: str
    stop_reason: str
    epochs_completed: int
    best_epoch: int | None
    test_loss: float
    test_accuracy: float


def run_training(
    config: TrainingConfig,
    experiment_name: str | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
) -> TrainingResult:
    """Trains and records one run.

    Args:
        config: the validated parameters.
        experiment_name: where a new run goes (ignored when a run is given or MLFLOW_RUN_ID is set).
        run_id: an existing run to record into; by default the one in MLFLOW_RUN_ID (set by
            `mlflow run`) or a new one.
        parent_run_id: makes a new run the nested child of this run (a sweep's trials).

    Raises:
        TrackingUnavailable: the tracking server does not answer or refuses the credentials.
        UserInputError: bad data or parameters (before any training).
        TrainingDiverged: the loss became NaN/inf; the run is FAILED with stop_reason=nan_loss.
        RecordingError: training finished but part of the record could not be stored.
    """
    check_tracking_store()
    dataset = load_dataset(config.dataset)
    x_train, y_train, x_val, y_val = split_validation(dataset.x_train, dataset.y_train, config.validation_split)
    if experiment_name and not run_id and not os.environ.get(MLFLOW_RUN_ID.name):
        mlflow.set_experiment(experiment_name)
    with (
        mlflow.start_run(run_id=run_id, parent_run_id=parent_run_id) as run,
        tempfile.TemporaryDirectory(prefix="mnist-run-") as tmp,
    ):
        workdir = Path(tmp)
        run_id = run.info.run_id
        client = MlflowClient()
        keras.utils.set_random_seed(config.seed)
        model = build_model(config.layer_sizes, config.dropout, config.learning_rate)
        steps_per_epoch = -(-len(x_train) // config.batch_size)
        _log_run_header(client, run_id, config, dataset, model, len(x_train), len(x_val), steps_per_epoch)

        recorder = RunRecorder(client, run_id, workdir / "staging")
        callbacks = build_callbacks(config, workdir, recorder, len(x_train))
        recorder.set_tags({names.TAG_CALLBACKS: ",".join(callbacks.names)})
        recorder.log_file(_write(workdir / names.MODEL_SUMMARY_FILE, model_summary(model)))
        model.fit(
            x_train,
            y_train,
            batch_size=config.batch_size,
            epochs=config.epochs,
            validation_data=(x_val, y_val),
            callbacks=callbacks.ordered,
            verbose=0,
        )
        mlflow_logger = callbacks.mlflow_logger
        if callbacks.batch_timing.nan_at is not None:
            _record_divergence(recorder, callbacks)
        test_loss, test_accuracy = _evaluate_and_report(recorder, callbacks, dataset, workdir)
        recorder.close(timeout=FLUSH_TIMEOUT_SECONDS)
        return TrainingResult(
            run_id=run_id,
            experiment_id=run.info.experiment_id,
            stop_reason=mlflow_logger.stop_reason or names.STOP_COMPLETED,
            epochs_completed=len(mlflow_logger.history),
            best_epoch=mlflow_logger.best["epoch"] if mlflow_logger.best else None,
            test_loss=test_loss,
            test_accuracy=test_accuracy,
        )


def _log_run_header(
    client: MlflowClient,
    run_id: str,
    config: TrainingConfig,
    dataset: ImageDataset,
    model: keras.Model,
    train_size: int,
    val_size: int,
    steps_per_epoch: int,
) -> None:
    """Params, tags and the dataset input, before training starts (synchronously: a store that
    cannot take these should stop the run before any training)."""
    params = config.as_params() | {
        names.PARAM_TOTAL_PARAMETERS: str(model.count_params()),
        names.PARAM_TRAIN_SIZE: str(train_size),
        names.PARAM_VAL_SIZE: str(val_size),
        names.PARAM_TEST_SIZE: str(len(dataset.x_test)),
        names.PARAM_STEPS_PER_EPOCH: str(steps_per_epoch),
    }
    # `mlflow run` has already logged the entry point's parameters as the user typed them
    # ("1e-3"); MLflow refuses to change a param, so only the missing ones are added.
    existing = client.get_run(run_id).data.params
    mlflow.log_params({key: value for key, value in params.items() if key not in existing})
    mlflow.set_tags({names.TAG_RUN_TYPE: names.RUN_TYPE_TRAINING, names.TAG_DATASET_DIGEST: dataset.digest})
    mlflow.log_input(_mlflow_dataset(dataset), context=names.DATASET_CONTEXT_TRAINING)


def _mlflow_dataset(dataset: ImageDataset) -> mlflow.data.Dataset:
    import warnings

    from mlflow.data.http_dataset_source import HTTPDatasetSource

    source = HTTPDatasetSource(dataset.source) if dataset.source.startswith("http") else dataset.source
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that a path is ambiguous.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_numpy(
            dataset.x_train, targets=dataset.y_train, source=source, name=dataset.name, digest=dataset.digest
        )


def _record_divergence(recorder: RunRecorder, callbacks: TrainingCallbacks) -> None:
    """Delivers what the run holds (the last good checkpoint included) and raises TrainingDiverged."""
    epoch, batch = callbacks.batch_timing.nan_at
    recorder.set_tags({names.TAG_NAN_AT: f"epoch {epoch} batch {batch}"})
    recorder.close(timeout=FLUSH_TIMEOUT_SECONDS)
    best = callbacks.mlflow_logger.best
    kept = (
        f"the best checkpoint (epoch {best['epoch']}) is kept in the run as "
        f"{names.CHECKPOINT_DIR}/{names.BEST_MODEL_FILE}"
        if best
        else "no checkpoint was saved before it"
    )
    raise TrainingDiverged(
        f"training diverged: the loss became NaN/inf at epoch {epoch} batch {batch} "
        f"(try a lower learning_rate); {kept}"
    )


def _evaluate_and_report(
    recorder: RunRecorder, callbacks: TrainingCallbacks, dataset: ImageDataset, workdir: Path
) -> tuple[float, float]:
    """Evaluates the best checkpoint on the test split (as the seed does) and records the results."""
    best_model = keras.models.load_model(callbacks.checkpoint.filepath)
    test_loss, test_accuracy = best_model.evaluate(dataset.x_test, dataset.y_test, batch_size=1024, verbose=0)
    probabilities = best_model.predict(dataset.x_test, batch_size=1024, verbose=0)
    counts = reporting.confusion_matrix(dataset.y_test.argmax(axis=1), probabilities.argmax(axis=1))
    recorder.log_metrics({names.TEST_LOSS: test_loss, names.TEST_ACCURACY: test_accuracy}, step=0)
    recorder.log_json(reporting.classification_report(counts), names.CLASSIFICATION_REPORT_FILE)
    mlflow_logger = callbacks.mlflow_logger
    curves = workdir / names.TRAINING_CURVES_FILE
    best_epoch = mlflow_logger.best["epoch"] if mlflow_logger.best else None
    reporting.plot_training_curves(mlflow_logger.history, mlflow_logger.lr_changes, best_epoch, curves)
    recorder.log_file(curves, names.PLOTS_DIR)
    matrix = workdir / names.CONFUSION_MATRIX_FILE
    reporting.plot_confusion_matrix(counts, matrix)
    recorder.log_file(matrix, names.PLOTS_DIR)
    mlflow.tensorflow.log_model(
        best_model,
        name=names.MODEL_NAME,
        signature=MODEL_SIGNATURE,
        input_example=dataset.x_test[:5],
        pip_requirements=[f"{package}=={metadata.version(package)}" for package in MODEL_REQUIREMENTS],
    )
    logger.info("Test accuracy of the best checkpoint: %.4f (loss %.4f)", test_accuracy, test_loss)
    return float(test_loss), float(test_accuracy)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
