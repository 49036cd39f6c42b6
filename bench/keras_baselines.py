"""The two reference trainings of the overhead benchmark, as standalone scripts.

    python bench/keras_baselines.py plain     EPOCHS DATASET   # plain Keras, the seed's callbacks
    python bench/keras_baselines.py plain_spe EPOCHS DATASET   # the same, the pipeline's steps_per_execution
    python bench/keras_baselines.py autolog   EPOCHS DATASET   # the same under mlflow.tensorflow.autolog()

Both train the seed's model with the seed's callbacks (best checkpoint, early stopping, LR on plateau,
CSV log) on the same data as the pipeline, print one line per epoch (for time-to-first-epoch), evaluate
the best checkpoint on the test split, and print the same `Timing:` line as the pipeline.
"""

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(variant: str, epochs: int, dataset_path: str) -> None:
    import keras

    from pipeline.config import TrainingConfig
    from pipeline.training.data import load_dataset, split_validation
    from pipeline.training.model import build_model

    config = TrainingConfig.from_values({"epochs": str(epochs), "dataset": dataset_path})
    dataset = load_dataset(config.dataset)
    x_train, y_train, x_val, y_val = split_validation(dataset.x_train, dataset.y_train, config.validation_split)
    if variant == "autolog":
        import mlflow

        mlflow.set_experiment("bench-autolog")
        mlflow.tensorflow.autolog(checkpoint=True, checkpoint_monitor="val_accuracy", checkpoint_mode="max")
    keras.utils.set_random_seed(config.seed)
    steps_per_execution = config.steps_per_execution if variant == "plain_spe" else 1
    model = build_model(config.layer_sizes, config.dropout, config.learning_rate, steps_per_execution)
    with tempfile.TemporaryDirectory() as tmp:
        best = os.path.join(tmp, "best_model.keras")
        callbacks = [
            keras.callbacks.ModelCheckpoint(best, monitor="val_accuracy", mode="max", save_best_only=True),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.es_patience, restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=config.lr_factor, patience=config.lr_patience, min_lr=config.min_lr
            ),
            keras.callbacks.CSVLogger(os.path.join(tmp, "training_log.csv")),
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: print(f"Epoch {epoch + 1}: val_accuracy={logs['val_accuracy']:.4f}",
                                                       flush=True)
            ),
        ]
        started = time.perf_counter()
        model.fit(x_train, y_train, batch_size=config.batch_size, epochs=config.epochs,
                  validation_data=(x_val, y_val), callbacks=callbacks, verbose=0)
        fit_seconds = time.perf_counter() - started
        best_model = keras.models.load_model(best)
        _, accuracy = best_model.evaluate(dataset.x_test, dataset.y_test, batch_size=1024, verbose=0)
        if variant == "autolog":
            import mlflow

            mlflow.end_run()
        after = time.perf_counter() - started - fit_seconds
    print(f"Test accuracy of the best checkpoint: {accuracy:.4f}")
    print(f"Timing: fit {fit_seconds:.2f} s, after fit {after:.2f} s", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
