"""One training run, end to end: data, model, callbacks, fit, evaluation, and the MLflow record.

`run_training` is what every entry point calls. The order of work is fixed so that bad input fails
before an MLflow run is touched, and so that a run is only ever FINISHED with its whole record:

1. ask the tracking server once (unreachable, or a wrong password, fails here in one line);
2. validate the data (a bad file raises DataError; the store is not touched yet);
3. decide whether a given run is new, to be resumed, or refused (`pipeline.tracking.resume`);
4. open the run (the one `mlflow run` created, the given one, or a new one), log params and inputs;
5. fit with the callbacks of `pipeline.training.callback_list` (each epoch is recorded as it ends);
6. evaluate the best checkpoint on the test split, log the report, plots and the model;
7. wait for every queued record to reach the store, then mark the run FINISHED.

Any exception on the way ends the run FAILED (KILLED on Ctrl-C). A sweep trial its pruner stopped ends
KILLED with its whole record (`stop_reason=pruned`).

With `strategy=multi_worker` every worker runs this, and only the chief does steps 2, 4 and 5: the
other workers train with the same callbacks minus the recording ones, in a private temporary directory,
and never touch the tracking store (see `pipeline.training.distribution`). Continuing a run (step 3
found a saved state), the chief sends that state to the other workers, so that all of them go on from
the same epoch, weights and counters (Keras' `BackupAndRestore`, with the run as the backup).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow.environment_variables import MLFLOW_RUN_ID
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.callbacks import TrialPruning
from pipeline.config import TrainingConfig
from pipeline.errors import TrainingDiverged
from pipeline.stop_request import raise_if_stop_requested
from pipeline.tracking.recorder import BEHIND_SECONDS, RunRecorder
from pipeline.tracking.resume import (
    ResumePoint,
    RunNotResumable,
    find_resume_point,
    resend_missing_metrics,
    trained_elsewhere,
)
from pipeline.tracking.run_lifecycle import (
    RunEnd,
    default_rescue_dir,
    finish_recording,
    local_storage_errors,
    local_workdir,
    mlflow_run,
)
from pipeline.tracking.run_owner import HEARTBEAT_TIMEOUT_SECONDS, RunHeartbeat
from pipeline.tracking.store import check_tracking_store, prepare_sqlite_store, use_experiment
from pipeline.tracking.training_state import TrainingState
from pipeline.training.callback_list import TrainingCallbacks, build_callbacks
from pipeline.training.data import ImageDataset, load_dataset, split_validation
from pipeline.training.distribution import PEER_TIMEOUT_SECONDS, Distribution, DistributionPlan, plan_distribution
from pipeline.training.evaluation import evaluate_and_report
from pipeline.training.model import build_model, model_summary
from pipeline.training.outcome import record_divergence, record_end_of_fit
from pipeline.training.run_header import log_run_header

logger = logging.getLogger(__name__)

# Seconds to wait, at the end, for queued records to reach the tracking store.
FLUSH_TIMEOUT_SECONDS = 120.0

Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_val, y_val


@dataclasses.dataclass(frozen=True)
class RunLimits:
    """How long a training waits for others, and where it keeps what it could not record.

    Args:
        flush_timeout: seconds to wait at the end for an unreachable tracking server to come back.
        rescue_dir: where the local copies go when it does not, one directory per run.
        peer_timeout: multi_worker: seconds to wait for the other workers to answer.
        heartbeat_timeout: seconds after its last heartbeat that a run's training process on another
            machine is taken as gone, so that the run may be resumed (`pipeline.tracking.run_owner`).
        behind_after: seconds a record may wait for the tracking server before the training says the
            server is behind (`pipeline.tracking.recorder`).
    """

    flush_timeout: float = FLUSH_TIMEOUT_SECONDS
    rescue_dir: Path = dataclasses.field(default_factory=default_rescue_dir)
    peer_timeout: float = PEER_TIMEOUT_SECONDS
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT_SECONDS
    behind_after: float = BEHIND_SECONDS


@dataclasses.dataclass(frozen=True)
class _Training:
    """What every step of the chief's training needs once its data and strategy are ready."""

    config: TrainingConfig
    dataset: ImageDataset
    splits: Splits
    distribution: Distribution
    workdir: Path
    pruning: TrialPruning | None


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
    limits: RunLimits | None = None,
    pruning: TrialPruning | None = None,
    continue_pruned: bool = False,
) -> TrainingResult | WorkerResult:
    """Trains and records one run, or continues a killed one; or, on a non-chief worker of a
    multi-worker training, trains its share without recording anything.

    Args:
        config: the validated parameters.
        experiment_name: where a new run goes (default: MLFLOW_EXPERIMENT_NAME, else `Default`; ignored
            when a run is given or MLFLOW_RUN_ID is set).
        run_id: an existing run to record into; by default the one in MLFLOW_RUN_ID (set by
            `mlflow run`), else a new one. A run that already holds a training of ours is resumed
            at its first unfinished epoch (see `pipeline.tracking.resume`).
        parent_run_id: makes a new run the nested child of this run (a sweep's trials).
        limits: timeouts and the rescue directory (default: `RunLimits()`).
        pruning: a sweep trial's pruning callback; a pruned training ends KILLED (its record whole) with
            stop_reason=pruned.
        continue_pruned: `run_id` may be a pruned sweep trial, to continue from its saved state (its sweep
            continues a trial it paused); otherwise such a run is refused.

    Raises:
        TrackingUnavailable: the tracking server does not answer or refuses the credentials.
        UserInputError: bad data, parameters or TF_CONFIG, or a run that cannot be resumed, before
            training.
        ClusterUnavailable: multi_worker: another worker did not answer, or was lost while training.
        TrainingDiverged: the loss became NaN/inf; the run is FAILED with stop_reason=nan_loss.
        LocalStorageError: the run's local files could not be written (disk full, unwritable TMPDIR).
        RecordingError: training finished but part of the record could not be stored.
    """
    limits = limits or RunLimits()
    plan = plan_distribution(config.strategy, os.environ)
    if not plan.is_chief:
        return _train_as_worker(config, plan, limits.peer_timeout)
    check_tracking_store(open_sqlite=False)
    dataset = load_dataset(config.dataset)  # bad data fails before the store is touched
    prepare_sqlite_store(mlflow.get_tracking_uri())  # a new SQLite store is created one process at a time
    client = MlflowClient()
    run_id = run_id or os.environ.get(MLFLOW_RUN_ID.name) or None
    resume = find_resume_point(client, run_id, config, limits.heartbeat_timeout, continue_pruned) if run_id else None
    if resume and resume.dataset_digest and resume.dataset_digest != dataset.digest:
        raise RunNotResumable(
            f"run {run_id} was trained on other data (digest {resume.dataset_digest}, "
            f"now {dataset.digest} from {dataset.source})"
        )
    splits = split_validation(dataset.x_train, dataset.y_train, config.validation_split)
    distribution = plan.start(config, dataset.digest, limits.peer_timeout)
    # multi_worker: the other workers continue from the chief's saved state (they never read the store)
    distribution.share_from_chief(resume.state.to_bytes() if resume and resume.state else None)
    heartbeat = None
    if run_id:  # an existing run: taken for this process before it is opened, or refused
        heartbeat = RunHeartbeat(client, run_id, limits.heartbeat_timeout)
        taken = heartbeat.claim()
        if taken is not None:
            raise RunNotResumable(trained_elsewhere(run_id, taken[1]))
    else:
        use_experiment(experiment_name, client)
    end = RunEnd()
    with (
        mlflow_run(run_id, parent_run_id, end) as run,
        heartbeat or RunHeartbeat(client, run.info.run_id, limits.heartbeat_timeout),
        local_workdir() as workdir,
        local_storage_errors(workdir),
    ):
        training = _Training(config, dataset, splits, distribution, workdir, pruning)
        result = _train_in_run(client, run, training, resume, limits)
        if result.stop_reason == names.STOP_PRUNED:
            end.status = "KILLED"  # the UI shows it stopped, not a green "Finished"; never registered
        return result


def _train_as_worker(config: TrainingConfig, plan: DistributionPlan, peer_timeout: float) -> WorkerResult:
    """A non-chief worker's share of a multi-worker training: the same model, data and stopping
    callbacks as the chief, files in a private temporary directory, nothing recorded; continuing a run,
    from the state the chief sends."""
    dataset = load_dataset(config.dataset)
    splits = split_validation(dataset.x_train, dataset.y_train, config.validation_split)
    distribution = plan.start(config, dataset.digest, peer_timeout)
    shared = distribution.share_from_chief(None)
    state = TrainingState.from_bytes(shared) if shared else None
    with local_workdir() as workdir, local_storage_errors(workdir):
        model = _build_model(config, distribution)
        callbacks = build_callbacks(config, workdir, None, len(splits[0]), state, distribution=distribution)
        initial_epoch = ResumePoint(state, dataset_digest=None).initial_epoch(config.epochs)
        history = _fit(model, config, distribution, splits, callbacks, initial_epoch=initial_epoch)
    if callbacks.divergence_guard.nan_at is not None:
        epoch, batch = callbacks.divergence_guard.nan_at
        raise TrainingDiverged(f"training diverged: the loss became NaN/inf at epoch {epoch} batch {batch}")
    return WorkerResult(distribution.worker_id, distribution.num_workers, epochs_completed=len(history.epoch))


def _build_model(config: TrainingConfig, distribution: Distribution) -> keras.Model:
    """The seeded, compiled model, its variables placed by the strategy (one batch per call under a
    strategy: Keras cannot run several per call on a distributed dataset; docs/scaling-out.md)."""
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
    splits: Splits,
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


def _train_in_run(
    client: MlflowClient, run: mlflow.ActiveRun, training: _Training, resume: ResumePoint | None, limits: RunLimits
) -> TrainingResult:
    config, workdir = training.config, training.workdir
    run_id = run.info.run_id
    model = _build_model(config, training.distribution)
    log_run_header(client, run_id, _run_params(training, model), training.dataset)

    with RunRecorder(client, run_id, workdir / "staging", rescue_dir=limits.rescue_dir / run_id,
                     behind_after=limits.behind_after) as recorder:
        state = resume.state if resume else None
        callbacks = build_callbacks(config, workdir, recorder, len(training.splits[0]), state, training.distribution)
        callbacks = dataclasses.replace(callbacks, trial_pruning=training.pruning)
        recorder.set_tags({names.TAG_CALLBACKS: ",".join(callbacks.names)})
        recorder.log_file(_write(workdir / names.MODEL_SUMMARY_FILE, model_summary(model)))
        initial_epoch = 0
        if resume is not None:
            initial_epoch = resume.initial_epoch(config.epochs)
            recorder.set_tags({names.TAG_RESUMED_FROM_EPOCH: initial_epoch})
            resent = resend_missing_metrics(client, recorder, state.record["history"]) if state else 0
            logger.info("Resuming run %s at epoch %d (%d metric values re-sent)", run_id, initial_epoch + 1, resent)
        fit_started = time.perf_counter()
        _fit(model, config, training.distribution, training.splits, callbacks, initial_epoch)
        fit_seconds = time.perf_counter() - fit_started
        raise_if_stop_requested()  # a stop whose KeyboardInterrupt was dropped (pipeline.stop_request)
        stop_reason = record_end_of_fit(recorder, callbacks, workdir)
        if stop_reason == names.STOP_NAN_LOSS:
            record_divergence(recorder, callbacks, workdir, limits.flush_timeout)
        # One deadline for everything after fit that may wait for an unreachable store.
        deadline = time.monotonic() + limits.flush_timeout
        test_loss, test_accuracy, local_model = evaluate_and_report(recorder, callbacks, training.dataset, workdir)
        raise_if_stop_requested()
        finish_recording(recorder, workdir, local_model, deadline, limits.rescue_dir / run_id)
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


def _run_params(training: _Training, model: keras.Model) -> dict[str, str]:
    """The run's params: every training parameter, and what follows from the data, model and strategy."""
    config, distribution = training.config, training.distribution
    train_size = len(training.splits[0])
    return config.as_params() | {
        names.PARAM_TOTAL_PARAMETERS: str(model.count_params()),
        names.PARAM_TRAIN_SIZE: str(train_size),
        names.PARAM_VAL_SIZE: str(len(training.splits[2])),
        names.PARAM_TEST_SIZE: str(len(training.dataset.x_test)),
        names.PARAM_STEPS_PER_EPOCH: str(-(-train_size // config.batch_size)),
        names.PARAM_NUM_REPLICAS: str(distribution.num_replicas),
        names.PARAM_NUM_WORKERS: str(distribution.num_workers),
    }


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
