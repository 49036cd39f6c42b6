"""How the model is logged (pipeline/tracking/model_logging.py): through `mlflow.models.Model.log` with a
stand-in for the `mlflow.tensorflow` module as its flavor, so that MLflow's serving re-check can be turned
off (if an MLflow upgrade stops accepting that, this fails first and says what changed); with a pyfunc
loader of its own whose predictions print nothing."""

from __future__ import annotations

import inspect
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.experiments.runs import logged_models_by_run
from pipeline.tracking.model_logging import MODEL_REQUIREMENTS, MODEL_SIGNATURE, log_model, save_model
from pipeline.tracking.recorder import RunRecorder
from pipeline.training.model import build_model

pytestmark = pytest.mark.timeout(120)


def test_model_log_still_takes_a_flavor_module_and_the_serving_check_switch():
    parameters = inspect.signature(Model.log).parameters
    assert {"flavor", "name", "kwargs"} <= set(parameters)  # the flavor module; the model and options in kwargs
    assert "validate_serving_input" in inspect.getsource(Model.log)  # the switch it reads from them


def test_the_model_logged_through_the_stand_in_is_a_loadable_tensorflow_model(sqlite_store, tmp_path):
    model = build_model((16,), 0.0, 0.001)
    images = np.random.default_rng(0).random((5, 784), dtype=np.float32)
    client = MlflowClient()
    experiment_id = client.create_experiment("model-logging")  # not whichever one an earlier test made active
    with mlflow.start_run(experiment_id=experiment_id) as run, \
            RunRecorder(client, run.info.run_id, tmp_path / "staging") as recorder:
        assert log_model(recorder, model, images, tmp_path, deadline=float("inf")) is None
    model_id = logged_models_by_run(client, run.info.experiment_id, run.info.run_id)[run.info.run_id]
    uri = f"models:/{model_id}"
    flavors = Model.load(uri).flavors
    assert {"tensorflow", "python_function"} <= set(flavors)
    predictions = mlflow.pyfunc.load_model(uri).predict(images)
    np.testing.assert_allclose(predictions, model.predict(images, verbose=0), atol=1e-6)
    assert names.MODEL_NAME == "model"


def _logged_with_training_settings(tmp_path) -> tuple[str, object]:
    """A model compiled as a training compiles it (steps_per_execution=64), logged with log_model."""
    model = build_model((16,), 0.0, 0.001, steps_per_execution=64)
    client = MlflowClient()
    experiment_id = client.create_experiment("quiet-model")
    with mlflow.start_run(experiment_id=experiment_id) as run, \
            RunRecorder(client, run.info.run_id, tmp_path / "staging") as recorder:
        assert log_model(recorder, model, np.zeros((5, 784), np.float32), tmp_path, deadline=float("inf")) is None
    model_id = logged_models_by_run(client, experiment_id, run.info.run_id)[run.info.run_id]
    return f"models:/{model_id}", model


def test_a_pyfunc_prediction_prints_nothing_and_predicts_like_the_trained_model(sqlite_store, tmp_path, capfd):
    uri, model = _logged_with_training_settings(tmp_path)
    pyfunc_model = mlflow.pyfunc.load_model(uri)
    images = np.random.default_rng(1).random((70, 784), dtype=np.float32)
    capfd.readouterr()  # what loading wrote
    predictions = [pyfunc_model.predict(images), pyfunc_model.predict(images[:1])]
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    np.testing.assert_allclose(predictions[0], model.predict(images, verbose=0), atol=1e-6)
    assert predictions[1].shape == (1, 10)
    # the Keras flavor is still MLflow's (the model as trained), the signature and the pinned requirements are kept
    keras_model = mlflow.tensorflow.load_model(uri)
    assert keras_model.get_compile_config()["steps_per_execution"] == 64
    np.testing.assert_allclose(keras_model.predict(images, verbose=0), predictions[0], atol=1e-6)
    logged = Model.load(uri)
    assert logged.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 784)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
    assert sorted(line.split("==")[0] for line in requirements) == sorted(MODEL_REQUIREMENTS)


def test_a_model_kept_locally_while_the_store_is_away_predicts_silently_too(tmp_path, capfd):
    """What log_model saves when the store never came back (the same save_model), loaded from its directory."""
    model = build_model((16,), 0.0, 0.001, steps_per_execution=64)
    local = tmp_path / names.MODEL_NAME
    save_model(model, str(local), signature=MODEL_SIGNATURE)
    pyfunc_model = mlflow.pyfunc.load_model(str(local))
    images = np.random.default_rng(3).random((1030, 784), dtype=np.float32)  # more than one call of the model
    capfd.readouterr()
    predictions = pyfunc_model.predict(images)
    assert capfd.readouterr() == ("", "")
    np.testing.assert_allclose(predictions, model.predict(images, verbose=0), atol=1e-6)
