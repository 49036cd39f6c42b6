"""TrainingStateBackup: the training's state in the run at every epoch end, put back on resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import keras

from pipeline import constants as names
from pipeline.callbacks.best_checkpoint import BestCheckpoint
from pipeline.callbacks.epoch_metrics import recorded_metrics
from pipeline.callbacks.lr_changes import LearningRateChanges
from pipeline.callbacks.target_accuracy import TargetAccuracyStop
from pipeline.tracking.recorder import RunRecorder
from pipeline.tracking.training_state import (
    TrainingState,
    monitor_state,
    optimizer_values,
    restore_model,
    restore_monitor_state,
)

# The counters of each carried callback that a resumed training must get back.
CARRIED_FIELDS = {
    "target_stop": ("stopped_epoch",),
    "checkpoint": ("best",),
    "early_stopping": ("wait", "best", "best_epoch", "stopped_epoch"),
    "reduce_lr": ("wait", "best", "cooldown_counter"),
}


@dataclasses.dataclass(frozen=True)
class CarriedCallbacks:
    """The callbacks whose state a resumed training needs back (a worker that records nothing has no
    LearningRateChanges)."""

    target_stop: TargetAccuracyStop
    checkpoint: BestCheckpoint
    early_stopping: keras.callbacks.EarlyStopping
    reduce_lr: keras.callbacks.ReduceLROnPlateau
    lr_changes: LearningRateChanges | None


class TrainingStateBackup(keras.callbacks.Callback):
    """Keras' `BackupAndRestore` for a run in MLflow: at each epoch end it queues the state a killed
    training needs to go on; at train begin it puts a saved state back.

    As `BackupAndRestore(double_checkpoint=True)` does, the run also keeps the state of the epoch
    before, so that a newest file left damaged (a kill in the middle of its upload to a store that
    writes in place) still leaves a state to continue from. The two are slots written in turn
    (`state/training_state_a.npz` for even epochs, `_b` for odd ones: `names.state_artifact`), so
    each epoch sends one state and the one before stays where it is.

    The state holds the model's weights and optimizer variables, the carried callbacks' counters
    (EarlyStopping's best weights too), the best checkpoint file, the LR changes, the per-epoch
    metrics and the CSV log. It must come after every carried callback and CSVLogger, so that its
    restore follows their own `on_train_begin` resets and its snapshot sees the epoch's final state,
    and before EpochMetricsLogger: whenever an epoch's metrics are in the run, a state covering that
    epoch is too. A diverged epoch is not saved.

    On a multi-worker training's other workers (no recorder) it only restores: the chief's state,
    which the chief sent them, so that every worker continues from the same weights and counters and
    stops at the same epoch.

    Args:
        recorder: delivers the state file off the training thread; None restores only.
        carried: the callbacks whose counters travel with the state.
        csv_log_path: the CSVLogger file.
        resume_from: the state to continue from, or None for a new training.

    Attributes:
        history: the recorded metrics of every completed epoch, restored ones included.

    Example:
        backup = TrainingStateBackup(recorder, carried, workdir / "training_log.csv", resume_from=state)
        model.fit(..., initial_epoch=state.epoch + 1, callbacks=[*others, backup, metrics_logger])
    """

    def __init__(
        self, recorder: RunRecorder | None, carried: CarriedCallbacks, csv_log_path: Path,
        resume_from: TrainingState | None = None,
    ) -> None:
        super().__init__()
        self.recorder = recorder
        self.carried = carried
        self.csv_log_path = Path(csv_log_path)
        self.resume_from = resume_from
        self.history: list[dict[str, float]] = []

    def on_train_begin(self, logs=None) -> None:
        self.history = []
        if self.resume_from is not None:
            self._restore(self.resume_from)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        metrics = recorded_metrics(logs)
        if metrics is None or self.recorder is None:
            return
        self.history.append(metrics)
        self.recorder.log_written(self._capture(epoch).save, names.state_artifact(epoch))

    def _capture(self, epoch: int) -> TrainingState:
        """A snapshot (arrays copied now, written by the recorder's thread)."""
        carried = self.carried
        record: dict[str, Any] = {
            role: monitor_state(getattr(carried, role), *fields) for role, fields in CARRIED_FIELDS.items()
        }
        record |= {
            "history": list(self.history),
            "lr_changes": list(carried.lr_changes.changes),
            "best": carried.checkpoint.best_record,
            "stopped": bool(self.model.stop_training),
        }
        return TrainingState(
            epoch=epoch,
            model_weights=self.model.get_weights(),
            optimizer_variables=optimizer_values(self.model),
            early_stopping_weights=carried.early_stopping.best_weights,
            best_checkpoint=carried.checkpoint.best_file,
            record=record,
            csv_log=self.csv_log_path.read_text() if self.csv_log_path.exists() else "",
        )

    def _restore(self, state: TrainingState) -> None:
        """Puts back what `_capture` took, after the carried callbacks' own resets."""
        restore_model(self.model, state)
        carried, record = self.carried, state.record
        for role in CARRIED_FIELDS:
            restore_monitor_state(getattr(carried, role), record[role])
        carried.early_stopping.best_weights = state.early_stopping_weights
        self.history = [dict(row) for row in record["history"]]
        if carried.lr_changes is not None:
            carried.lr_changes.changes = list(record["lr_changes"])
            carried.lr_changes.publish()
        carried.checkpoint.best_record = record["best"]
        carried.checkpoint.best_file = state.best_checkpoint
        carried.checkpoint.upload()  # the run may hold a newer file from an epoch that was lost
