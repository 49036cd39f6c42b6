"""The seed notebook's MLP: Dense+ReLU hidden layers with dropout, a softmax over 10 classes."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from pipeline.constants import NUM_CLASSES, NUM_PIXELS


def build_model(
    hidden_units: Sequence[int], dropout: float, learning_rate: float, steps_per_execution: int = 1
) -> keras.Model:
    """Returns the compiled MLP (Adam, categorical cross-entropy, accuracy).

    Args:
        hidden_units: units of each hidden layer, input side first (the seed: 128, 64).
        dropout: rate of the Dropout after each hidden layer (the seed: 0.2).
        learning_rate: Adam's initial learning rate (the seed: Keras' default, 0.001).
        steps_per_execution: batches run by one call of the compiled train step. This model is so
            small that Keras' per-batch Python work is a large part of each step; running several
            batches per call gives the same weights and metrics (the same ops in the same order)
            in less time. Batch-level callbacks are then called once per call.
    """
    layers: list[keras.layers.Layer] = [keras.Input(shape=(NUM_PIXELS,))]
    for units in hidden_units:
        layers.append(keras.layers.Dense(units, activation="relu"))
        layers.append(keras.layers.Dropout(dropout))
    layers.append(keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities"))
    model = keras.Sequential(layers, name="mnist_mlp")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


def model_summary(model: keras.Model) -> str:
    """The text of `model.summary()`, for the run's model_summary.txt."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    return "\n".join(lines) + "\n"
