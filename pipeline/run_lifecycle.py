"""What surrounds a training run: its MLflow status and header (params, tags, input), its private local
directory, local disk errors, and the end, when every record must reach the store or be kept locally."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.data import ImageDataset
from pipeline.errors import LocalStorageError, RecordingError, first_line
from pipeline.model_logging import remaining
from pipeline.recorder import RunRecorder
from pipeline.retry import retry

logger = logging.getLogger(__name__)

# OS errors that mean "the run's local files cannot be written", reported as LocalStorageError.
LOCAL_STORAGE_ERRORS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
)


def default_rescue_dir() -> Path:
    return Path.home() / ".cache" / "mnist-pipeline" / "unrecorded"


def _storage_error(directory: Path | str, error: OSError) -> LocalStorageError:
    return LocalStorageError(
        f"cannot write the run's local files in {directory} ({error.strerror or error}); "
        "free disk space or point TMPDIR at a writable disk"
    )


@contextlib.contextmanager
def local_workdir() -> Iterator[Path]:
    """The run's private temporary directory (checkpoints, CSV log, plots, upload staging), in TMPDIR
    when it is set: Python's `tempfile` quietly falls back to /tmp when TMPDIR cannot be written, which
    would put the run's files on a disk the user did not choose."""
    root = os.environ.get("TMPDIR") or tempfile.gettempdir()
    try:
        directory = tempfile.TemporaryDirectory(prefix="mnist-run-", dir=root)
    except OSError as error:
        raise _storage_error(root, error) from None
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
        raise _storage_error(workdir, error) from None


@contextlib.contextmanager
def mlflow_run(run_id: str | None, parent_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Like `mlflow.start_run()`, but an unreachable store at the end cannot hide the real outcome:
    the run is ended FINISHED only after a clean exit, FAILED (KILLED on Ctrl-C) otherwise, and a
    failure to say so is logged, not raised over the error that caused it."""
    run = mlflow.start_run(run_id=run_id, parent_run_id=parent_run_id)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            mlflow.end_run(status)
        except Exception as error:  # noqa: BLE001 - the store may be the thing that failed
            logger.warning("Could not mark run %s %s: %s", run.info.run_id, status, first_line(error, 160))


def log_run_header(client: MlflowClient, run_id: str, params: Mapping[str, str], dataset: ImageDataset) -> None:
    """Params, tags and the dataset input, before training starts (synchronously: a store that
    cannot take these should stop the run before any training)."""
    # `mlflow run` has already logged the entry point's parameters as the user typed them
    # ("1e-3"); MLflow refuses to change a param, so only the missing ones are added.
    existing = client.get_run(run_id).data.params
    mlflow.log_params({key: value for key, value in params.items() if key not in existing})
    mlflow.set_tags({names.TAG_RUN_TYPE: names.RUN_TYPE_TRAINING, names.TAG_DATASET_DIGEST: dataset.digest})
    # Runs starting together race to create the same dataset entity in the store; the loser gets an
    # integrity error (HTTP 500) once, and a retry finds the entity.
    input_dataset = _mlflow_dataset(dataset)
    retry(lambda: mlflow.log_input(input_dataset, context=names.DATASET_CONTEXT_TRAINING), attempts=3)


def _mlflow_dataset(dataset: ImageDataset) -> mlflow.data.Dataset:
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    source = HTTPDatasetSource(dataset.source) if dataset.source.startswith("http") else dataset.source
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that a path is ambiguous.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_numpy(
            dataset.x_train, targets=dataset.y_train, source=source, name=dataset.name, digest=dataset.digest
        )


def finish_recording(
    recorder: RunRecorder, workdir: Path, local_model: Path | None, deadline: float, rescue: Path
) -> None:
    """Waits for every record to reach the store. When the store does not come back in time, keeps
    local copies of the best checkpoint, the model and the unsent records, and raises RecordingError."""
    try:
        recorder.close(timeout=remaining(deadline))
        if local_model is not None:
            raise RecordingError(f"the model could not be logged as {names.MODEL_NAME}")
    except RecordingError as error:
        rescue.mkdir(parents=True, exist_ok=True)
        recorder.export_pending(rescue / "unsent")
        for name in (names.BEST_MODEL_FILE, names.TRAINING_LOG_FILE):
            if (workdir / name).exists():
                shutil.copyfile(workdir / name, rescue / name)
        if local_model is not None:
            shutil.copytree(local_model, rescue / names.MODEL_NAME, dirs_exist_ok=True)
        raise RecordingError(
            f"{error}; local copies of the best checkpoint, the model and the unsent records are in {rescue}"
        ) from None
