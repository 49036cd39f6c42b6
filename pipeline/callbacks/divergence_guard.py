"""DivergenceGuard: stops training at once when the loss becomes NaN or infinite."""

from __future__ import annotations

import logging
import math

import keras

from pipeline import constants as names
from pipeline.callbacks.batch_timing import last_batch_of_call

logger = logging.getLogger(__name__)


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the end of the call in which the loss became NaN or infinite, and keeps the
    diverged epoch from counting as an improvement (the seed's AdvancedCallback guard).

    The loss is checked whenever Keras hands control back: after every batch, or after every N
    batches with `steps_per_execution=N` (Keras calls batch hooks once per compiled call). An epoch's
    running loss stays non-finite once one batch's was, so the call that diverged is the one seen.
    Unlike Keras' `TerminateOnNaN`, which prints and keeps no record, it remembers where it stopped
    and sets the diverged epoch's `val_accuracy` to NaN in the logs, so that a ModelCheckpoint later
    in the list never saves the diverged weights as a new best.

    Args:
        blocked_metric: the logs entry made NaN at the diverged epoch's end (what the checkpoint monitors).

    Attributes:
        nan_at: `(epoch, batch)`: the last batch of the call after which the loss was first found
            non-finite, or None.

    Example:
        guard = DivergenceGuard()
        model.fit(x, y, epochs=5, callbacks=[guard, keras.callbacks.ModelCheckpoint("best.keras")])
        if guard.nan_at is not None:
            print("diverged at epoch %d batch %d" % guard.nan_at)
    """

    def __init__(self, blocked_metric: str = names.VAL_ACCURACY) -> None:
        super().__init__()
        self.blocked_metric = blocked_metric
        self.nan_at: tuple[int, int] | None = None
        self._epoch = 0

    def on_train_begin(self, logs=None) -> None:
        self.nan_at = None
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        loss = (logs or {}).get(names.LOSS)
        if self.nan_at is None and loss is not None and not math.isfinite(loss):
            self.nan_at = (self._epoch, last_batch_of_call(batch, self.params))
            logger.error("Loss is %s at epoch %d, batch %d; stopping.", loss, self._epoch + 1, self.nan_at[1])
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if logs is not None and self.nan_at is not None and self.nan_at[0] == epoch:
            logs[self.blocked_metric] = float("nan")
