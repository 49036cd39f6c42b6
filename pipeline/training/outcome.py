"""How a training ended, recorded once after `fit`: the stop reason, the epochs, the CSV log, and a divergence."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import constants as names
from pipeline.errors import TrainingDiverged
from pipeline.tracking.recorder import RunRecorder
from pipeline.training.callback_list import TrainingCallbacks

logger = logging.getLogger(__name__)


def record_end_of_fit(recorder: RunRecorder, callbacks: TrainingCallbacks, workdir: Path) -> str:
    """Records how training ended (stop reason, epochs, the CSV log, the workers' times); returns
    the stop reason."""
    stop_reason = callbacks.stop_reason()
    epochs_completed = len(callbacks.backup.history)
    if stop_reason in (names.STOP_TARGET_ACCURACY, names.STOP_EARLY_STOPPING):
        logger.info("Epoch %d: stopping (%s)", epochs_completed, stop_reason)
    recorder.log_metrics({names.EPOCHS_COMPLETED: epochs_completed}, step=0)
    recorder.set_tags({names.TAG_STOP_REASON: stop_reason})
    csv_log = workdir / names.TRAINING_LOG_FILE
    if csv_log.exists():
        recorder.log_file(csv_log)
    if callbacks.worker_timing is not None:
        recorder.log_json(callbacks.worker_timing.history, names.WORKER_TIMING_FILE)
    return stop_reason


def record_divergence(recorder: RunRecorder, callbacks: TrainingCallbacks, flush_timeout: float) -> None:
    """Delivers what the run holds (the last good checkpoint included) and raises TrainingDiverged."""
    epoch, batch = callbacks.divergence_guard.nan_at
    recorder.set_tags({names.TAG_NAN_AT: f"epoch {epoch} batch {batch}"})
    recorder.close(timeout=flush_timeout)
    best = callbacks.checkpoint.best_record
    kept = (
        f"the best checkpoint (epoch {best['epoch']}) is kept in the run as "
        f"{names.CHECKPOINT_DIR}/{names.BEST_MODEL_FILE}"
        if best
        else "no checkpoint was saved before it"
    )
    raise TrainingDiverged(
        f"training diverged: the loss became NaN/inf at epoch {epoch} batch {batch} "
        f"(try a lower learning_rate); {kept}"
    )
