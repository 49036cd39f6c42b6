"""How a training ended, recorded once after `fit`: the stop reason, the epochs, the CSV log, and a divergence."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import constants as names
from pipeline.errors import LocalStorageError, RecordingError, TrainingDiverged, first_line
from pipeline.tracking.recorder import RunRecorder
from pipeline.tracking.run_lifecycle import keep_local_copies
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


def record_divergence(recorder: RunRecorder, callbacks: TrainingCallbacks, workdir: Path, flush_timeout: float) -> None:
    """Delivers what the run holds (the last good checkpoint included) and raises TrainingDiverged,
    whatever the store does: when it does not take everything within `flush_timeout`, the last good
    checkpoint and the unsent records are kept in the recorder's rescue directory, and the message
    says where."""
    epoch, batch = callbacks.divergence_guard.nan_at
    recorder.set_tags({names.TAG_NAN_AT: f"epoch {epoch} batch {batch}"})
    best = callbacks.checkpoint.best_record
    checkpoint = f"the best checkpoint (epoch {best['epoch']})" if best else None
    try:
        recorder.close(timeout=flush_timeout)
        kept = (
            f"{checkpoint} is kept in the run as {names.checkpoint_file(best['epoch'])}"
            if checkpoint
            else "no checkpoint was saved before it"
        )
    except (RecordingError, LocalStorageError) as error:
        kept = f"{error}; " + _keep_locally(recorder, workdir, checkpoint or "no checkpoint was saved before it")
    raise TrainingDiverged(
        f"training diverged: the loss became NaN/inf at epoch {epoch} batch {batch} "
        f"(try a lower learning_rate); {kept}"
    )


def _keep_locally(recorder: RunRecorder, workdir: Path, checkpoint: str) -> str:
    """Keeps the undelivered records and the last good checkpoint in the rescue directory; says where."""
    rescue = recorder.rescue_dir
    if rescue is None:
        return f"{checkpoint}; no local copy is kept"
    try:
        keep_local_copies(recorder, workdir, rescue)
    except OSError as error:
        return f"{checkpoint}; local copies could not be written to {rescue} ({first_line(error)})"
    return f"local copies of {checkpoint} and the unsent records are in {rescue}"
