"""MlflowLogger: records each epoch's final state in the MLflow run, and puts it back on resume."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import keras

from pipeline import constants as names
from pipeline.callbacks.batch_timing import BatchTiming
from pipeline.callbacks.target_accuracy import TargetAccuracyStop
from pipeline.recorder import RunRecorder
from pipeline.training_state import (
    TrainingState,
    monitor_state,
    optimizer_values,
    restore_model,
    restore_monitor_state,
)

logger = logging.getLogger(__name__)

LR_CHANGE_CAUSE = "ReduceLROnPlateau(val_loss)"
# What an epoch records of its logs (the slowest worker only under a multi-worker strategy).
RECORDED_METRICS = (*names.EPOCH_METRICS, names.SLOWEST_WORKER_EPOCH_SECONDS)
# The counters of the Keras callbacks that a resumed training must get back.
EARLY_STOPPING_FIELDS = ("wait", "best", "best_epoch", "stopped_epoch")
REDUCE_LR_FIELDS = ("wait", "best", "cooldown_counter")
CHECKPOINT_FIELDS = ("best",)


def read_learning_rate(model: keras.Model) -> float:
    """The optimizer's current learning rate, rounded to float32 precision (0.001, not 0.00100000005)."""
    value = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    return float(f"{value:.7g}")


class MlflowLogger(keras.callbacks.Callback):
    """Sends each epoch's metrics, learning-rate changes, new best checkpoints, the stop decision
    and a resumable training state to MLflow, without making training wait for the tracking store.

    It must run after every other callback of the epoch: only then is the epoch's state final
    (ModelCheckpoint has saved a new best, ReduceLROnPlateau has cut the rate, EarlyStopping or the
    target stop has decided, CSVLogger has written its row). `pipeline.callbacks.build_callbacks`
    puts it last. For the same reason it is the one that restores a resumed training: its
    `on_train_begin` runs after the other callbacks have reset their counters.

    Each epoch's records are queued in this order: the new best checkpoint, the LR-change record,
    the training state, then the metrics and tags. The recorder delivers in order, so whenever a
    metric of epoch `e` is in the run, a state covering epoch `e` is too: a training killed at any
    moment resumes from that state and never logs an epoch twice.

    Args:
        recorder: delivers records to the run in order, off the training thread.
        checkpoint: the best-model ModelCheckpoint; a change of its `best` means a new best file.
        early_stopping: the EarlyStopping callback (stop reason, resumable counters).
        reduce_lr: the ReduceLROnPlateau callback (resumable counters).
        target_stop: the TargetAccuracyStop callback, to name the stop reason.
        batch_timing: the BatchTiming callback, for the NaN guard's verdict.
        csv_log_path: the CSVLogger file, uploaded when training ends.
        resume_from: the state to continue from, or None for a new training.

    Attributes:
        history: per completed epoch, the metrics sent (for plots and the summary).
        lr_changes: `{epoch, old_lr, new_lr, cause}` per change, as in `lr_changes.json`.
        best: `{epoch, val_accuracy, val_loss}` of the best checkpoint, or None.
        stop_reason: why training ended (a `names.STOP_*` value), set when it ends.
    """

    def __init__(
        self,
        recorder: RunRecorder,
        *,
        checkpoint: keras.callbacks.ModelCheckpoint,
        early_stopping: keras.callbacks.EarlyStopping,
        reduce_lr: keras.callbacks.ReduceLROnPlateau,
        target_stop: TargetAccuracyStop,
        batch_timing: BatchTiming,
        csv_log_path: Path,
        resume_from: TrainingState | None = None,
    ) -> None:
        super().__init__()
        self.recorder = recorder
        self.checkpoint = checkpoint
        self.early_stopping = early_stopping
        self.reduce_lr = reduce_lr
        self.target_stop = target_stop
        self.batch_timing = batch_timing
        self.csv_log_path = Path(csv_log_path)
        self.resume_from = resume_from
        self.history: list[dict[str, float]] = []
        self.lr_changes: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.stop_reason: str | None = None
        self._checkpoint_best = checkpoint.best
        self._best_checkpoint_bytes: bytes | None = None
        self._epoch_lr = 0.0

    @property
    def best_epoch(self) -> int | None:
        """The epoch of the best checkpoint, or None before there is one."""
        return self.best["epoch"] if self.best else None

    def on_train_begin(self, logs=None) -> None:
        if self.resume_from is not None:
            self._restore(self.resume_from)
        self.recorder.log_json(self.lr_changes, names.LR_CHANGES_FILE)
        self.recorder.set_tags({names.TAG_LR_REDUCTIONS: len(self.lr_changes)})

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._epoch_lr = read_learning_rate(self.model)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        logs = logs or {}
        if self.batch_timing.nan_at is not None:
            self.stop_reason = names.STOP_NAN_LOSS
            return  # the epoch did not complete: nothing of it is recorded, not even its state
        metrics = {key: float(logs[key]) for key in RECORDED_METRICS if key in logs}
        metrics[names.LEARNING_RATE] = self._epoch_lr
        tags: dict[str, object] = {}

        if self.checkpoint.best != self._checkpoint_best:
            self._checkpoint_best = self.checkpoint.best
            self.best = {
                "epoch": epoch,
                names.VAL_ACCURACY: metrics[names.VAL_ACCURACY],
                names.VAL_LOSS: metrics[names.VAL_LOSS],
            }
            metrics[names.BEST_VAL_ACCURACY] = metrics[names.VAL_ACCURACY]
            tags[names.TAG_BEST_EPOCH] = epoch
            self._best_checkpoint_bytes = Path(self.checkpoint.filepath).read_bytes()
            self._upload_best_checkpoint()

        new_lr = read_learning_rate(self.model)
        if not math.isclose(new_lr, self._epoch_lr, rel_tol=1e-6):
            self.lr_changes.append(
                {"epoch": epoch, "old_lr": self._epoch_lr, "new_lr": new_lr, "cause": LR_CHANGE_CAUSE}
            )
            logger.info("Epoch %d: learning rate %.3g -> %.3g (val_loss plateau)", epoch + 1, self._epoch_lr, new_lr)
            tags[names.TAG_LR_REDUCTIONS] = len(self.lr_changes)
            self.recorder.log_json(self.lr_changes, names.LR_CHANGES_FILE)

        self.history.append(metrics)
        if self.model.stop_training:
            self.stop_reason = self._stop_reason(epoch)
            logger.info("Epoch %d: stopping (%s)", epoch + 1, self.stop_reason)
        state = self._capture(epoch)
        self.recorder.log_written(state.save, f"{names.STATE_DIR}/{names.STATE_FILE}")
        self.recorder.log_metrics(metrics, step=epoch)
        if tags:
            self.recorder.set_tags(tags)

    def on_train_end(self, logs=None) -> None:
        if self.stop_reason is None:
            self.stop_reason = names.STOP_COMPLETED
        self.recorder.log_metrics({names.EPOCHS_COMPLETED: len(self.history)}, step=0)
        self.recorder.set_tags(
            {names.TAG_STOP_REASON: self.stop_reason, names.TAG_LR_REDUCTIONS: len(self.lr_changes)}
        )
        if self.csv_log_path.exists():
            self.recorder.log_file(self.csv_log_path)

    def _stop_reason(self, epoch: int) -> str:
        if self.target_stop.stopped_epoch == epoch:
            return names.STOP_TARGET_ACCURACY
        if self.early_stopping.stopped_epoch == epoch:
            return names.STOP_EARLY_STOPPING
        return names.STOP_COMPLETED

    def _upload_best_checkpoint(self) -> None:
        """Uploads the best checkpoint from the bytes already read (written out by the recorder's thread)."""
        data = self._best_checkpoint_bytes
        artifact_file = f"{names.CHECKPOINT_DIR}/{names.BEST_MODEL_FILE}"
        self.recorder.log_written(lambda path: path.write_bytes(data), artifact_file)
        self.recorder.log_json(self.best, f"{names.CHECKPOINT_DIR}/{names.BEST_MODEL_INFO_FILE}")

    def _capture(self, epoch: int) -> TrainingState:
        """A snapshot of everything a resumed training needs (arrays are copied now, written later)."""
        return TrainingState(
            epoch=epoch,
            model_weights=self.model.get_weights(),
            optimizer_variables=optimizer_values(self.model),
            early_stopping_weights=self.early_stopping.best_weights,
            best_checkpoint=self._best_checkpoint_bytes,
            record={
                "early_stopping": monitor_state(self.early_stopping, *EARLY_STOPPING_FIELDS),
                "reduce_lr": monitor_state(self.reduce_lr, *REDUCE_LR_FIELDS),
                "checkpoint": monitor_state(self.checkpoint, *CHECKPOINT_FIELDS),
                "history": list(self.history),
                "lr_changes": list(self.lr_changes),
                "best": self.best,
                "stop_reason": self.stop_reason,
            },
            csv_log=self.csv_log_path.read_text() if self.csv_log_path.exists() else "",
        )

    def _restore(self, state: TrainingState) -> None:
        """Puts back what `_capture` took, after the other callbacks' `on_train_begin` resets."""
        restore_model(self.model, state)
        record = state.record
        restore_monitor_state(self.early_stopping, record["early_stopping"])
        self.early_stopping.best_weights = state.early_stopping_weights
        restore_monitor_state(self.reduce_lr, record["reduce_lr"])
        restore_monitor_state(self.checkpoint, record["checkpoint"])
        self._checkpoint_best = self.checkpoint.best
        self.history = [dict(row) for row in record["history"]]
        self.lr_changes = list(record["lr_changes"])
        self.best = record["best"]
        self.stop_reason = record["stop_reason"]
        self._best_checkpoint_bytes = state.best_checkpoint
        if self.best is not None:
            self._upload_best_checkpoint()  # the run may hold a newer file from a lost epoch
