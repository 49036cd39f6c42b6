"""The parameter contract: names, types, defaults, and what each one refuses."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import TRAINING_PARAMETERS, TrainingConfig
from pipeline.errors import ParameterError

# The contract of issue 2, as the user reads it in the README.
CONTRACT_DEFAULTS = {
    "epochs": 20,
    "batch_size": 128,
    "learning_rate": 0.001,
    "hidden_units": "128,64",
    "dropout": 0.2,
    "validation_split": 0.2,
    "dataset": "mnist",
    "es_patience": 3,
    "lr_factor": 0.5,
    "lr_patience": 2,
    "min_lr": 1e-6,
    "target_accuracy": 0.98,
    "seed": 42,
    "strategy": "default",
}


def test_defaults_are_the_seed_notebooks():
    assert {spec.name: spec.default for spec in TRAINING_PARAMETERS} == CONTRACT_DEFAULTS
    assert dataclasses.asdict(TrainingConfig.from_values()) == CONTRACT_DEFAULTS


def test_config_fields_are_exactly_the_parameters():
    assert [field.name for field in dataclasses.fields(TrainingConfig)] == [
        spec.name for spec in TRAINING_PARAMETERS
    ]


def test_values_given_as_text_are_parsed():
    config = TrainingConfig.from_values(
        {"epochs": "5", "learning_rate": "1e-3", "hidden_units": " 256, 32 ,16", "dropout": "0",
         "target_accuracy": "0", "min_lr": "0"}
    )
    assert config.epochs == 5
    assert config.learning_rate == 0.001
    assert config.layer_sizes == (256, 32, 16)
    assert config.hidden_units == "256,32,16"
    assert (config.dropout, config.target_accuracy, config.min_lr) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("epochs", "0"), ("epochs", "2.5"), ("epochs", "ten"), ("epochs", ""),
        ("batch_size", "0"), ("batch_size", "-1"),
        ("learning_rate", "0"), ("learning_rate", "-0.1"), ("learning_rate", "nan"), ("learning_rate", "inf"),
        ("hidden_units", ""), ("hidden_units", "128,"), ("hidden_units", "0,64"), ("hidden_units", "a,b"),
        ("hidden_units", "-5"),
        ("dropout", "1"), ("dropout", "-0.1"),
        ("validation_split", "0"), ("validation_split", "1"),
        ("dataset", ""), ("dataset", "   "),
        ("es_patience", "-1"), ("lr_factor", "1"), ("lr_factor", "0"), ("lr_patience", "-2"),
        ("min_lr", "-1e-6"), ("target_accuracy", "1.5"), ("target_accuracy", "-0.5"),
        ("seed", "-1"), ("seed", str(2**32)),
        ("strategy", "mirrord"), ("strategy", "Default"), ("strategy", ""),
    ],
)
def test_invalid_values_name_the_parameter_and_what_is_allowed(name, value):
    spec = next(spec for spec in TRAINING_PARAMETERS if spec.name == name)
    with pytest.raises(ParameterError) as raised:
        TrainingConfig.from_values({name: value})
    message = str(raised.value)
    assert raised.value.name == name
    assert name in message and spec.allowed in message
    assert "\n" not in message


def test_unknown_parameter_is_refused():
    with pytest.raises(ParameterError, match="one of .*epochs"):
        TrainingConfig.from_values({"epoch": "3"})
