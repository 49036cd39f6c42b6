"""StopRequestCheck: stops training by KeyboardInterrupt when the process was asked to stop."""

from __future__ import annotations

import keras

from pipeline.stop_request import raise_if_stop_requested


class StopRequestCheck(keras.callbacks.Callback):
    """Raises KeyboardInterrupt after a batch or an epoch when a signal asked this process to stop
    (`pipeline.stop_request`), in case the KeyboardInterrupt raised by the signal handler itself was
    dropped (raised inside a finalizer). Keras calls batch hooks once per compiled call, so with
    `steps_per_execution=N` the check runs every N batches. Put it last, so that an epoch that ended
    is recorded before the stop.

    Example:
        signal.signal(signal.SIGTERM, lambda *_: request_stop())
        model.fit(x, y, epochs=5, callbacks=[..., StopRequestCheck()])  # KeyboardInterrupt after a SIGTERM
    """

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        raise_if_stop_requested()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        raise_if_stop_requested()
