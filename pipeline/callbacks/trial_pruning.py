"""TrialPruning: a sweep trial's per-epoch progress to its pruner, and a clean stop when the pruner says so."""

from __future__ import annotations

import logging
import math
from typing import Protocol

import keras

logger = logging.getLogger(__name__)


class PrunableTrial(Protocol):
    """What the callback needs of a trial: an `optuna.Trial`."""

    def report(self, value: float, step: int) -> None: ...
    def should_prune(self) -> bool: ...


class TrialPruning(keras.callbacks.Callback):
    """Reports `monitor` to the trial at each epoch's end and stops training when the pruner says so.

    Unlike optuna-integration's Keras callback, which raises `TrialPruned` inside `fit`, it stops
    training the way EarlyStopping does, so a pruned trial still gets its whole record (evaluation,
    model) and the stop reason `pruned`. Like it, it warns when `monitor` is not in an epoch's logs
    (once a fit): the pruner cannot judge an epoch it never hears of. A NaN value (a diverged epoch,
    which DivergenceGuard stops) is skipped silently. A trial is never pruned at its last epoch (`fit`'s
    `epochs`): it trained fully, so it finishes and may be the best.

    Args:
        trial: the trial (its study's pruner decides).
        monitor: the per-epoch metric reported, e.g. `val_accuracy`.

    Attributes:
        pruned_epoch: the epoch after which the trial was pruned, or None.
        missing_epochs: the epochs of this fit whose logs had no `monitor`.

    Example:
    ```python
    def objective(trial):
        pruning = TrialPruning(trial)
        model.fit(x, y, validation_split=0.2, epochs=20, callbacks=[pruning])
        if pruning.pruned_epoch is not None:
            raise optuna.TrialPruned()
        ...
    ```
    """

    pruned_epoch: int | None = None  # reset by on_train_begin, set by on_epoch_end
    missing_epochs: int = 0  # reset by on_train_begin, counted by on_epoch_end

    def __init__(self, trial: PrunableTrial, monitor: str = "val_accuracy") -> None:
        super().__init__()
        self.trial, self.monitor = trial, monitor

    def on_train_begin(self, logs=None) -> None:
        self.pruned_epoch = None
        self.missing_epochs = 0

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            self.missing_epochs += 1
            if self.missing_epochs == 1:
                logger.warning("Epoch %d: the pruned metric %r is not in the epoch's logs; this trial cannot be "
                               "pruned at such epochs (check the metric name)", epoch + 1, self.monitor)
            return
        if not math.isfinite(value):
            return
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            if epoch + 1 >= (self.params or {}).get("epochs", math.inf):  # nothing left to save: it trained fully
                logger.info("Epoch %d: the pruner would stop this trial at its last epoch; it finishes", epoch + 1)
                return
            logger.info("Epoch %d: pruned (%s=%.4f; the study's pruner stops it)", epoch + 1, self.monitor, value)
            self.pruned_epoch = epoch
            self.model.stop_training = True
