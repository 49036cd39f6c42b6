"""What surrounds a training run: its MLflow status, its private local directory, local disk errors,
and the end, when every record must reach the store or be kept locally."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow

from pipeline import constants as names
from pipeline.errors import RecordingError, first_line
from pipeline.tracking.recorder import RunRecorder
from pipeline.tracking.retry import LOCAL_STORAGE_ERRORS, local_storage_error, remaining

logger = logging.getLogger(__name__)


def default_rescue_dir() -> Path:
    """Where a run's records go when the tracking store does not come back (one directory per run)."""
    return Path.home() / ".cache" / "mnist-pipeline" / "unrecorded"


@contextlib.contextmanager
def local_workdir() -> Iterator[Path]:
    """The run's private temporary directory (checkpoints, CSV log, plots, upload staging), in TMPDIR
    when it is set: Python's `tempfile` quietly falls back to /tmp when TMPDIR cannot be written, which
    would put the run's files on a disk the user did not choose."""
    root = os.environ.get("TMPDIR") or tempfile.gettempdir()
    try:
        directory = tempfile.TemporaryDirectory(prefix="mnist-run-", dir=root)
    except OSError as error:
        raise local_storage_error(root, error) from None
    with directory as path:
        yield Path(path)


@contextlib.contextmanager
def local_storage_errors(workdir: Path) -> Iterator[None]:
    """Disk errors on the run's local files (see LOCAL_STORAGE_ERRORS) become one LocalStorageError."""
    try:
        yield
    except OSError as error:
        if error.errno not in LOCAL_STORAGE_ERRORS:
            raise
        raise local_storage_error(workdir, error) from None


@dataclasses.dataclass
class RunEnd:
    """The status a run gets on a clean exit: FINISHED, unless its training says otherwise (a sweep
    trial its pruner stopped is KILLED: it has its whole record, but did not finish its training)."""

    status: str = "FINISHED"


@contextlib.contextmanager
def mlflow_run(
    run_id: str | None, parent_run_id: str | None = None, end: RunEnd | None = None
) -> Iterator[mlflow.ActiveRun]:
    """Like `mlflow.start_run()`, but an unreachable store at the end cannot hide the real outcome:
    the run is ended FINISHED (or `end.status`) only after a clean exit, FAILED (KILLED on Ctrl-C)
    otherwise, and a failure to say so is logged, not raised over the error that caused it. MLflow's
    system metrics (CPU, memory; GPU when present) are recorded while the run is open."""
    run = mlflow.start_run(run_id=run_id, parent_run_id=parent_run_id, log_system_metrics=True)
    status = "FAILED"
    try:
        yield run
        status = end.status if end is not None else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            mlflow.end_run(status)
        except Exception as error:  # noqa: BLE001 - the store may be the thing that failed
            logger.warning("Could not mark run %s %s: %s", run.info.run_id, status, first_line(error, 160))


def finish_recording(recorder: RunRecorder, workdir: Path, local_model: Path, deadline: float, rescue: Path) -> None:
    """Waits for every record (the model `model` among them) to reach the store. When the store does
    not come back in time, keeps local copies of the best checkpoint, the model (`local_model`, its
    local MLflow directory) and the unsent records, and raises RecordingError."""
    try:
        recorder.close(timeout=remaining(deadline))
    except RecordingError as error:
        keep_local_copies(recorder, workdir, rescue, local_model)
        raise RecordingError(
            f"{error}; local copies of the best checkpoint, the model and the unsent records are in {rescue}"
        ) from None


def keep_local_copies(recorder: RunRecorder, workdir: Path, rescue: Path, local_model: Path | None = None) -> None:
    """Copies what the store did not get into `rescue`: the unsent records (`unsent/`), the best
    checkpoint and the CSV log of the work directory (deleted on exit), and the model when given."""
    rescue.mkdir(parents=True, exist_ok=True)
    recorder.export_pending(rescue / "unsent")
    for name in (names.BEST_MODEL_FILE, names.TRAINING_LOG_FILE):
        if (workdir / name).exists():
            shutil.copyfile(workdir / name, rescue / name)
    if local_model is not None:
        shutil.copytree(local_model, rescue / names.MODEL_NAME, dirs_exist_ok=True)
