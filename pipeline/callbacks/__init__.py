"""The training callbacks, composed in one place and in one fixed order.

Keras calls callbacks in list order at every hook, and they share the epoch's `logs` dict, so the
order is part of the behaviour:

1. TargetAccuracyStop - the seed's custom callback: the epoch's console line and the target stop.
2. BatchTiming        - batch/epoch timing added to `logs`; the NaN guard. It runs before
                        ModelCheckpoint so that a diverged epoch is never saved as the best.
   WorkerTiming       - distributed trainings only: every worker's epoch time (from 2) gathered,
                        the slowest added to `logs`.
3. ModelCheckpoint    - saves the best model by val_accuracy (mode max, .keras).
4. EarlyStopping      - val_loss, best weights restored.
5. ReduceLROnPlateau  - val_loss; cuts the rate at the end of the epoch.
6. CSVLogger          - writes the epoch's row, timing columns included (added by 2).
7. MlflowLogger       - last, so it records each epoch's final state: a best checkpoint saved by 3,
                        a rate cut by 5, a stop decided by 1, 2 or 4, the CSV row, and the
                        resumable training state; and, on resume, it restores the counters of
                        3, 4 and 5 after their own `on_train_begin` has reset them.

In a multi-worker training only the chief records: the other workers run every callback but
MlflowLogger (with worker-local checkpoint and CSV files), so that they all stop at the same epoch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import tensorflow as tf

from pipeline import constants as names
from pipeline.callbacks.batch_timing import BatchTiming
from pipeline.callbacks.mlflow_logger import MlflowLogger
from pipeline.callbacks.target_accuracy import TargetAccuracyStop
from pipeline.callbacks.worker_timing import WorkerTiming
from pipeline.config import TrainingConfig
from pipeline.recorder import RunRecorder
from pipeline.training_state import TrainingState

__all__ = [
    "BatchTiming", "MlflowLogger", "TargetAccuracyStop", "TrainingCallbacks", "WorkerTiming", "build_callbacks"
]


@dataclasses.dataclass(frozen=True)
class TrainingCallbacks:
    """The callbacks of one training, by role; `ordered` is what goes to `model.fit` (without the
    roles a training does not have: None)."""

    target_stop: TargetAccuracyStop
    batch_timing: BatchTiming
    worker_timing: WorkerTiming | None
    checkpoint: keras.callbacks.ModelCheckpoint
    early_stopping: keras.callbacks.EarlyStopping
    reduce_lr: keras.callbacks.ReduceLROnPlateau
    csv_logger: keras.callbacks.CSVLogger
    mlflow_logger: MlflowLogger | None

    @property
    def ordered(self) -> list[keras.callbacks.Callback]:
        callbacks = (getattr(self, field.name) for field in dataclasses.fields(self))
        return [callback for callback in callbacks if callback is not None]

    @property
    def names(self) -> list[str]:
        return [type(callback).__name__ for callback in self.ordered]


def build_callbacks(
    config: TrainingConfig,
    workdir: Path,
    recorder: RunRecorder | None,
    num_train_samples: int,
    resume_from: TrainingState | None = None,
    strategy: tf.distribute.Strategy | None = None,
    num_workers: int = 1,
) -> TrainingCallbacks:
    """Builds the callbacks of one training.

    Args:
        config: the training parameters (patiences, factors, target).
        workdir: the run's private temporary directory (checkpoint and CSV log live there).
        recorder: where MlflowLogger sends its records; None on a worker that records nothing
            (a multi-worker training's non-chief workers): then there is no MlflowLogger.
        num_train_samples: training examples per epoch, for BatchTiming's throughput.
        resume_from: a saved state to continue from: its CSV log and best checkpoint are put back
            in `workdir` now; MlflowLogger restores the rest when training begins.
        strategy: the tf.distribute strategy of a distributed training (adds WorkerTiming), or None.
        num_workers: processes training together.
    """
    csv_path = workdir / names.TRAINING_LOG_FILE
    checkpoint_path = workdir / names.BEST_MODEL_FILE
    if resume_from is not None:
        csv_path.write_text(resume_from.csv_log)
        if resume_from.best_checkpoint is not None:
            checkpoint_path.write_bytes(resume_from.best_checkpoint)
    target_stop = TargetAccuracyStop(config.target_accuracy)
    batch_timing = BatchTiming(config.batch_size, num_train_samples)
    worker_timing = WorkerTiming(strategy, num_workers) if strategy is not None else None
    checkpoint = keras.callbacks.ModelCheckpoint(
        filepath=str(checkpoint_path),
        monitor=names.VAL_ACCURACY,
        mode="max",
        save_best_only=True,
        initial_value_threshold=float("-inf"),  # a NaN val_accuracy is never an improvement
    )
    early_stopping = keras.callbacks.EarlyStopping(
        monitor=names.VAL_LOSS, patience=config.es_patience, restore_best_weights=True
    )
    reduce_lr = keras.callbacks.ReduceLROnPlateau(
        monitor=names.VAL_LOSS, factor=config.lr_factor, patience=config.lr_patience, min_lr=config.min_lr
    )
    csv_logger = keras.callbacks.CSVLogger(str(csv_path), append=resume_from is not None)
    mlflow_logger = None if recorder is None else MlflowLogger(
        recorder,
        checkpoint=checkpoint,
        early_stopping=early_stopping,
        reduce_lr=reduce_lr,
        target_stop=target_stop,
        batch_timing=batch_timing,
        csv_log_path=csv_path,
        resume_from=resume_from,
    )
    return TrainingCallbacks(
        target_stop, batch_timing, worker_timing, checkpoint, early_stopping, reduce_lr, csv_logger, mlflow_logger
    )
