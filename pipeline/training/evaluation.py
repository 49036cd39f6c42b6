"""The best checkpoint on the test split, as the seed evaluates it: loss, accuracy, the report and
plots, and the logged model."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np

from pipeline import constants as names
from pipeline.constants import NUM_CLASSES
from pipeline.tracking import reporting
from pipeline.tracking.model_logging import save_final_model
from pipeline.tracking.plot_process import PlotProcess
from pipeline.tracking.recorder import RunRecorder
from pipeline.training.callback_list import TrainingCallbacks
from pipeline.training.data import ImageDataset

logger = logging.getLogger(__name__)

# Test images per eager call of the model (bounds the activations' memory).
PREDICT_CHUNK = 10_000


def predict_probabilities(model: keras.Model, images: np.ndarray, chunk: int = PREDICT_CHUNK) -> np.ndarray:
    """The model's class probabilities for `images`, by calling it eagerly in chunks: for a model this
    small `model.predict` spends most of its time building its tf.function and data pipeline."""
    chunks = [
        keras.ops.convert_to_numpy(model(images[start:start + chunk], training=False))
        for start in range(0, len(images), chunk)
    ]
    return np.concatenate(chunks) if chunks else np.empty((0, NUM_CLASSES), np.float32)


def categorical_loss_and_accuracy(one_hot: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """Keras' categorical cross-entropy (probabilities renormalized and clipped to [1e-7, 1 - 1e-7])
    and categorical accuracy, averaged over the examples, as `model.evaluate` reports them."""
    epsilon = np.float32(keras.config.epsilon())
    clipped = np.clip(probabilities / probabilities.sum(axis=1, keepdims=True), epsilon, 1 - epsilon)
    loss = float(np.mean(-np.sum(one_hot * np.log(clipped), axis=1)))
    accuracy = float(np.mean(one_hot.argmax(axis=1) == probabilities.argmax(axis=1)))
    return loss, accuracy


def evaluate_and_report(
    recorder: RunRecorder, callbacks: TrainingCallbacks, dataset: ImageDataset, workdir: Path
) -> tuple[float, float, Path]:
    """Evaluates the best checkpoint on the test split and records the results and the model.

    One prediction pass gives the loss, the accuracy and the confusion matrix. A PlotProcess draws
    the plots on the other core meanwhile: the training curves while the model is saved and the
    checkpoint evaluated, then the confusion matrix. The best checkpoint becomes the run's model
    `model` (see `BestCheckpoint.log_final_model`), queued first: the recorder's thread sends it
    while the test split is evaluated. Returns test loss, test
    accuracy, and the model's local MLflow directory (kept if the store does not take it)."""
    curves, matrix = workdir / names.TRAINING_CURVES_FILE, workdir / names.CONFUSION_MATRIX_FILE
    with PlotProcess() as plotter:
        plotter.submit(
            "plot_training_curves", callbacks.backup.history, callbacks.lr_changes.changes,
            callbacks.checkpoint.best_epoch, curves,
        )
        best_model = keras.models.load_model(callbacks.checkpoint.filepath)
        local_model = save_final_model(best_model, dataset.x_test[:5], workdir / names.MODEL_NAME)
        callbacks.checkpoint.log_final_model(local_model)  # the recorder sends it while the test split is evaluated
        probabilities = predict_probabilities(best_model, dataset.x_test)
        test_loss, test_accuracy = categorical_loss_and_accuracy(dataset.y_test, probabilities)
        counts = reporting.confusion_matrix(dataset.y_test.argmax(axis=1), probabilities.argmax(axis=1))
        recorder.log_metrics({names.TEST_LOSS: test_loss, names.TEST_ACCURACY: test_accuracy}, step=0)
        recorder.log_json(reporting.classification_report(counts), names.CLASSIFICATION_REPORT_FILE)
        logger.info("Test accuracy of the best checkpoint: %.4f (loss %.4f)", test_accuracy, test_loss)
        plotter.submit("plot_confusion_matrix", counts, matrix)
    recorder.log_file(curves, names.PLOTS_DIR)
    recorder.log_file(matrix, names.PLOTS_DIR)
    return test_loss, test_accuracy, local_model
