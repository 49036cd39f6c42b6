"""Where an epoch's time goes as Keras' loop settings change: plain Keras, the seed's model and data,
no callbacks but a timer, every variant in one process after one discarded warm-up epoch.

    .venv/bin/python bench/epoch_profile.py --dataset ../shared/data/fashion-mnist 1/default 8/default 32/1024

A variant is STEPS/VALIDATION_BATCH[/INPUT]: `steps_per_execution`, fit's `validation_batch_size`
("default": the training batch size; "none": no validation pass) and what fit is given: "numpy" (the
default: the arrays, which Keras shuffles and slices every epoch, as the pipeline trains), "cached" (the
same batches in order from a cached tf.data pipeline: no shuffling or slicing) or "onebatch" (one batch
repeated: the arithmetic and Keras' step loop alone). Prints per variant the median epoch and validation
seconds, and a checksum of the final weights and the last metrics; these must agree across variants
that train on the same batches in the same order (only "numpy" variants do).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="STEPS/VALIDATION_BATCH[/INPUT], e.g. 8/default 64/none/cached")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per variant, the first discarded")
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras
    import numpy as np

    from pipeline.config import TrainingConfig
    from pipeline.training.data import load_dataset, split_validation
    from pipeline.training.model import build_model

    config = TrainingConfig.from_values({"dataset": args.dataset})
    dataset = load_dataset(config.dataset)
    x_train, y_train, x_val, y_val = split_validation(dataset.x_train, dataset.y_train, config.validation_split)

    class Timer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epochs: list[tuple[float, float]] = []

        def on_epoch_begin(self, epoch, logs=None) -> None:
            self.started, self.validation = time.perf_counter(), 0.0

        def on_test_begin(self, logs=None) -> None:
            self.validation_started = time.perf_counter()

        def on_test_end(self, logs=None) -> None:
            self.validation += time.perf_counter() - self.validation_started

        def on_epoch_end(self, epoch, logs=None) -> None:
            self.epochs.append((time.perf_counter() - self.started, self.validation))
            self.logs = dict(logs)

    def inputs(kind: str) -> dict:
        if kind == "numpy":
            return {"x": x_train, "y": y_train, "batch_size": config.batch_size}
        import tensorflow as tf

        if kind == "cached":
            batches = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(config.batch_size)
        else:
            steps = -(-len(x_train) // config.batch_size)
            first = (x_train[: config.batch_size], y_train[: config.batch_size])
            batches = tf.data.Dataset.from_tensors(first).repeat(steps)
        return {"x": batches.cache()}

    for variant in args.variants:
        steps, validation_batch, kind = (variant.split("/") + ["numpy"])[:3]
        keras.utils.set_random_seed(config.seed)
        model = build_model(config.layer_sizes, config.dropout, config.learning_rate, int(steps))
        timer = Timer()
        validation = {} if validation_batch == "none" else {
            "validation_data": (x_val, y_val),
            "validation_batch_size": None if validation_batch == "default" else int(validation_batch),
        }
        model.fit(**inputs(kind), epochs=args.epochs, callbacks=[timer], verbose=0, **validation)
        measured = timer.epochs[1:]
        weights = sum(float(np.sum(w, dtype=np.float64)) for w in model.get_weights())
        print(
            f"{variant}: epoch {statistics.median(e for e, _ in measured):.3f} s, "
            f"validation {statistics.median(v for _, v in measured):.3f} s; weights sum {weights!r}, "
            f"loss {timer.logs['loss']!r}, val_loss {timer.logs.get('val_loss')!r}",
            flush=True,
        )


if __name__ == "__main__":
    main()
