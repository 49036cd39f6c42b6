"""One training run, end to end: data, model, callbacks, fit, evaluation, and the MLflow record.

`run_training` is what every entry point calls. The order of work is fixed so that bad input fails
before an MLflow run is touched, and so that a run is only ever FINISHED with its whole record:

1. ask the tracking server once (unreachable, or a wrong password, fails here in one line);
2. validate the data (a bad file raises DataError; the store is not touched yet);
3. decide whether a given run is new, to be resumed, or refused (`pipeline.resume`);
4. open the run (the one `mlflow run` created, the given one, or a new one), log params and inputs;
5. fit with the callbacks of `pipeline.callbacks` (each epoch is recorded as it ends);
6. evaluate the best checkpoint on the test split, log the report, plots and the model;
7. wait for every queued record to reach the store, then mark the run FINISHED.

Any exception on the way ends the run FAILED (KILLED on Ctrl-C).

With `strategy=multi_worker` every worker runs this, and only the chief does steps 2, 4 and 5: the
other workers train with the same callbacks minus the recording ones, in a private temporary directory,
and never touch the tracking store (see `pipeline.distribution`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import tempfile
import time
import types
from collections.abc import Iterator
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
from pipeline.distribution import PEER_TIMEOUT_SECONDS, Distribution, DistributionPlan, plan_distribution
from pipeline.errors import LocalStorageError, RecordingError, TrainingDiverged, first_line
from pipeline.model import build_model, model_summary
from pipeline.plot_process import PlotProcess
from pipeline.recorder import RunRecorder, is_transient
from pipeline.resume import ResumePoint, RunNotResumable, find_resume_point, resend_missing_metrics
from pipeline.tracking import check_tracking_store, prepare_sqlite_store, use_experiment

logger = logging.getLogger(__name__)

# Seconds to wait, at the end, for queued records to reach the tracking store.
FLUSH_TIMEOUT_SECONDS = 120.0
# Pause between attempts to log the model while the store does not answer.
MODEL_RETRY_SECONDS = 2.0
# OS errors that mean "the run's local files cannot be written", reported as LocalStorageError.
LOCAL_STORAGE_ERRORS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
)

MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_PIXELS))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
)
# The logged model's requirements, pinned to what trained it (no inference at log time).
MODEL_REQUIREMENTS = ("tensorflow", "keras", "mlflow", "numpy")
# Test images per eager call of the model when evaluating (bounds the activations' memory).
PREDICT_CHUNK = 10_000


def _save_tensorflow_model(path: str, mlflow_model: mlflow.models.Model, validate_serving_input: bool = False,
                           **options: object) -> None:
    """`mlflow.tensorflow.save_model`, accepting the flag `Model.log` passes on to every flavor."""
    mlflow.tensorflow.save_model(path=path, mlflow_model=mlflow_model, **options)


# mlflow.tensorflow as a flavor for `mlflow.models.Model.log`, so that the model can be logged with
# validate_serving_input=False (which `mlflow.tensorflow.log_model` cannot pass on). MLflow's check
# loads the model it just saved and predicts its input example: 0.5 s of every run, for a model
# whose input is fixed by MODEL_SIGNATURE. The tests serve the logged model's input example instead
# (`mlflow.models.predict`, tests/test_training.py).
TENSORFLOW_FLAVOR_WITHOUT_SERVING_CHECK = types.SimpleNamespace(
    __name__="mlflow.tensorflow", save_model=_save_tensorflow_model
)


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


@dataclasses.dataclass(frozen=True)
class WorkerResult:
    """What a non-chief worker of a multi-worker training reports (the chief records the run)."""

    worker_id: int
    num_workers: int
    epochs_completed: int


def run_training(
    config: TrainingConfig,
    experiment_name: str | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    flush_timeout: float = FLUSH_TIMEOUT_SECONDS,
    rescue_dir: Path | None = None,
    peer_timeout: float = PEER_TIMEOUT_SECONDS,
) -> TrainingResult | WorkerResult:
    """Trains and records one run, or continues a killed one; or, on a non-chief worker of a
    multi-worker training, trains its share without recording anything.

    Args:
        config: the validated parameters.
        experiment_name: where a new run goes (default: MLFLOW_EXPERIMENT_NAME, else `Default`; ignored
            when a run is given or MLFLOW_RUN_ID is set).
        run_id: an existing run to record into; by default the one in MLFLOW_RUN_ID (set by
            `mlflow run`), else a new one. A run that already holds a training of ours is resumed
            at its first unfinished epoch (see `pipeline.resume`).
        flush_timeout: seconds to wait at the end for an unreachable tracking server to come back.
        rescue_dir: where the local copies go when it does not (default: `default_rescue_dir()`),
            one directory per run.
        parent_run_id: makes a new run the nested child of this run (a sweep's trials).
        peer_timeout: multi_worker: seconds to wait for the other workers to answer.

    Raises:
        TrackingUnavailable: the tracking server does not answer or refuses the credentials.
        UserInputError: bad data, parameters or TF_CONFIG, or a run that cannot be resumed (a
            multi-worker training is never resumed), before training.
        ClusterUnavailable: multi_worker: another worker did not answer, or was lost while training.
        TrainingDiverged: the loss became NaN/inf; the run is FAILED with stop_reason=nan_loss.
        LocalStorageError: the run's local files could not be written (disk full, unwritable TMPDIR).
        RecordingError: training finished but part of the record could not be stored.
    """
    plan = plan_distribution(config.strategy, os.environ)
    if not plan.is_chief:
        return _train_as_worker(config, plan, peer_timeout)
    check_tracking_store(open_sqlite=False)
    dataset = load_dataset(config.dataset)  # bad data fails before the store is touched
    prepare_sqlite_store(mlflow.get_tracking_uri())  # a new SQLite store is created one process at a time
    client = MlflowClient()
    run_id = run_id or os.environ.get(MLFLOW_RUN_ID.name) or None
    resume = find_resume_point(client, run_id, config) if run_id else None
    if resume is not None and plan.cluster is not None:
        raise RunNotResumable(
            f"run {run_id} cannot be resumed with strategy={config.strategy}: the workers cannot restore its "
            "saved state together; start a new run"
        )
    if resume and resume.dataset_digest and resume.dataset_digest != dataset.digest:
        raise RunNotResumable(
            f"run {run_id} was trained on other data (digest {resume.dataset_digest}, "
            f"now {dataset.digest} from {dataset.source})"
        )
    x_train, y_train, x_val, y_val = split_validation(dataset.x_train, dataset.y_train, config.validation_split)
    distribution = plan.start(config, dataset.digest, peer_timeout)
    if not run_id:
        use_experiment(experiment_name, client)
    with _mlflow_run(run_id, parent_run_id) as run, _local_workdir() as workdir, _local_storage_errors(workdir):
        return _train_in_run(
            client, run, config, dataset, (x_train, y_train, x_val, y_val), workdir, resume, flush_timeout,
            rescue_dir or default_rescue_dir(), distribution,
        )


def _train_as_worker(config: TrainingConfig, plan: DistributionPlan, peer_timeout: float) -> WorkerResult:
    """A non-chief worker's share of a multi-worker training: the same model, data and stopping
    callbacks as the chief, files in a private temporary directory, nothing recorded."""
    dataset = load_dataset(config.dataset)
    splits = split_validation(dataset.x_train, dataset.y_train, config.validation_split)
    distribution = plan.start(config, dataset.digest, peer_timeout)
    with _local_workdir() as workdir, _local_storage_errors(workdir):
        model = _build_model(config, distribution)
        callbacks = build_callbacks(config, workdir, None, len(splits[0]), distribution=distribution)
        history = _fit(model, config, distribution, splits, callbacks, initial_epoch=0)
    if callbacks.divergence_guard.nan_at is not None:
        epoch, batch = callbacks.divergence_guard.nan_at
        raise TrainingDiverged(f"training diverged: the loss became NaN/inf at epoch {epoch} batch {batch}")
    return WorkerResult(distribution.worker_id, distribution.num_workers, epochs_completed=len(history.epoch))


def _build_model(config: TrainingConfig, distribution: Distribution) -> keras.Model:
    """The seeded, compiled model, its variables placed by the strategy.

    Under a strategy it runs one batch per call: Keras 3.15 cannot run several batches per call on
    a distributed dataset (its loop asks the distributed iterator for the next batch inside the
    compiled call, which fails)."""
    keras.utils.set_random_seed(config.seed)
    steps_per_execution = config.steps_per_execution
    if distribution.strategy is not None and steps_per_execution > 1:
        logger.info("strategy=%s runs one batch per call (steps_per_execution=%d does not apply)",
                    config.strategy, steps_per_execution)
        steps_per_execution = 1
    with distribution.scope():
        return build_model(config.layer_sizes, config.dropout, config.learning_rate, steps_per_execution)


def _fit(
    model: keras.Model,
    config: TrainingConfig,
    distribution: Distribution,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    callbacks: TrainingCallbacks,
    initial_epoch: int,
) -> keras.callbacks.History:
    """`model.fit` on the data as the strategy wants it (arrays for the default one, sharded tf.data
    otherwise); a lost peer becomes one ClusterUnavailable line."""
    with distribution.peer_failures():
        return model.fit(
            **distribution.fit_inputs(splits, config.batch_size, config.seed),
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks.ordered,
            verbose=0,
        )


@contextlib.contextmanager
def _local_storage_errors(workdir: Path) -> Iterator[None]:
    """Disk errors on the run's local files (see LOCAL_STORAGE_ERRORS) become one LocalStorageError."""
    try:
        yield
    except OSError as error:
        if error.errno not in LOCAL_STORAGE_ERRORS:
            raise
        raise LocalStorageError(
            f"cannot write the run's local files in {workdir} ({error.strerror or error}); "
            "free disk space or point TMPDIR at a writable disk"
        ) from None


def _train_in_run(
    client: MlflowClient,
    run: mlflow.ActiveRun,
    config: TrainingConfig,
    dataset: ImageDataset,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    workdir: Path,
    resume: ResumePoint | None,
    flush_timeout: float,
    rescue_dir: Path,
    distribution: Distribution,
) -> TrainingResult:
    x_train, y_train, x_val, y_val = splits
    run_id = run.info.run_id
    model = _build_model(config, distribution)
    steps_per_epoch = -(-len(x_train) // config.batch_size)
    _log_run_header(client, run_id, config, dataset, model, len(x_train), len(x_val), steps_per_epoch, distribution)

    with RunRecorder(client, run_id, workdir / "staging") as recorder:
        state = resume.state if resume else None
        callbacks = build_callbacks(config, workdir, recorder, len(x_train), state, distribution)
        recorder.set_tags({names.TAG_CALLBACKS: ",".join(callbacks.names)})
        recorder.log_file(_write(workdir / names.MODEL_SUMMARY_FILE, model_summary(model)))
        initial_epoch = 0
        if resume is not None:
            initial_epoch = resume.initial_epoch(config.epochs)
            recorder.set_tags({names.TAG_RESUMED_FROM_EPOCH: initial_epoch})
            resent = resend_missing_metrics(client, recorder, state.record["history"]) if state else 0
            logger.info("Resuming run %s at epoch %d (%d metric values re-sent)", run_id, initial_epoch + 1, resent)
        fit_started = time.perf_counter()
        _fit(model, config, distribution, splits, callbacks, initial_epoch)
        fit_seconds = time.perf_counter() - fit_started
        stop_reason = _record_end_of_fit(recorder, callbacks, workdir)
        if stop_reason == names.STOP_NAN_LOSS:
            _record_divergence(recorder, callbacks, flush_timeout)
        # One deadline for everything after fit that may wait for an unreachable store.
        deadline = time.monotonic() + flush_timeout
        test_loss, test_accuracy, local_model = _evaluate_and_report(recorder, callbacks, dataset, workdir, deadline)
        _finish_recording(recorder, workdir, local_model, deadline, rescue_dir / run_id)
    after_fit_seconds = time.perf_counter() - fit_started - fit_seconds
    logger.info("Timing: fit %.2f s, after fit %.2f s", fit_seconds, after_fit_seconds)
    return TrainingResult(
        run_id=run_id,
        experiment_id=run.info.experiment_id,
        stop_reason=stop_reason,
        epochs_completed=len(callbacks.backup.history),
        best_epoch=callbacks.checkpoint.best_epoch,
        test_loss=test_loss,
        test_accuracy=test_accuracy,
    )


def default_rescue_dir() -> Path:
    """~/.cache/mnist-pipeline/unrecorded: local copies of runs the tracking store could not take."""
    return Path.home() / ".cache" / "mnist-pipeline" / "unrecorded"


@contextlib.contextmanager
def _local_workdir() -> Iterator[Path]:
    """The run's private temporary directory (checkpoints, CSV log, plots, upload staging), in TMPDIR
    when it is set: Python's `tempfile` quietly falls back to /tmp when TMPDIR cannot be written, which
    would put the run's files on a disk the user did not choose."""
    root = os.environ.get("TMPDIR") or tempfile.gettempdir()
    try:
        directory = tempfile.TemporaryDirectory(prefix="mnist-run-", dir=root)
    except OSError as error:
        raise LocalStorageError(
            f"cannot write the run's local files in {root} ({error.strerror or error}); "
            "free disk space or point TMPDIR at a writable disk"
        ) from None
    with directory as path:
        yield Path(path)


def _log_run_header(
    client: MlflowClient,
    run_id: str,
    config: TrainingConfig,
    dataset: ImageDataset,
    model: keras.Model,
    train_size: int,
    val_size: int,
    steps_per_epoch: int,
    distribution: Distribution,
) -> None:
    """Params, tags and the dataset input, before training starts (synchronously: a store that
    cannot take these should stop the run before any training)."""
    params = config.as_params() | {
        names.PARAM_TOTAL_PARAMETERS: str(model.count_params()),
        names.PARAM_TRAIN_SIZE: str(train_size),
        names.PARAM_VAL_SIZE: str(val_size),
        names.PARAM_TEST_SIZE: str(len(dataset.x_test)),
        names.PARAM_STEPS_PER_EPOCH: str(steps_per_epoch),
        names.PARAM_NUM_REPLICAS: str(distribution.num_replicas),
        names.PARAM_NUM_WORKERS: str(distribution.num_workers),
    }
    # `mlflow run` has already logged the entry point's parameters as the user typed them
    # ("1e-3"); MLflow refuses to change a param, so only the missing ones are added.
    existing = client.get_run(run_id).data.params
    mlflow.log_params({key: value for key, value in params.items() if key not in existing})
    mlflow.set_tags({names.TAG_RUN_TYPE: names.RUN_TYPE_TRAINING, names.TAG_DATASET_DIGEST: dataset.digest})
    _log_input_once(_mlflow_dataset(dataset))


def _log_input_once(dataset: mlflow.data.Dataset, attempts: int = 3) -> None:
    """Logs the dataset input. Runs starting together race to create the same dataset entity in
    the store and the loser gets an integrity error (HTTP 500) once; a retry finds the entity."""
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=names.DATASET_CONTEXT_TRAINING)
            return
        except Exception as error:  # noqa: BLE001 - only transient store errors are retried
            if not is_transient(error) or attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


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


def _record_end_of_fit(recorder: RunRecorder, callbacks: TrainingCallbacks, workdir: Path) -> str:
    """Records how training ended (stop reason, epochs, the CSV log, the workers' times); returns
    the stop reason."""
    stop_reason = callbacks.stop_reason()
    epochs_completed = len(callbacks.backup.history)
    if stop_reason in (names.STOP_TARGET_ACCURACY, names.STOP_EARLY_STOPPING):
        logger.info("Epoch %d: stopping (%s)", epochs_completed, stop_reason)
    recorder.log_metrics({names.EPOCHS_COMPLETED: epochs_completed}, step=0)
    recorder.set_tags({names.TAG_STOP_REASON: stop_reason})
    csv_log = workdir / names.TRAINING_LOG_FILE
    if csv_log.exists():
        recorder.log_file(csv_log)
    if callbacks.worker_timing is not None:
        recorder.log_json(callbacks.worker_timing.history, names.WORKER_TIMING_FILE)
    return stop_reason


def _record_divergence(recorder: RunRecorder, callbacks: TrainingCallbacks, flush_timeout: float) -> None:
    """Delivers what the run holds (the last good checkpoint included) and raises TrainingDiverged."""
    epoch, batch = callbacks.divergence_guard.nan_at
    recorder.set_tags({names.TAG_NAN_AT: f"epoch {epoch} batch {batch}"})
    recorder.close(timeout=flush_timeout)
    best = callbacks.checkpoint.best_record
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
    recorder: RunRecorder, callbacks: TrainingCallbacks, dataset: ImageDataset, workdir: Path, deadline: float
) -> tuple[float, float, Path | None]:
    """Evaluates the best checkpoint on the test split (as the seed does) and records the results.

    One prediction pass gives the loss, the accuracy and the confusion matrix. The plots are drawn by
    a PlotProcess on the other core meanwhile: the training curves while the checkpoint is
    evaluated, the confusion matrix while the model is logged. Returns test loss, test accuracy,
    and a local MLflow model directory when the tracking store could not take the model (None when
    it is logged in the run)."""
    curves, matrix = workdir / names.TRAINING_CURVES_FILE, workdir / names.CONFUSION_MATRIX_FILE
    with PlotProcess() as plotter:
        plotter.submit(
            "plot_training_curves", callbacks.backup.history, callbacks.lr_changes.changes,
            callbacks.checkpoint.best_epoch, curves,
        )
        best_model = keras.models.load_model(callbacks.checkpoint.filepath)
        probabilities = predict_probabilities(best_model, dataset.x_test)
        test_loss, test_accuracy = categorical_loss_and_accuracy(dataset.y_test, probabilities)
        counts = reporting.confusion_matrix(dataset.y_test.argmax(axis=1), probabilities.argmax(axis=1))
        recorder.log_metrics({names.TEST_LOSS: test_loss, names.TEST_ACCURACY: test_accuracy}, step=0)
        recorder.log_json(reporting.classification_report(counts), names.CLASSIFICATION_REPORT_FILE)
        logger.info("Test accuracy of the best checkpoint: %.4f (loss %.4f)", test_accuracy, test_loss)
        plotter.submit("plot_confusion_matrix", counts, matrix)
        local_model = _log_model(recorder, best_model, dataset.x_test[:5], workdir, deadline)
    recorder.log_file(curves, names.PLOTS_DIR)
    recorder.log_file(matrix, names.PLOTS_DIR)
    return test_loss, test_accuracy, local_model


def predict_probabilities(model: keras.Model, images: np.ndarray, chunk: int = PREDICT_CHUNK) -> np.ndarray:
    """The model's class probabilities for `images`, by calling it eagerly in chunks: for a model
    this small `model.predict` spends most of its time building its tf.function and data
    pipeline (0.4 s against 0.1 s for the 10,000 test images)."""
    chunks = [
        keras.ops.convert_to_numpy(model(images[start:start + chunk], training=False))
        for start in range(0, len(images), chunk)
    ]
    return np.concatenate(chunks) if chunks else np.empty((0, NUM_CLASSES), np.float32)


def categorical_loss_and_accuracy(one_hot: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """Keras' categorical cross-entropy (probabilities renormalized and clipped to [1e-7, 1 - 1e-7])
    and categorical accuracy, averaged over the examples, as `model.evaluate` reports them."""
    epsilon = np.float32(keras.config.epsilon())
    clipped = np.clip(probabilities / probabilities.sum(axis=1, keepdims=True), epsilon, 1 - epsilon)
    loss = float(np.mean(-np.sum(one_hot * np.log(clipped), axis=1)))
    accuracy = float(np.mean(one_hot.argmax(axis=1) == probabilities.argmax(axis=1)))
    return loss, accuracy


def _log_model(
    recorder: RunRecorder, model: keras.Model, input_example: np.ndarray, workdir: Path, deadline: float
) -> Path | None:
    """Logs the MLflow model `model`. While the store is unreachable it waits, until `deadline`
    (time.monotonic()), for the store to take the backlog and then the model; after that it saves
    the model locally instead and returns that directory (None when logged)."""
    options = {
        "signature": MODEL_SIGNATURE,
        "input_example": input_example,
        "pip_requirements": [f"{package}=={metadata.version(package)}" for package in MODEL_REQUIREMENTS],
    }
    while True:
        if recorder.in_outage:  # the backlog first: when it is delivered, the store is back
            recorder.wait_until_delivered(_remaining(deadline))
        if not recorder.in_outage:
            try:
                mlflow.models.Model.log(
                    artifact_path=None, name=names.MODEL_NAME, flavor=TENSORFLOW_FLAVOR_WITHOUT_SERVING_CHECK,
                    model=model, validate_serving_input=False, **options,
                )
                return None
            except Exception as error:  # noqa: BLE001 - only an unreachable store is handled here
                if not is_transient(error):
                    raise
                logger.warning("Could not log the model yet (%s)", first_line(error, 160))
        if time.monotonic() >= deadline:
            break
        time.sleep(min(MODEL_RETRY_SECONDS, _remaining(deadline)))
    logger.warning("The tracking store did not come back in time; keeping the model locally")
    local = workdir / names.MODEL_NAME
    mlflow.tensorflow.save_model(model, str(local), **options)
    return local


def _remaining(deadline: float) -> float:
    """Seconds left until `deadline` (time.monotonic()), never negative."""
    return max(0.0, deadline - time.monotonic())


def _finish_recording(
    recorder: RunRecorder, workdir: Path, local_model: Path | None, deadline: float, rescue: Path
) -> None:
    """Waits for every record to reach the store. When the store does not come back in time, keeps
    local copies of the best checkpoint, the model and the unsent records, and raises RecordingError."""
    try:
        recorder.close(timeout=_remaining(deadline))
        if local_model is not None:
            raise RecordingError(f"the model could not be logged as {names.MODEL_NAME}")
    except RecordingError as error:
        rescue.mkdir(parents=True, exist_ok=True)
        recorder.export_pending(rescue / "unsent")
        for name in (names.BEST_MODEL_FILE, names.TRAINING_LOG_FILE):
            if (workdir / name).exists():
                shutil.copyfile(workdir / name, rescue / name)
        if local_model is not None:
            shutil.copytree(local_model, rescue / names.MODEL_NAME, dirs_exist_ok=True)
        raise RecordingError(
            f"{error}; local copies of the best checkpoint, the model and the unsent records are in {rescue}"
        ) from None


@contextlib.contextmanager
def _mlflow_run(run_id: str | None, parent_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Like `mlflow.start_run()`, but an unreachable store at the end cannot hide the real outcome:
    the run is ended FINISHED only after a clean exit, FAILED (KILLED on Ctrl-C) otherwise, and a
    failure to say so is logged, not raised over the error that caused it."""
    run = mlflow.start_run(run_id=run_id, parent_run_id=parent_run_id)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            mlflow.end_run(status)
        except Exception as error:  # noqa: BLE001 - the store may be the thing that failed
            logger.warning("Could not mark run %s %s: %s", run.info.run_id, status, first_line(error, 160))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
