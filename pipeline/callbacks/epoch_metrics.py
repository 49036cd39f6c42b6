"""EpochMetricsLogger: sends each completed epoch's metrics to the run."""

from __future__ import annotations

import math
from collections.abc import Mapping

import keras

from pipeline import constants as names
from pipeline.tracking.recorder import RunRecorder

# What an epoch records of its logs: the slowest worker only under a distributed strategy, the best
# validation accuracy only at an epoch that saved a new best checkpoint.
RECORDED_METRICS = (*names.EPOCH_METRICS, names.SLOWEST_WORKER_EPOCH_SECONDS, names.BEST_VAL_ACCURACY)


def recorded_metrics(logs: Mapping[str, float] | None) -> dict[str, float] | None:
    """The metrics an epoch records from its final logs; None for an epoch whose loss diverged."""
    logs = logs or {}
    if not math.isfinite(logs.get(names.LOSS, math.nan)):
        return None
    return {key: float(logs[key]) for key in RECORDED_METRICS if key in logs}


class EpochMetricsLogger(keras.callbacks.Callback):
    """Forwards each completed epoch's final logs (metrics and timing) to the run, in one batch with
    step = epoch. Last in the callback list, so that the logs are final: timing added, learning rate
    and best accuracy written. A diverged epoch (NaN or infinite loss) is not recorded.

    Args:
        recorder: delivers the metrics off the training thread.

    Example:
        model.fit(..., callbacks=[BatchTiming(128, len(x)), EpochMetricsLogger(recorder)])
    """

    def __init__(self, recorder: RunRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        metrics = recorded_metrics(logs)
        if metrics:
            self.recorder.log_metrics(metrics, step=epoch)
