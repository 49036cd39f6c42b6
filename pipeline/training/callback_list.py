"""The callbacks of a training, composed in one place and in one fixed order.

Keras calls callbacks in list order at every hook, and they share the epoch's `logs` dict, so the
order is part of the behaviour:

1. TargetAccuracyStop  - the seed's custom callback: the epoch's console line and the target stop.
2. DivergenceGuard     - stops on a NaN/inf loss; before the checkpoint, so that a diverged epoch
                         is never saved as the best.
3. BatchTiming         - batch and epoch times into the logs.
   WorkerTiming        - distributed trainings only: every worker's epoch time (from 3) gathered,
                         the slowest added to the logs.
4. BestCheckpoint      - Keras' ModelCheckpoint (best val_accuracy), uploading each new best.
5. EarlyStopping       - val_loss, best weights restored.
6. ReduceLROnPlateau   - val_loss; writes the epoch's rate to the logs, then cuts it.
7. LearningRateChanges - after 6, the only place the rate used and the rate cut are both visible.
8. CSVLogger           - the epoch's row, timing columns included (added by 3).
9. TrainingStateBackup - after 1-8: restores their counters after their own resets, and saves the
                         epoch's final state; before 10, so a state covers every recorded epoch.
10. EpochMetricsLogger - the epoch's final logs to the run.
11. TrialPruning       - sweep trials only: the epoch's validation metric to the pruner, which may stop
                         training after the epoch is recorded.
12. StopRequestCheck   - a stop asked for by Ctrl-C or SIGTERM whose KeyboardInterrupt was dropped
                         (pipeline.stop_request): raised again after the batch, or after the epoch is
                         recorded.

In a multi-worker training only the chief records: the other workers run 1-6, 8 and 12 (with
worker-local checkpoint and CSV files), so that they all stop at the same epoch; continuing a run,
they also run 9, which then only puts back the state the chief sent them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras

from pipeline import constants as names
from pipeline.callbacks import (
    BatchTiming,
    BestCheckpoint,
    CarriedCallbacks,
    DivergenceGuard,
    EpochMetricsLogger,
    LearningRateChanges,
    StopRequestCheck,
    TargetAccuracyStop,
    TrainingStateBackup,
    TrialPruning,
    WorkerTiming,
)
from pipeline.config import TrainingConfig
from pipeline.tracking.recorder import RunRecorder
from pipeline.tracking.training_state import TrainingState
from pipeline.training.distribution import Distribution


@dataclasses.dataclass(frozen=True)
class TrainingCallbacks:
    """The callbacks of one training, by role, in their order; `ordered` is what goes to `model.fit`
    (without the roles a training does not have: None)."""

    target_stop: TargetAccuracyStop
    divergence_guard: DivergenceGuard
    batch_timing: BatchTiming
    worker_timing: WorkerTiming | None
    checkpoint: BestCheckpoint
    early_stopping: keras.callbacks.EarlyStopping
    reduce_lr: keras.callbacks.ReduceLROnPlateau
    lr_changes: LearningRateChanges | None
    csv_logger: keras.callbacks.CSVLogger
    backup: TrainingStateBackup | None
    epoch_metrics: EpochMetricsLogger | None
    trial_pruning: TrialPruning | None = None
    stop_check: StopRequestCheck = dataclasses.field(default_factory=StopRequestCheck)

    @property
    def ordered(self) -> list[keras.callbacks.Callback]:
        callbacks = (getattr(self, field.name) for field in dataclasses.fields(self))
        return [callback for callback in callbacks if callback is not None]

    @property
    def names(self) -> list[str]:
        return [type(callback).__name__ for callback in self.ordered]

    def stop_reason(self) -> str:
        """Why training ended, from the callbacks' own state after `fit` (a `names.STOP_*` value)."""
        if self.divergence_guard.nan_at is not None:
            return names.STOP_NAN_LOSS
        if self.target_stop.stopped_epoch is not None:
            return names.STOP_TARGET_ACCURACY
        if self.trial_pruning is not None and self.trial_pruning.pruned_epoch is not None:
            return names.STOP_PRUNED
        if self.early_stopping.stopped_epoch > 0:
            return names.STOP_EARLY_STOPPING
        return names.STOP_COMPLETED


def build_callbacks(
    config: TrainingConfig,
    workdir: Path,
    recorder: RunRecorder | None,
    num_train_samples: int,
    resume_from: TrainingState | None = None,
    distribution: Distribution | None = None,
) -> TrainingCallbacks:
    """Builds the callbacks of one training.

    Args:
        config: the training parameters (patiences, factors, target).
        workdir: the run's private temporary directory (checkpoint and CSV log live there).
        recorder: where the recording callbacks send their records; None on a worker that records
            nothing (a multi-worker training's non-chief workers): then there are none.
        num_train_samples: training examples per epoch, for BatchTiming's throughput.
        resume_from: a saved state to continue from: its CSV log and best checkpoint are put back
            in `workdir` now; TrainingStateBackup restores the rest when training begins (also on a
            worker that records nothing).
        distribution: how training is spread; a tf.distribute strategy adds WorkerTiming.
    """
    csv_path = workdir / names.TRAINING_LOG_FILE
    checkpoint_path = workdir / names.BEST_MODEL_FILE
    if resume_from is not None:
        csv_path.write_text(resume_from.csv_log)
        if resume_from.best_checkpoint is not None:
            checkpoint_path.write_bytes(resume_from.best_checkpoint)
    target_stop = TargetAccuracyStop(config.target_accuracy)
    checkpoint = BestCheckpoint(checkpoint_path, recorder)
    early_stopping = keras.callbacks.EarlyStopping(
        monitor=names.VAL_LOSS, patience=config.es_patience, restore_best_weights=True
    )
    reduce_lr = keras.callbacks.ReduceLROnPlateau(
        monitor=names.VAL_LOSS, factor=config.lr_factor, patience=config.lr_patience, min_lr=config.min_lr
    )
    lr_changes = backup = epoch_metrics = None
    if recorder is not None:
        lr_changes = LearningRateChanges(recorder)
        epoch_metrics = EpochMetricsLogger(recorder)
    if recorder is not None or resume_from is not None:  # a worker that records nothing only restores
        carried = CarriedCallbacks(target_stop, checkpoint, early_stopping, reduce_lr, lr_changes)
        backup = TrainingStateBackup(recorder, carried, csv_path, resume_from)
    return TrainingCallbacks(
        target_stop=target_stop,
        divergence_guard=DivergenceGuard(),
        batch_timing=BatchTiming(config.batch_size, num_train_samples),
        worker_timing=None if distribution is None or distribution.strategy is None
        else WorkerTiming(distribution.strategy, distribution.num_workers),
        checkpoint=checkpoint,
        early_stopping=early_stopping,
        reduce_lr=reduce_lr,
        lr_changes=lr_changes,
        csv_logger=keras.callbacks.CSVLogger(str(csv_path), append=resume_from is not None),
        backup=backup,
        epoch_metrics=epoch_metrics,
    )
