"""TargetAccuracyStop: the seed notebook's custom callback."""

from __future__ import annotations

import logging

import keras

logger = logging.getLogger(__name__)


class TargetAccuracyStop(keras.callbacks.Callback):
    """Reports each epoch in one line and stops training once validation accuracy is reached.

    It is the seed's `CustomCallback`: the per-epoch console line and a target-accuracy stop.

    Args:
        target_accuracy: stop once `monitor` >= this value; 0 disables the stop.
        monitor: the metric compared with the target.

    Attributes:
        stopped_epoch: the epoch at which the target was reached, or None.
    """

    def __init__(self, target_accuracy: float, monitor: str = "val_accuracy") -> None:
        super().__init__()
        self.target_accuracy = target_accuracy
        self.monitor = monitor
        self.stopped_epoch: int | None = None

    def on_train_begin(self, logs=None) -> None:
        self.stopped_epoch = None
        if self.target_accuracy > 0:
            logger.info("Training; target %s: %.1f%%", self.monitor, 100 * self.target_accuracy)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        logs = logs or {}
        logger.info(
            "Epoch %d: loss=%.4f, accuracy=%.4f, val_loss=%.4f, val_accuracy=%.4f",
            epoch + 1,
            logs.get("loss", float("nan")),
            logs.get("accuracy", float("nan")),
            logs.get("val_loss", float("nan")),
            logs.get("val_accuracy", float("nan")),
        )
        current = logs.get(self.monitor)
        if self.target_accuracy > 0 and current is not None and current >= self.target_accuracy:
            logger.info(
                "Reached %s %.4f >= target %.4f; stopping.", self.monitor, current, self.target_accuracy
            )
            self.stopped_epoch = epoch
            self.model.stop_training = True
