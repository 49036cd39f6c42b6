"""The trained model as an MLflow model: logged in the run, or kept locally while the store is away."""

from __future__ import annotations

import logging
import os
import shutil
import time
import types
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow.entities import LoggedModel
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.types import Schema, TensorSpec

from pipeline import constants as names
from pipeline.constants import NUM_CLASSES, NUM_PIXELS
from pipeline.errors import first_line
from pipeline.tracking import silent_keras_pyfunc
from pipeline.tracking.recorder import RunRecorder
from pipeline.tracking.retry import STORE_BACKOFF, is_transient, remaining

logger = logging.getLogger(__name__)

MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_PIXELS))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
)
# The logged model's requirements, pinned to what trained it (no inference at log time).
MODEL_REQUIREMENTS = ("tensorflow", "keras", "mlflow", "numpy")


def pinned_requirements() -> list[str]:
    return [f"{package}=={metadata.version(package)}" for package in MODEL_REQUIREMENTS]


# The pyfunc loader shipped in the model (code/silent_keras_pyfunc.py): predictions print nothing.
SILENT_LOADER_FILE = Path(silent_keras_pyfunc.__file__)
SILENT_LOADER_MODULE = SILENT_LOADER_FILE.stem


def save_model(model: keras.Model, path: str, mlflow_model: Model | None = None, validate_serving_input: bool = False,
               **options: object) -> None:
    """`mlflow.tensorflow.save_model` of `model`, with the silent pyfunc loader.

    The `tensorflow` flavor stays MLflow's (`mlflow.tensorflow.load_model` gives the checkpoint as trained,
    optimizer state and compile settings included); the `python_function` flavor (pyfunc,
    `mlflow models predict/serve`) loads it with silent_keras_pyfunc: uncompiled, printing nothing.
    Accepts the `validate_serving_input` flag `Model.log` passes on.
    """
    mlflow_model = mlflow_model or Model()
    mlflow.tensorflow.save_model(model, path=path, mlflow_model=mlflow_model,
                                 code_paths=[str(SILENT_LOADER_FILE)], **options)
    mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME][mlflow.pyfunc.MAIN] = SILENT_LOADER_MODULE
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


# mlflow.tensorflow as a flavor for `mlflow.models.Model.log`, so that the model can be logged with
# validate_serving_input=False, which `mlflow.tensorflow.log_model` cannot pass on: MLflow's check
# loads the model it just saved to predict its input example (bench/RESULTS.md, "What each speed
# trick buys"). `Model.log` takes the flavor's module and calls its `save_model`;
# tests/test_model_logging.py fails first if an MLflow upgrade changes that.
TENSORFLOW_FLAVOR_WITHOUT_SERVING_CHECK = types.SimpleNamespace(
    __name__="mlflow.tensorflow", save_model=save_model
)


def log_model(recorder: RunRecorder, model: keras.Model, input_example: np.ndarray, workdir: Path,
              deadline: float) -> Path | None:
    """Logs `model` as the MLflow model `model` of the run, on the calling thread (a model made outside a
    training: the benches and tests; a training's `model` is its best checkpoint, sent by its recorder:
    `BestCheckpoint.log_final_model`). While the store is unreachable it waits,
    until `deadline` (time.monotonic()), for the store to take the backlog and then the model; after
    that it saves the model locally instead and returns that directory (None when logged)."""
    options = {
        "signature": MODEL_SIGNATURE,
        "input_example": input_example,
        "pip_requirements": pinned_requirements(),
    }
    pauses = STORE_BACKOFF.pauses()
    while True:
        if recorder.in_outage:  # the backlog first: when it is delivered, the store is back
            recorder.wait_until_delivered(remaining(deadline))
        if not recorder.in_outage:
            try:
                mlflow.models.Model.log(
                    artifact_path=None, name=names.MODEL_NAME, flavor=TENSORFLOW_FLAVOR_WITHOUT_SERVING_CHECK,
                    model=model, validate_serving_input=False, **options,
                )
                return None
            except Exception as error:  # noqa: BLE001 - only an unreachable store is handled here
                if not is_transient(error):
                    raise
                logger.warning("Could not log the model yet (%s)", first_line(error, 160))
        if time.monotonic() >= deadline:
            break
        time.sleep(min(next(pauses), remaining(deadline)))
    logger.warning("The tracking store did not come back in time; keeping the model locally")
    local = workdir / names.MODEL_NAME
    save_model(model, str(local), **options)
    return local


def save_checkpoint_template(model: keras.Model, directory: Path) -> Path:
    """Saves `model` as the MLflow model every checkpoint's LoggedModel is made from (see
    `checkpoint_model_writer`): the same flavors, signature and pinned requirements as the final
    model, without an input example. Returns where its `.keras` file goes, which each checkpoint
    fills: the template keeps no model file (no second copy of the model on the local disk). A local
    disk error is raised as the OSError it is (MLflow wraps some in an MlflowException)."""
    try:
        save_model(model, str(directory), signature=MODEL_SIGNATURE, pip_requirements=pinned_requirements())
    except mlflow.exceptions.MlflowException as error:
        if isinstance(error.__cause__, OSError):
            raise error.__cause__ from None
        raise
    [keras_file] = directory.rglob("*.keras")
    keras_file.unlink()
    return keras_file


def checkpoint_model_writer(template: Path, keras_file: Path, checkpoint: bytes) -> Callable[[Path, LoggedModel], None]:
    """Writes a checkpoint's MLflow model (on the recorder's thread, no Keras): the template's files
    with `checkpoint` (a `.keras` file as ModelCheckpoint saved it) as the model, and the MLmodel
    naming the LoggedModel it is uploaded to, as `mlflow.models.Model.log` names it."""
    inner = keras_file.relative_to(template)

    def write(directory: Path, logged: LoggedModel) -> None:
        shutil.copytree(template, directory)
        (directory / inner).write_bytes(checkpoint)
        _name_logged_model(directory, logged)

    return write


def save_final_model(model: keras.Model, input_example: np.ndarray, directory: Path) -> Path:
    """Saves `model` as the run's final MLflow model (on the training thread: Keras), with an input
    example besides the checkpoints' signature and pinned requirements; returns `directory`. It is
    what `final_model_writer` uploads, and what is kept locally when the store does not take it."""
    shutil.rmtree(directory, ignore_errors=True)
    save_model(model, str(directory), signature=MODEL_SIGNATURE, input_example=input_example,
               pip_requirements=pinned_requirements())
    return directory


def final_model_writer(saved: Path) -> Callable[[Path, LoggedModel], None]:
    """Writes the final model (on the recorder's thread): the files `save_final_model` wrote, the
    MLmodel naming the LoggedModel it is uploaded to."""

    def write(directory: Path, logged: LoggedModel) -> None:
        shutil.copytree(saved, directory)
        _name_logged_model(directory, logged)

    return write


def _name_logged_model(directory: Path, logged: LoggedModel) -> None:
    """Names `logged` in the MLmodel of `directory`, as `mlflow.models.Model.log` does."""
    mlmodel = Model.load(str(directory / MLMODEL_FILE_NAME))
    mlmodel.model_id = mlmodel.model_uuid = logged.model_id
    mlmodel.run_id = logged.source_run_id
    mlmodel.artifact_path = logged.artifact_location
    mlmodel.model_size_bytes = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    mlmodel.save(str(directory / MLMODEL_FILE_NAME))
