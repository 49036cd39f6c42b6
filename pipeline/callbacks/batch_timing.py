"""BatchTiming: the seed notebook's advanced callback (batch times and a NaN/inf loss guard)."""

from __future__ import annotations

import logging
import math
import time

import keras
import numpy as np

from pipeline import constants as names

logger = logging.getLogger(__name__)


class BatchTiming(keras.callbacks.Callback):
    """Times every training batch and each epoch, and stops at once on a NaN or infinite loss.

    At each epoch end it adds to the epoch's logs (so CSVLogger and MlflowLogger see them):
    `epoch_seconds` (epoch start to end, validation included), `batch_ms_mean`, `batch_ms_p95`
    and `samples_per_second` (training examples over the time spent in training batches).

    The guard checks the loss whenever Keras hands control back: after every batch, or, with a
    model compiled with `steps_per_execution=N`, after every N batches (Keras calls batch-level
    callbacks once per compiled call, with the index of its last batch). The epoch's running loss
    stays non-finite once one batch's loss was, so the guard sees it at the end of that call. A
    non-finite value sets `stop_training`, which Keras honours before the next call, so a diverged
    model never trains on. That epoch's `val_accuracy` is then set to NaN in the logs, so that no
    later callback (the best-model checkpoint in particular) can take the diverged weights for an
    improvement. Batch times are the call's time shared evenly among its batches.

    Args:
        batch_size: examples per batch, to turn batch counts into samples per second.
        num_samples: training examples per epoch.

    Attributes:
        nan_at: `(epoch, batch)`: the last batch of the call after which the loss was first found
            non-finite (the batch itself when batches are run one per call), or None.
    """

    def __init__(self, batch_size: int, num_samples: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.nan_at: tuple[int, int] | None = None
        self._epoch = 0
        self._epoch_start = 0.0
        self._batch_start = 0.0
        self._first_batch = 0
        self._steps: int | None = None
        self._batch_seconds: list[float] = []

    def on_train_begin(self, logs=None) -> None:
        self.nan_at = None
        self._steps = (self.params or {}).get("steps")

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._epoch = epoch
        self._epoch_start = time.perf_counter()
        self._batch_seconds = []

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        self._first_batch = batch
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        if self._steps:  # Keras gives an epoch's last call a full call's end index even when it runs fewer
            batch = min(batch, self._steps - 1)
        batches = max(1, batch - self._first_batch + 1)
        self._batch_seconds.extend([(time.perf_counter() - self._batch_start) / batches] * batches)
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.nan_at = (self._epoch, batch)
            where = f"batch {batch}" if batches == 1 else f"batches {self._first_batch}-{batch}"
            logger.error("Loss is %s at epoch %d, %s; stopping.", loss, self._epoch + 1, where)
            self.model.stop_training = True

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
        if self.nan_at is not None and self.nan_at[0] == epoch:
            logs[names.VAL_ACCURACY] = float("nan")
