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

    The guard checks the loss after every batch: a non-finite value sets `stop_training`, which
    Keras honours before the next batch, so a diverged model never trains on. That epoch's
    `val_accuracy` is then set to NaN in the logs, so that no later callback (the best-model
    checkpoint in particular) can take the diverged weights for an improvement.

    Args:
        batch_size: examples per batch, to turn batch counts into samples per second.
        num_samples: training examples per epoch.

    Attributes:
        nan_at: `(epoch, batch)` where the loss first became non-finite, or None.
    """

    def __init__(self, batch_size: int, num_samples: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.nan_at: tuple[int, int] | None = None
        self._epoch = 0
        self._epoch_start = 0.0
        self._batch_start = 0.0
        self._batch_seconds: list[float] = []

    def on_train_begin(self, logs=None) -> None:
        self.nan_at = None

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._epoch = epoch
        self._epoch_start = time.perf_counter()
        self._batch_seconds = []

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        self._batch_seconds.append(time.perf_counter() - self._batch_start)
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.nan_at = (self._epoch, batch)
            logger.error("Loss is %s at epoch %d, batch %d; stopping.", loss, self._epoch + 1, batch)
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
