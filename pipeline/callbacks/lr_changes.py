"""LearningRateChanges: records every change of the learning rate made at an epoch's end."""

from __future__ import annotations

import logging
import math
from typing import Any

import keras

from pipeline import constants as names
from pipeline.tracking.recorder import RunRecorder

logger = logging.getLogger(__name__)

LR_CHANGE_CAUSE = "ReduceLROnPlateau(val_loss)"


def float32_precision(value: float) -> float:
    """A float32 value as it was meant (0.001, not 0.0010000000474974513)."""
    return float(f"{value:.7g}")


class LearningRateChanges(keras.callbacks.Callback):
    """Keeps and uploads `lr_changes.json`, one `{epoch, old_lr, new_lr, cause}` per change.

    Keras 3's ReduceLROnPlateau writes the rate used during the epoch to `logs["learning_rate"]`
    before it cuts the optimizer's rate, so this callback must come after it: it compares that value
    with the optimizer's rate after the epoch. It also rounds `logs["learning_rate"]` to float32's
    precision, as it is recorded. Without a `learning_rate` in the logs it records nothing.

    Args:
        recorder: where the file and the tag `lr_reductions` go, at the start and at each change.
        cause: what changes the rate, as written in each record.

    Attributes:
        changes: the changes so far, oldest first.

    Example:
        changes = LearningRateChanges(recorder)
        model.fit(..., callbacks=[keras.callbacks.ReduceLROnPlateau(), changes])
    """

    def __init__(self, recorder: RunRecorder, cause: str = LR_CHANGE_CAUSE) -> None:
        super().__init__()
        self.recorder = recorder
        self.cause = cause
        self.changes: list[dict[str, Any]] = []

    def on_train_begin(self, logs=None) -> None:
        self.changes = []
        self.publish()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if logs is None or names.LEARNING_RATE not in logs:
            return
        old_lr = logs[names.LEARNING_RATE] = float32_precision(logs[names.LEARNING_RATE])
        new_lr = float32_precision(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        if not math.isclose(new_lr, old_lr, rel_tol=1e-6):
            self.changes.append({"epoch": epoch, "old_lr": old_lr, "new_lr": new_lr, "cause": self.cause})
            logger.info("Epoch %d: learning rate %.3g -> %.3g (val_loss plateau)", epoch + 1, old_lr, new_lr)
            self.publish()

    def publish(self) -> None:
        """Queues the changes file and the tag `lr_reductions` (their count)."""
        self.recorder.log_json(self.changes, names.LR_CHANGES_FILE)
        self.recorder.set_tags({names.TAG_LR_REDUCTIONS: len(self.changes)})
