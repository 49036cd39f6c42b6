"""WorkerTiming: every worker's epoch time, gathered so the chief can record the slowest."""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from pipeline import constants as names


class WorkerTiming(keras.callbacks.Callback):
    """Gathers each worker's epoch time at every epoch end and adds the slowest to the logs.

    A synchronous distributed training goes at the pace of its slowest worker, which the chief's own
    `epoch_seconds` does not show. Each worker times its epoch (BatchTiming's `epoch_seconds`, so
    this runs after BatchTiming); a collective gathers the times, and the maximum goes into the
    epoch's logs as `slowest_worker_epoch_seconds`, where EpochMetricsLogger (on the chief) finds it.
    Every worker must run this callback at the same point, or the collective would wait forever.

    Args:
        strategy: the training's tf.distribute strategy.
        num_workers: processes training together.

    Attributes:
        history: `{epoch, seconds}` per epoch of this fit, `seconds` being each worker's time in worker order.

    Example:
        timing = WorkerTiming(strategy, num_workers=2)
        model.fit(x, y, callbacks=[BatchTiming(128, len(x)), timing])
        timing.history[-1]["seconds"]
    """

    def __init__(self, strategy: tf.distribute.Strategy, num_workers: int) -> None:
        super().__init__()
        self.strategy = strategy
        self.num_workers = num_workers
        self.history: list[dict[str, object]] = []

    def on_train_begin(self, logs=None) -> None:
        self.history = []

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        own = float((logs or {}).get(names.EPOCH_SECONDS, math.nan))
        seconds = gather_per_worker(self.strategy, own, self.num_workers)  # always: the others wait for it
        self.history.append({"epoch": epoch, "seconds": seconds})
        if logs is not None:
            logs[names.SLOWEST_WORKER_EPOCH_SECONDS] = max(seconds)


def gather_per_worker(
    strategy: tf.distribute.Strategy, value: float, num_workers: int, dtype: tf.DType = tf.float32
) -> list[Any]:
    """Every worker's `value`, in worker order, through a collective (every worker must call it)."""
    per_replica = strategy.experimental_distribute_values_from_function(lambda _: tf.constant([value], dtype=dtype))
    gathered = strategy.gather(per_replica, axis=0).numpy()
    replicas_per_worker = strategy.num_replicas_in_sync // num_workers
    return gathered[::replicas_per_worker].tolist()
