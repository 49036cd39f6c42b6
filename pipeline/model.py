"""The seed notebook's MLP: Dense+ReLU hidden layers with dropout, a softmax over 10 classes."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from pipeline.data import NUM_CLASSES, NUM_PIXELS


def build_model(hidden_units: Sequence[int], dropout: float, learning_rate: float) -> keras.Model:
    """Returns the compiled MLP (Adam, categorical cross-entropy, accuracy).

    Args:
        hidden_units: units of each hidden layer, input side first (the seed: 128, 64).
        dropout: rate of the Dropout after each hidden layer (the seed: 0.2).
        learning_rate: Adam's initial learning rate (the seed: Keras' default, 0.001).
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
    )
    return model


def model_summary(model: keras.Model) -> str:
    """The text of `model.summary()`, for the run's model_summary.txt."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    return "\n".join(lines) + "\n"
