"""Each new best checkpoint as MLflow's checkpoint API finds it: `mlflow.tensorflow.load_checkpoint(run_id=...)`
gives the best epoch's model, `epoch=E` any earlier best; each is one LoggedModel of the run (step = its epoch, its
metrics linked) that predicts as the checkpoint and can be registered: the earlier bests `checkpoint`, the best one the
final `model` (`runs:/<id>/model`), stored once; and a training SIGKILLed between a
checkpoint and its description leaves the run's pointer on a complete, consistent checkpoint, which a resume carries
on from without a second LoggedModel of the same epoch."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.callbacks.best_checkpoint import LINKED_METRICS, download_best_checkpoint
from pipeline.config import TrainingConfig
from pipeline.tracking.recorder import BARRIER_VARIABLE
from pipeline.training.data import load_dataset, split_validation
from pipeline.training.run import run_training
from tests.helpers import MNIST_SMALL, cli_options, project_env, resume_here

pytestmark = pytest.mark.slow

PARAMS = {
    "epochs": "6", "dataset": str(MNIST_SMALL), "target_accuracy": "0", "es_patience": "20", "hidden_units": "64",
    "batch_size": "16",
}


def _validation_accuracy(model: keras.Model, config: TrainingConfig) -> float:
    """The model's accuracy on the run's validation split, as Keras computes val_accuracy at an epoch's end."""
    dataset = load_dataset(config.dataset)
    _, _, x_val, y_val = split_validation(dataset.x_train, dataset.y_train, config.validation_split)
    probabilities = keras.ops.convert_to_numpy(model(x_val, training=False))
    return float((probabilities.argmax(axis=1) == y_val.argmax(axis=1)).mean())


def _same_weights(first: keras.Model, second: keras.Model) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights(), strict=True))


def _logged_models(client: MlflowClient, run_id: str) -> dict[int, list]:
    """The run's LoggedModels (`checkpoint` and `model`, deleted ones left out), by their step as outputs of the run."""
    run = client.get_run(run_id)
    steps = {output.model_id: output.step for output in run.outputs.model_outputs}
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list", filter_string=f"source_run_id = '{run_id}'",
    )
    by_step: dict[int, list] = {}
    for model in models:
        by_step.setdefault(steps[model.model_id], []).append(model)
    return by_step


@pytest.mark.timeout(300)
def test_mlflow_load_checkpoint_gives_the_best_epochs_model_and_each_earlier_best(sqlite_store, tmp_path):
    config = TrainingConfig.from_values(PARAMS)
    result = run_training(config, experiment_name="checkpoints")
    client = MlflowClient()
    val_accuracy = [m.value for m in client.get_metric_history(result.run_id, names.VAL_ACCURACY)]
    assert result.best_epoch == int(np.argmax(val_accuracy))

    best = mlflow.tensorflow.load_checkpoint(run_id=result.run_id)
    assert _validation_accuracy(best, config) == pytest.approx(val_accuracy[result.best_epoch], abs=1e-6)
    checkpoint_file, info = download_best_checkpoint(client, result.run_id, tmp_path / "best")
    assert info["epoch"] == result.best_epoch
    assert _same_weights(best, keras.models.load_model(checkpoint_file))
    assert best.optimizer.iterations.numpy() > 0  # the checkpoint as trained, optimizer state included
    # the logged model is that same checkpoint, and predicts as it does through MLflow's everyday URI
    assert _same_weights(best, mlflow.tensorflow.load_model(f"runs:/{result.run_id}/{names.MODEL_NAME}"))
    x_test = load_dataset(config.dataset).x_test[:20]
    np.testing.assert_allclose(mlflow.pyfunc.load_model(f"runs:/{result.run_id}/{names.MODEL_NAME}").predict(x_test),
                               best.predict(x_test, verbose=0), atol=1e-6)

    new_bests = [m.step for m in client.get_metric_history(result.run_id, names.BEST_VAL_ACCURACY)]
    assert len(new_bests) >= 2 and new_bests[-1] == result.best_epoch, new_bests
    for epoch in new_bests:  # every new best stays in the run, under its own epoch
        earlier = mlflow.tensorflow.load_checkpoint(run_id=result.run_id, epoch=epoch)
        assert _validation_accuracy(earlier, config) == pytest.approx(val_accuracy[epoch], abs=1e-6), epoch

    # each new best is one LoggedModel of the run, step = its epoch, tag `epoch`, the epoch's metrics linked: the
    # earlier bests as `checkpoint`, the best one as the final `model` (its `checkpoint` deleted: stored once)
    by_step = _logged_models(client, result.run_id)
    assert sorted(by_step) == new_bests and all(len(models) == 1 for models in by_step.values()), by_step
    names_by_step = {epoch: model.name for epoch, [model] in by_step.items()}
    assert names_by_step == {epoch: names.CHECKPOINT_MODEL_NAME for epoch in new_bests[:-1]} | {
        result.best_epoch: names.MODEL_NAME}
    history = {key: {m.step: m.value for m in client.get_metric_history(result.run_id, key)} for key in LINKED_METRICS}
    rows = load_dataset(config.dataset).x_test[:20]
    for epoch, [model] in by_step.items():
        assert model.status == LoggedModelStatus.READY and model.tags[names.MODEL_TAG_EPOCH] == str(epoch)
        linked = {(metric.key, metric.step): metric.value for metric in model.metrics}
        assert linked == {(key, epoch): history[key][epoch] for key in LINKED_METRICS}, (epoch, model.name)
        checkpoint = mlflow.tensorflow.load_checkpoint(run_id=result.run_id, epoch=epoch)
        np.testing.assert_allclose(  # the MLflow model is that checkpoint (pyfunc: the silent loader)
            mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict(rows),
            checkpoint.predict(rows, verbose=0), atol=1e-6)
    # linking adds no value to the run's own metrics: still one per epoch
    for key in LINKED_METRICS[:-1]:
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == list(range(len(val_accuracy))), key
    # any checkpoint can be registered, as MLflow registers a logged model
    [first] = by_step[new_bests[0]]
    assert first.name == names.CHECKPOINT_MODEL_NAME
    version = mlflow.register_model(f"models:/{first.model_id}", "checkpoint-of-epoch")
    assert first.model_id in version.source
    registered = mlflow.tensorflow.load_model(f"models:/checkpoint-of-epoch/{version.version}")
    assert _validation_accuracy(registered, config) == pytest.approx(val_accuracy[new_bests[0]], abs=1e-6)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training ended before {path.name}: {process.communicate()}"
        assert time.monotonic() < deadline, f"training never reached {path.name}"
        time.sleep(0.05)


@pytest.mark.timeout(420)
def test_a_kill_between_a_checkpoint_and_its_description_leaves_the_pointer_on_a_complete_one(
    sqlite_store, tmp_path, monkeypatch
):
    """The recorder is held (MNIST_PIPELINE_RECORDER_BARRIER) after the second new best's .keras file is stored and
    before its description is; the training is SIGKILLed there. The run's tags still name the first best, whose
    file and description are both stored and agree; MLflow's load_checkpoint gives it; a resume finishes the run
    with the pointer on its final best."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    config = TrainingConfig.from_values(PARAMS)
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow_project", "train", *cli_options(PARAMS), "--experiment-name", "killed"],
        cwd=tmp_path, env=project_env(MLFLOW_TRACKING_URI=sqlite_store, **{BARRIER_VARIABLE: str(barrier)}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for(barrier / "1.waiting", process)  # the first best: let it through
        (barrier / "1.go").touch()
        _wait_for(barrier / "2.waiting", process)  # the second: its .keras is stored, its description is not
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)

    client = MlflowClient(sqlite_store)
    [run] = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    run_id, tags = run.info.run_id, run.data.tags
    bests = sorted(int(item.path.rpartition("_")[2]) for item in client.list_artifacts(run_id, names.CHECKPOINT_DIR))
    assert len(bests) == 2, bests
    first, second = bests
    stored_second = {item.path.rpartition("/")[2]
                     for item in client.list_artifacts(run_id, names.checkpoint_dir(second))}
    assert stored_second == {names.BEST_MODEL_FILE}, "the premise: killed between the checkpoint and its description"

    assert tags[names.TAG_LATEST_CHECKPOINT] == names.checkpoint_file(first)
    assert tags[names.TAG_BEST_EPOCH] == str(first)
    checkpoint_file, info = download_best_checkpoint(client, run_id, tmp_path / "pointed")
    assert info["epoch"] == first
    pointed = keras.models.load_model(checkpoint_file)
    assert _validation_accuracy(pointed, config) == pytest.approx(info[names.VAL_ACCURACY], abs=1e-6)
    assert _same_weights(mlflow.tensorflow.load_checkpoint(run_id=run_id), pointed)

    monkeypatch.chdir(tmp_path)
    resumed = resume_here(client, run_id, cli_options(PARAMS))  # in this process: the kill was the process's
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = client.get_run(run_id)
    val_accuracy = [m.value for m in client.get_metric_history(run_id, names.VAL_ACCURACY)]
    final_best = int(np.argmax(val_accuracy))
    assert run.data.tags[names.TAG_LATEST_CHECKPOINT] == names.checkpoint_file(final_best)
    checkpoint_file, info = download_best_checkpoint(client, run_id, tmp_path / "final")
    assert info["epoch"] == final_best
    # one READY LoggedModel per new best: the restored best was not logged a second time, the final best is `model`
    by_step = _logged_models(client, run_id)
    new_bests = {m.step for m in client.get_metric_history(run_id, names.BEST_VAL_ACCURACY)}
    assert set(by_step) == new_bests and first in by_step, (by_step, new_bests)
    assert all(len(models) == 1 and models[0].status == LoggedModelStatus.READY for models in by_step.values())
    assert {epoch for epoch, [model] in by_step.items() if model.name == names.MODEL_NAME} == {final_best}
    [model] = by_step[final_best]
    linked = {metric.key: metric.value for metric in model.metrics if metric.step == final_best}
    assert linked[names.VAL_ACCURACY] == val_accuracy[final_best] and set(linked) == set(LINKED_METRICS)
    final = mlflow.tensorflow.load_checkpoint(run_id=run_id)
    assert _validation_accuracy(final, config) == pytest.approx(val_accuracy[final_best], abs=1e-6)

