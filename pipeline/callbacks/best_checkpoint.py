"""BestCheckpoint: Keras' ModelCheckpoint of the best model, uploading each new best to the run."""

from __future__ import annotations

import json
import posixpath
import shutil
from pathlib import Path
from typing import Any

import keras
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.tracking.model_logging import checkpoint_model_writer, final_model_writer, save_checkpoint_template
from pipeline.tracking.recorder import RunRecorder, json_text
from pipeline.tracking.records import ModelRecord

# The run's metrics of a new best's epoch that its LoggedModel gets linked (model_id).
LINKED_METRICS = (*names.EPOCH_METRICS, names.BEST_VAL_ACCURACY)


class BestCheckpoint(keras.callbacks.ModelCheckpoint):
    """Saves the model whenever `val_accuracy` reaches a new best, and sends that file to the run.

    A `keras.callbacks.ModelCheckpoint` (mode max, best only, `.keras`); right after the parent has
    saved a new best it queues the file and its description as `checkpoints/epoch_<epoch>/
    best_model.keras` and `best_model.json`, and then, in the same unit, the tags `best_epoch` and
    `mlflow.latest_checkpoint_artifact` pointing at it (see `upload`); it adds `best_val_accuracy` to
    the epoch's logs for the epoch-metrics logger. Each new best is also queued as an MLflow model, a
    LoggedModel `checkpoint` of the run at step = its epoch, to which the run's metrics of that epoch
    are linked once they are queued (at the next epoch's begin, or the training's end). A NaN
    `val_accuracy` (see DivergenceGuard) is never a new best. After training, `log_final_model`
    makes the best one the run's model `model` and deletes its `checkpoint`: each set of weights is
    one LoggedModel; a training that never gets there keeps all its checkpoints.

    Args:
        filepath: the local `.keras` file.
        recorder: where new bests go; None keeps them local (a multi-worker training's other workers).

    Every fit starts afresh (`on_train_begin` resets `best`, `best_record` and `best_file`, as Keras'
    EarlyStopping resets its state); a resumed training gets them back from TrainingStateBackup, which
    comes later in the list.

    Attributes:
        best: the best `val_accuracy` of this fit (Keras' ModelCheckpoint's), -inf before the first.
        best_record: `{epoch, val_accuracy, val_loss}` of the best checkpoint, or None.
        best_file: the best checkpoint's bytes as saved (kept for the training state), or None.
        best_model: the best checkpoint's LoggedModel as queued (its `model_id` once created), or None.

    Example:
        checkpoint = BestCheckpoint("best.keras", recorder)
        model.fit(x, y, validation_data=(x_val, y_val), callbacks=[checkpoint])
        checkpoint.best_record["epoch"]
    """

    INITIAL_BEST = float("-inf")  # any finite val_accuracy is a new best

    def __init__(self, filepath: str | Path, recorder: RunRecorder | None = None) -> None:
        super().__init__(
            filepath=str(filepath), monitor=names.VAL_ACCURACY, mode="max", save_best_only=True,
            initial_value_threshold=self.INITIAL_BEST,
        )
        self.recorder = recorder
        self.best_record: dict[str, Any] | None = None
        self.best_file: bytes | None = None
        self.best_model: ModelRecord | None = None
        self._unlinked: ModelRecord | None = None  # a new best whose epoch's metrics are not queued yet
        self._template: tuple[Path, Path] | None = None  # the MLflow model checkpoints are made from

    @property
    def best_epoch(self) -> int | None:
        return self.best_record["epoch"] if self.best_record else None

    def on_train_begin(self, logs=None) -> None:
        super().on_train_begin(logs)
        self.best = self.INITIAL_BEST
        self.best_record = None
        self.best_file = None
        self.best_model = None
        self._unlinked = None
        if self.recorder is not None:
            self._checkpoint_template()  # before any checkpoint takes room on the local disk

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        super().on_epoch_begin(epoch, logs)
        self._link_metrics()

    def on_train_end(self, logs=None) -> None:
        super().on_train_end(logs)
        self._link_metrics()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        previous = self.best
        super().on_epoch_end(epoch, logs)
        if self.best == previous:
            return
        logs = logs if logs is not None else {}
        self.best_record = {
            "epoch": epoch,
            names.VAL_ACCURACY: float(logs[names.VAL_ACCURACY]),
            names.VAL_LOSS: float(logs[names.VAL_LOSS]),
        }
        logs[names.BEST_VAL_ACCURACY] = self.best_record[names.VAL_ACCURACY]
        if self.recorder is not None:
            self.best_file = Path(self.filepath).read_bytes()
            self.upload()

    def upload(self) -> None:
        """Queues the best checkpoint (from the bytes already read) and its description under the
        epoch's own directory, then the tags `best_epoch` and `mlflow.latest_checkpoint_artifact`
        naming it: the tags are written only once both files are stored, so whatever moment a kill
        comes, the tags point at a complete checkpoint and its description. A newer best replaces a
        waiting one (files and tags) as a whole."""
        if self.recorder is None or self.best_record is None or self.best_file is None:
            return
        epoch = self.best_record["epoch"]
        self.recorder.log_together(
            names.checkpoint_dir(epoch),
            {names.BEST_MODEL_FILE: self.best_file, names.BEST_MODEL_INFO_FILE: json_text(self.best_record).encode()},
            tags={names.TAG_BEST_EPOCH: epoch, names.TAG_LATEST_CHECKPOINT: names.checkpoint_file(epoch)},
            slot=names.CHECKPOINT_DIR,
        )
        template, keras_file = self._checkpoint_template()
        self.best_model = self._unlinked = self.recorder.log_model(
            names.CHECKPOINT_MODEL_NAME, epoch, checkpoint_model_writer(template, keras_file, self.best_file),
            tags={names.MODEL_TAG_EPOCH: epoch}, slot=names.CHECKPOINT_MODEL_NAME,
            reuse_existing=True,  # a resumed training's restored best may be in the run already
        )

    def log_final_model(self, saved: Path) -> ModelRecord | None:
        """Queues the best checkpoint, saved as the final MLflow model in `saved` (see
        `save_final_model`), as the run's LoggedModel `model`: output of the run at step = the best
        epoch, tag `epoch`, the run's params, that epoch's metrics linked; then the deletion of the
        LoggedModel `checkpoint` of that epoch, so that those weights are stored once. Returns the
        record (None without a recorder or a best)."""
        if self.recorder is None or self.best_record is None:
            return None
        epoch = self.best_record["epoch"]
        final = self.recorder.log_model(
            names.MODEL_NAME, epoch, final_model_writer(saved), tags={names.MODEL_TAG_EPOCH: epoch},
            slot=names.MODEL_NAME, copy_run_params=True,
        )
        self.recorder.link_model_metrics(final, LINKED_METRICS)
        if self.best_model is not None and self.best_model.step == epoch:
            self.recorder.delete_model(self.best_model)
        return final

    def _link_metrics(self) -> None:
        if self._unlinked is not None and self.recorder is not None:
            self.recorder.link_model_metrics(self._unlinked, LINKED_METRICS)
        self._unlinked = None

    def _checkpoint_template(self) -> tuple[Path, Path]:
        """The MLflow model directory each checkpoint's LoggedModel is made from, saved once per
        training (on the training thread: Keras), and its `.keras` file."""
        if self._template is None:
            directory = Path(self.filepath).parent / "checkpoint-model"
            shutil.rmtree(directory, ignore_errors=True)
            self._template = (directory, save_checkpoint_template(self.model, directory))
        return self._template


def download_best_checkpoint(client: MlflowClient, run_id: str, directory: Path) -> tuple[Path, dict[str, Any]]:
    """Downloads the best checkpoint the run's tag `mlflow.latest_checkpoint_artifact` points at, and
    its description, into `directory`; returns the `.keras` file and the description.

    Raises:
        LookupError: the run has no such tag (no best checkpoint reached the store, or the run was
            recorded before checkpoints had their own directories: `checkpoints/best_model.keras`).
    """
    pointer = client.get_run(run_id).data.tags.get(names.TAG_LATEST_CHECKPOINT)
    if pointer is None:
        raise LookupError(f"run {run_id} has no tag {names.TAG_LATEST_CHECKPOINT}")
    local = Path(client.download_artifacts(run_id, posixpath.dirname(pointer), str(directory)))
    info = json.loads((local / names.BEST_MODEL_INFO_FILE).read_text())
    return local / posixpath.basename(pointer), info
