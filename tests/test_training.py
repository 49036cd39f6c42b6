"""The run contract: everything a training run records, on real stores with real data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import TRAINING_PARAMETERS, TrainingConfig
from pipeline.errors import DataError, TrainingDiverged
from pipeline.training.data import load_dataset
from pipeline.training.evaluation import predict_probabilities
from pipeline.training.model import build_model
from pipeline.training.run import run_training
from tests.helpers import MNIST_SMALL
from tests.run_contract import DERIVED_PARAMS, EXPECTED_ARTIFACTS, artifact_paths, assert_run_contract, small_config


def test_run_records_the_whole_contract_in_sqlite(sqlite_store, tmp_path):
    config = small_config()
    result = run_training(config, experiment_name="contract")
    # nothing left in the working directory but the store the user chose (db, its write-ahead log + ./mlruns)
    assert set(os.listdir(tmp_path)) <= {"mlflow.db", "mlflow.db-wal", "mlflow.db-shm", "mlruns"}
    assert {"mlflow.db", "mlruns"} <= set(os.listdir(tmp_path))
    assert_run_contract(MlflowClient(), result.run_id, config, tmp_path / "check")
    assert result.test_accuracy > 0.8
    assert_input_example_serves(result.run_id, tmp_path / "serving")


def test_a_run_records_mlflow_system_metrics_while_it_trains(sqlite_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # the CLI's default is 5 s
    result = run_training(small_config(epochs="8"), experiment_name="system-metrics")
    client = MlflowClient()
    metrics = client.get_run(result.run_id).data.metrics
    for name in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        history = client.get_metric_history(result.run_id, name)
        assert len(history) >= 2, (name, sorted(metrics))
        assert all(point.value >= 0 for point in history)


def assert_input_example_serves(run_id: str, workdir: Path) -> None:
    """MLflow's serving check of the logged model's input example (the run skips it to save time):
    `mlflow.models.predict` on the serving input example, as `mlflow models serve` would parse it."""
    model_dir = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(workdir))
    serving_input = Model.load(model_dir).get_serving_input(model_dir)
    assert serving_input is not None
    (workdir / "input.json").write_text(serving_input)
    mlflow.models.predict(
        model_uri=model_dir, input_path=str(workdir / "input.json"), content_type="json", env_manager="local",
        output_path=str(workdir / "output.json"),
    )
    served = np.array(json.loads((workdir / "output.json").read_text())["predictions"])
    example = np.array(json.loads(serving_input)["inputs"], dtype=np.float32)
    assert served.shape == (len(example), 10)
    np.testing.assert_allclose(served, mlflow.pyfunc.load_model(model_dir).predict(example), atol=1e-6)


def test_run_records_the_whole_contract_in_the_database_store(postgres_store, tmp_path):
    config = small_config(epochs="3", hidden_units="64", batch_size="64")
    result = run_training(config, experiment_name="contract-db")
    derived = DERIVED_PARAMS | {
        names.PARAM_TOTAL_PARAMETERS: str(784 * 64 + 64 + 64 * 10 + 10),
        names.PARAM_STEPS_PER_EPOCH: "19",
    }
    run = MlflowClient().get_run(result.run_id)
    assert run.data.params == config.as_params() | derived
    assert run.info.status == "FINISHED"
    artifacts = artifact_paths(MlflowClient(), result.run_id)
    assert artifacts >= EXPECTED_ARTIFACTS
    pointer = run.data.tags[names.TAG_LATEST_CHECKPOINT]  # the best checkpoint, its description beside it
    assert pointer == names.checkpoint_file(result.best_epoch)
    assert {pointer, pointer.replace(names.BEST_MODEL_FILE, names.BEST_MODEL_INFO_FILE)} <= artifacts
    for metric in names.EPOCH_METRICS:
        assert len(MlflowClient().get_metric_history(result.run_id, metric)) == 3


def test_same_seed_same_metrics_other_seed_other_metrics(sqlite_store):
    client = MlflowClient()

    def losses(seed: str) -> list[float]:
        result = run_training(small_config(epochs="3", seed=seed), experiment_name="seeds")
        return [m.value for m in client.get_metric_history(result.run_id, names.VAL_LOSS)]

    first, second, other = losses("1"), losses("1"), losses("2")
    assert first == second
    assert first != other


def test_target_accuracy_stop_is_the_recorded_stop_reason(sqlite_store):
    result = run_training(small_config(target_accuracy="0.7", epochs="20"), experiment_name="stops")
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags[names.TAG_STOP_REASON] == names.STOP_TARGET_ACCURACY == result.stop_reason
    accuracies = [m.value for m in MlflowClient().get_metric_history(result.run_id, names.VAL_ACCURACY)]
    assert accuracies[-1] >= 0.7 and all(value < 0.7 for value in accuracies[:-1])


def test_early_stopping_is_the_recorded_stop_reason(sqlite_store):
    # A large rate makes val_loss bounce; patience 0 stops at the first epoch that does not improve.
    result = run_training(
        small_config(learning_rate="0.02", es_patience="0", lr_patience="5", epochs="15", target_accuracy="0"),
        experiment_name="stops",
    )
    assert result.stop_reason == names.STOP_EARLY_STOPPING
    assert result.epochs_completed < 15
    val_loss = [m.value for m in MlflowClient().get_metric_history(result.run_id, names.VAL_LOSS)]
    assert val_loss[-1] >= min(val_loss[:-1])


def test_nan_loss_fails_the_run_with_its_reason(sqlite_store):
    with pytest.raises(TrainingDiverged, match="NaN/inf at epoch 0"):
        run_training(small_config(learning_rate="1e30"), experiment_name="nan")
    [run] = MlflowClient().search_runs([mlflow.get_experiment_by_name("nan").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags[names.TAG_STOP_REASON] == names.STOP_NAN_LOSS
    assert run.data.tags[names.TAG_NAN_AT].startswith("epoch 0 batch ")
    assert names.TEST_ACCURACY not in run.data.metrics


def test_bad_data_fails_before_any_run_exists(sqlite_store, tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(DataError):
        run_training(small_config(dataset=str(broken)), experiment_name="bad")
    assert mlflow.get_experiment_by_name("bad") is None


def test_all_parameters_reach_the_run(sqlite_store):
    values = {
        "epochs": "2", "batch_size": "50", "learning_rate": "0.002", "hidden_units": "32,16,8", "dropout": "0.1",
        "validation_split": "0.25", "es_patience": "4", "lr_factor": "0.3", "lr_patience": "3", "min_lr": "1e-05",
        "target_accuracy": "0.99", "seed": "7", "dataset": str(MNIST_SMALL), "strategy": "default",
        "steps_per_execution": "4",
    }
    assert set(values) == {spec.name for spec in TRAINING_PARAMETERS}
    result = run_training(TrainingConfig.from_values(values), experiment_name="params")
    run = MlflowClient().get_run(result.run_id)
    assert {key: run.data.params[key] for key in values} == values
    assert run.data.params[names.PARAM_TRAIN_SIZE] == "1125"
    assert run.data.params[names.PARAM_STEPS_PER_EPOCH] == "23"


def test_predict_probabilities_in_chunks_equal_keras_predict():
    model = build_model((16,), dropout=0.5, learning_rate=1e-3)
    images = load_dataset(str(MNIST_SMALL)).x_test[:23]
    expected = model.predict(images, verbose=0)
    np.testing.assert_allclose(predict_probabilities(model, images, chunk=7), expected, atol=1e-6)
    assert predict_probabilities(model, images[:0]).shape == (0, 10)
