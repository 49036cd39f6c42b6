"""BatchTiming: the seed notebook's advanced callback's batch and epoch times."""

from __future__ import annotations

import time

import keras
import numpy as np

from pipeline import constants as names


def last_batch_of_call(batch: int, params: dict | None) -> int:
    """The index of the last batch a compiled call ran: Keras reports an epoch's last call with a full
    call's end index even when it runs fewer batches."""
    steps = (params or {}).get("steps")
    return min(batch, steps - 1) if steps else batch


class BatchTiming(keras.callbacks.Callback):
    """Times every training batch and each epoch, and adds the times to the epoch's logs.

    At each epoch end it adds to the logs (so CSVLogger and EpochMetricsLogger see them):
    `epoch_seconds` (epoch start to end, validation included), `batch_ms_mean`, `batch_ms_p95`
    and `samples_per_second` (training examples over the time spent in training batches). With
    `steps_per_execution=N` Keras calls the batch hooks once per compiled call; the call's time is
    then shared evenly among its batches.

    Args:
        batch_size: examples per batch, to turn batch counts into samples per second.
        num_samples: training examples per epoch.

    Example:
        timing = BatchTiming(batch_size=128, num_samples=len(x))
        history = model.fit(x, y, batch_size=128, callbacks=[timing])
        history.history["batch_ms_p95"]
    """

    def __init__(self, batch_size: int, num_samples: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_samples = num_samples
        self._epoch_start = 0.0
        self._batch_start = 0.0
        self._first_batch = 0
        self._batch_seconds: list[float] = []

    def on_train_begin(self, logs=None) -> None:
        self._epoch_start = self._batch_start = 0.0
        self._first_batch = 0
        self._batch_seconds = []

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._epoch_start = time.perf_counter()
        self._batch_seconds = []

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        self._first_batch = batch
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        batches = max(1, last_batch_of_call(batch, self.params) - self._first_batch + 1)
        self._batch_seconds.extend([(time.perf_counter() - self._batch_start) / batches] * batches)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if logs is None:
            return
        batch_ms = np.asarray(self._batch_seconds) * 1000.0
        train_seconds = float(np.sum(self._batch_seconds))
        samples = min(len(batch_ms) * self.batch_size, self.num_samples)
        logs[names.EPOCH_SECONDS] = time.perf_counter() - self._epoch_start
        logs[names.BATCH_MS_MEAN] = float(batch_ms.mean()) if batch_ms.size else 0.0
        logs[names.BATCH_MS_P95] = float(np.percentile(batch_ms, 95)) if batch_ms.size else 0.0
        logs[names.SAMPLES_PER_SECOND] = samples / train_seconds if train_seconds > 0 else 0.0
