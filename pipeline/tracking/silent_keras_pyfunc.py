"""The logged model's pyfunc loader: predicts with the Keras model, printing nothing.

MLflow's own pyfunc wrapper for Keras (`mlflow.tensorflow`) calls `keras_model.predict(data)` with no
arguments, so every `pyfunc.load_model(...).predict(x)`, `mlflow models predict` and every request to
`mlflow models serve` prints a Keras progress bar (its `params` are not passed on). This module is
copied into each logged model (its `code/` directory, MLflow puts it on `sys.path` at load) and named
as the model's `python_function` loader: it must import nothing from this project, only what the
model's requirements hold. The `tensorflow` flavor (`mlflow.tensorflow.load_model`) is MLflow's own.
"""

from __future__ import annotations

import os
from typing import Any

import keras
import numpy as np

# Where mlflow.tensorflow.save_model puts a Keras 3 model inside the flavor's data directory.
KERAS_FILE = "model.keras"
# Rows per call of the model: bounds the memory of one call for any request size.
BATCH_ROWS = 1024


class SilentKerasModel:
    """What `mlflow.pyfunc` predicts with: the Keras model, uncompiled, one `predict_on_batch` per
    BATCH_ROWS rows. `predict()` would cost ~100 ms more per call on this project's CPUs (it builds a
    dataset and its callbacks each time) and print a progress bar unless told verbose=0."""

    def __init__(self, keras_model: keras.Model) -> None:
        self.keras_model = keras_model

    def get_raw_model(self) -> keras.Model:
        return self.keras_model

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        rows = np.asarray(data)
        if len(rows) <= BATCH_ROWS:
            return np.asarray(self.keras_model.predict_on_batch(rows))
        return np.concatenate([
            np.asarray(self.keras_model.predict_on_batch(rows[start:start + BATCH_ROWS]))
            for start in range(0, len(rows), BATCH_ROWS)
        ])


def _load_pyfunc(path: str) -> SilentKerasModel:
    """Called by `mlflow.pyfunc.load_model` with the flavor's data directory. Loaded without its compile
    settings: a prediction needs none, and the training's (steps_per_execution) only slow it."""
    return SilentKerasModel(keras.saving.load_model(os.path.join(path, KERAS_FILE), compile=False))
