"""The trained model as an MLflow model: logged in the run, or kept locally while the store is away."""

from __future__ import annotations

import logging
import time
import types
from importlib import metadata
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline import constants as names
from pipeline.constants import NUM_CLASSES, NUM_PIXELS
from pipeline.errors import first_line
from pipeline.tracking.recorder import RunRecorder
from pipeline.tracking.retry import STORE_BACKOFF, is_transient, remaining

logger = logging.getLogger(__name__)

MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_PIXELS))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
)
# The logged model's requirements, pinned to what trained it (no inference at log time).
MODEL_REQUIREMENTS = ("tensorflow", "keras", "mlflow", "numpy")


def _save_tensorflow_model(path: str, mlflow_model: mlflow.models.Model, validate_serving_input: bool = False,
                           **options: object) -> None:
    """`mlflow.tensorflow.save_model`, accepting the flag `Model.log` passes on to every flavor."""
    mlflow.tensorflow.save_model(path=path, mlflow_model=mlflow_model, **options)


# mlflow.tensorflow as a flavor for `mlflow.models.Model.log`, so that the model can be logged with
# validate_serving_input=False, which `mlflow.tensorflow.log_model` cannot pass on: MLflow's check
# loads the model it just saved to predict its input example (bench/RESULTS.md, "What each speed
# trick buys"). `Model.log` takes the flavor's module and calls its `save_model`;
# tests/test_model_logging.py fails first if an MLflow upgrade changes that.
TENSORFLOW_FLAVOR_WITHOUT_SERVING_CHECK = types.SimpleNamespace(
    __name__="mlflow.tensorflow", save_model=_save_tensorflow_model
)


def log_model(recorder: RunRecorder, model: keras.Model, input_example: np.ndarray, workdir: Path,
              deadline: float) -> Path | None:
    """Logs `model` as the MLflow model `model` of the run. While the store is unreachable it waits,
    until `deadline` (time.monotonic()), for the store to take the backlog and then the model; after
    that it saves the model locally instead and returns that directory (None when logged)."""
    options = {
        "signature": MODEL_SIGNATURE,
        "input_example": input_example,
        "pip_requirements": [f"{package}=={metadata.version(package)}" for package in MODEL_REQUIREMENTS],
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
    mlflow.tensorflow.save_model(model, str(local), **options)
    return local
